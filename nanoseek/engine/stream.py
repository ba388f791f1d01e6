"""Incremental detokenisation that is UTF-8 safe and never leaks a stop string.

    stream = TextStream(tokenizer, stop=["\\n\\n"])
    for token in tokens:
        delta = stream.push(token)      # text that can be shown now
        if stream.stopped: break
    delta = stream.finish()             # whatever was held back, when generation ends otherwise

Text is held back while it ends in an incomplete UTF-8 character (a byte-level token can carry
part of one) or in a prefix of a stop string (which may be completed by the next tokens). When a
stop string appears, everything from it on is dropped.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False
        self.text = ""  # everything emitted, for callers that want the whole output
        self._settled, self._cut = "", 0  # the text of ids[:_cut], which ends on a whole character
        self._in_pieces = tokenizer.decodes_bytes

    def _decoded(self) -> str:
        """The text of every id so far. With a byte-level decoder only the ids after the last point
        where the text ended on a whole character are decoded again; decoding the whole sequence at
        every token made a token cost more the longer the output."""
        if not self._in_pieces:
            return self.tok.decode(self.ids)
        tail = self.tok.decode(self.ids[self._cut:])
        text = self._settled + tail
        if not tail.endswith("\ufffd"):  # U+FFFD: bytes of a character still to come (or an invalid one)
            self._settled, self._cut = text, len(self.ids)
        return text

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._decoded()
        complete = text.rstrip("\ufffd")  # an unfinished multi-byte character decodes to U+FFFD
        for s in self.stop:
            at = complete.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._emit(complete[:at])
        hold = 0
        for s in self.stop:  # the longest tail of the text that could still grow into a stop string
            for k in range(min(len(s) - 1, len(complete)), hold, -1):
                if s.startswith(complete[-k:]):
                    hold = k
                    break
        return self._emit(complete[: len(complete) - hold])

    def finish(self) -> str:
        """The held-back text once generation has ended without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self._decoded())

    def _emit(self, upto: str) -> str:
        delta = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        self.text += delta
        return delta
