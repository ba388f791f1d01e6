"""The engine on a thread of its own, fed by the server's request handlers.

Handlers run on the asyncio event loop; the engine's forward passes must not, or `/health` and
every stream would stall behind them. `EngineRunner` owns the engine: handlers `submit` requests
(turned away at once when running + waiting ones already fill the bounds) and `cancel` them;
the thread adds and cancels between steps and hands a step's outputs to the event loop in one
wake-up, onto each request's own asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from ..engine.engine import Engine, Output
from ..engine.sampling import SamplingParams

log = logging.getLogger("nanoseek.server")


@dataclass
class Handle:
    """One submitted sequence, as the handler sees it: its outputs go to `queue` on `loop` as
    (index, Output or Exception)."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    rid: int | None = None  # the engine's id, once the thread has added it
    done: bool = False
    request: object = field(default=None, repr=False)  # the engine's Request, for logprobs and counts


class EngineRunner:
    GATHER_S = 0.003  # how long an idle engine waits for company before prefilling a new request
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque = collections.deque()
        self.in_flight = 0  # accepted and not yet finished or cancelled
        self.cancelled = 0  # sequences stopped because their client went away
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._outbox: dict = collections.defaultdict(list)  # loop -> [(handle, item)] of this step

    @property
    def capacity(self) -> int:
        return self.engine.max_running + self.max_queue

    def start(self) -> None:
        """Run the engine on a thread of its own (for an app served from the main thread)."""
        self._thread.start()

    def run(self) -> None:
        """Run the engine on the calling thread until stop(). `nanoseek serve` does this on the main
        thread and serves HTTP from another: PyTorch's OpenMP workers run much slower when driven
        from a secondary thread (docs/server.md)."""
        self._run()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def submit(self, jobs: list[tuple[list[int], SamplingParams]], loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> list[Handle] | None:
        """Accept all the jobs (prompt ids, params) or none: None when they do not fit. Job i's
        outputs arrive on `queue` as (i, output)."""
        with self._lock:
            if self.in_flight + len(jobs) > self.capacity:
                return None
            self.in_flight += len(jobs)
            handles = [Handle(loop, queue, i) for i in range(len(jobs))]
            for handle, (ids, params) in zip(handles, jobs):
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

    def _deliver(self, handle: Handle, item: Output | Exception) -> None:
        if isinstance(item, Exception) or item.finish_reason:
            self._finish(handle)
        self._outbox[handle.loop].append((handle, item))

    def _flush(self) -> None:
        """Hand a step's outputs to the event loop in one wake-up, not one per token."""
        for loop, items in self._outbox.items():
            loop.call_soon_threadsafe(_put_all, items)
        self._outbox.clear()

    def _run(self) -> None:
        while True:
            idle = not self.engine.has_work()
            with self._lock:
                while not self._inbox and not self.engine.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            if idle:  # woken from idle: let requests sent at about the same time share one prefill
                time.sleep(self.GATHER_S)
            with self._lock:
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
            self._flush()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, handle, ids, params = command
            if handle.done:
                return
            try:
                handle.rid = self.engine.add(ids, params, callback=lambda out, h=handle: self._deliver(h, out))
                handle.request = self.engine.waiting[-1]
            except ValueError as e:  # validated before, so this is a bug or a race: tell the client
                self._deliver(handle, e)
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


def _put_all(items: list) -> None:
    for handle, item in items:
        handle.queue.put_nowait((handle.index, item))
