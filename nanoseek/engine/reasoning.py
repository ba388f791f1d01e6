"""Split a reasoning model's output into reasoning and answer, streamed or whole.

DeepSeek-R1's rule (also vLLM's `deepseek_r1` parser): text before `</think>` is reasoning, the
rest is content; the opening `<think>` may be missing (a template can put it in the prompt), and
without any `</think>` everything is reasoning.

    split = ReasoningSplitter()
    for delta in deltas:
        reasoning, content = split.push(delta)
    reasoning, content = split.finish()

`implicit=False` is for models that may not reason at all: only an output that opens with
`<think>` has reasoning, anything else is all content.
"""

from __future__ import annotations

from ..tokenizer import THINK, THINK_END


class ReasoningSplitter:
    def __init__(self, implicit: bool = True):
        self.implicit = implicit
        self.state = "start"  # start -> reasoning -> content
        self.held = ""  # text that may be the start of a tag

    def push(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) that can be shown now; a possible partial tag is held back."""
        text = self.held + delta
        self.held = ""
        reasoning = content = ""
        if self.state == "start":
            stripped = text.lstrip()
            if THINK.startswith(stripped):
                self.held = text  # "", whitespace or a partial "<think>": wait for more
                return "", ""
            if stripped.startswith(THINK):
                text = stripped[len(THINK):]
                self.state = "reasoning"
            else:
                self.state = "reasoning" if self.implicit else "content"
        if self.state == "reasoning":
            end = text.find(THINK_END)
            if end == -1:
                keep = _partial_suffix(text, THINK_END)
                self.held = text[len(text) - keep:] if keep else ""
                return text[: len(text) - keep], ""
            reasoning, text = text[:end], text[end + len(THINK_END):]
            self.state = "content"
        return reasoning, content + text

    def finish(self) -> tuple[str, str]:
        """Whatever was held back once the output has ended."""
        held, self.held = self.held, ""
        if self.state == "start":
            stripped = held.lstrip()
            if stripped.startswith(THINK):
                return stripped[len(THINK):], ""
            return (held, "") if self.implicit else ("", held)
        return (held, "") if self.state == "reasoning" else ("", held)


def split_reasoning(text: str, implicit: bool = True) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    split = ReasoningSplitter(implicit)
    r1, c1 = split.push(text)
    r2, c2 = split.finish()
    return r1 + r2, c1 + c2


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
