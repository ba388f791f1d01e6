"""The engine on a thread of its own, fed by the server's request handlers.

Handlers run on the asyncio event loop; the engine's forward passes must not, or `/health` and
every stream would stall behind them. `EngineRunner` owns the engine: handlers `submit` requests
(turned away at once when running + waiting ones already fill the bounds) and `cancel` them;
the thread adds and cancels between steps and hands each output to the request's callback, which
the handler points at its own asyncio queue.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..engine.engine import Engine, Output
from ..engine.sampling import SamplingParams

log = logging.getLogger("nanoseek.server")


@dataclass
class Handle:
    """One submitted sequence, as the handler sees it."""
    on_output: Callable[[Output | Exception], None]
    rid: int | None = None  # the engine's id, once the thread has added it
    done: bool = False
    request: object = field(default=None, repr=False)  # the engine's Request, for logprobs and counts


class EngineRunner:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque = collections.deque()
        self.in_flight = 0  # accepted and not yet finished or cancelled
        self.cancelled = 0  # sequences stopped because their client went away
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    @property
    def capacity(self) -> int:
        return self.engine.max_running + self.max_queue

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, jobs: list[tuple[list[int], SamplingParams, Callable]]) -> list[Handle] | None:
        """Accept all the jobs (prompt ids, params, callback) or none: None when they do not fit."""
        with self._lock:
            if self.in_flight + len(jobs) > self.capacity:
                return None
            self.in_flight += len(jobs)
            handles = [Handle(callback) for _, _, callback in jobs]
            for handle, (ids, params, _) in zip(handles, jobs):
                self._inbox.append(("add", handle, ids, params))
            self._wake.notify()
        return handles

    def cancel(self, handles: list[Handle]) -> None:
        """Stop these sequences (a client went away); their cache blocks are freed before the next step."""
        with self._lock:
            for h in handles:
                if not h.done:
                    self._inbox.append(("cancel", h))
            self._wake.notify()

    def stats(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting),
                "accepted": self.in_flight, "cancelled": self.cancelled,
                "free_cache_tokens": self.engine.cache.free_tokens,
                "cache_tokens": self.engine.cache.num_blocks * self.engine.cache.block_size}

    # ---- the engine thread ----------------------------------------------------------------------
    def _finish(self, handle: Handle) -> None:
        with self._lock:
            if not handle.done:
                handle.done = True
                self.in_flight -= 1

    def _deliver(self, handle: Handle, out: Output) -> None:
        if out.finish_reason:
            self._finish(handle)
        handle.on_output(out)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._inbox and not self.engine.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            for command in commands:
                self._apply(command)
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception:  # a fault in a forward: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_all()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, handle, ids, params = command
            if handle.done:
                return
            try:
                handle.rid = self.engine.add(ids, params, callback=lambda out, h=handle: self._deliver(h, out))
                handle.request = self.engine.waiting[-1]
            except ValueError as e:  # validated before, so this is a bug or a race: tell the client
                self._finish(handle)
                handle.on_output(e)
        else:
            _, handle = command
            if not handle.done:
                self.cancelled += 1
                if handle.rid is not None:
                    self.engine.cancel(handle.rid)
            self._finish(handle)

    def _fail_all(self) -> None:
        """Cancel every request and tell each client with finish_reason "error"."""
        for req in list(self.engine.running.values()) + list(self.engine.waiting):
            self.engine.cancel(req.id)
            if req.callback is not None:
                req.callback(Output(req.id, None, "", None, "error"))
