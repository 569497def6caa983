"""Dynamic micro-batching: images from concurrent requests share one backbone pass.

Why: a backbone pass over 8 images costs far less than 8 passes over one (the weights are read
once, the matrix products are wider), so a server that scores each request alone is slower than
``padim predict`` on a folder. Each model gets one worker thread (model work never runs on the event
loop, and one model never runs two batches at once); requests put their images in a bounded queue
and wait on futures. The worker takes the oldest image, then waits at most ``max_wait_s`` after
that image arrived for more, up to ``max_batch``: under load batches fill at once (no added
latency), alone an image waits a few milliseconds at most.

The queue is bounded (``max_queue`` images): a full queue refuses new work at once (``QueueFull``,
answered 503 with Retry-After) instead of growing latency and memory without limit. ``close``
refuses new work and returns once every queued image has been scored: nothing accepted is dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Deque, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The queue holds ``max_queue`` images already: try again later."""


class BatcherClosed(Exception):
    """The batcher stopped taking work (the server is shutting down)."""


class MicroBatcher:
    """Scores items with ``run_batch(items) -> results`` (same length, same order) in batches.

    run_batch: called in the worker thread only, with 1..max_batch items.
    on_batch: called after each batch with (batch size, seconds), e.g. for metrics.
    warmup: called once in the worker thread before it takes work (first passes are slow: memory
            allocation, kernel selection); ``ready`` is set when it returns.
    """

    def __init__(self, run_batch: Callable[[List[T]], Sequence[R]], max_batch: int = 16, max_wait_s: float = 0.008,
                 max_queue: int = 64, name: str = "model", on_batch: Optional[Callable[[int, float], None]] = None,
                 warmup: Optional[Callable[[], None]] = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._run_batch, self._on_batch, self._warmup = run_batch, on_batch, warmup
        self._queue: Deque[Tuple[T, Future, float]] = deque()  # (item, its future, arrival time)
        self._pending = 0  # queued + being scored
        self._closed = False
        self._cond = threading.Condition()
        self.ready = threading.Event()
        self.warmup_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name=f"padim-batcher-{name}", daemon=True)

    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        """Images queued or being scored."""
        return self._pending

    def submit(self, items: Sequence[T]) -> List[Future]:
        """Queues ``items`` together (all or none) -> one future per item. Raises QueueFull when they
        do not fit, BatcherClosed after ``close``."""
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            if self._pending + len(items) > self.max_queue:
                raise QueueFull(f"{self._pending} images are waiting (the queue holds {self.max_queue})")
            futures = []
            for item in items:
                future: Future = Future()
                self._queue.append((item, future, now))
                futures.append(future)
            self._pending += len(items)
            self._cond.notify()
        return futures

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuses new work; returns when every queued item is scored (or after ``timeout`` s)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next_batch(self) -> List[Tuple[T, Future, float]]:
        """Blocks for the oldest item, then gathers more until max_batch or its deadline; [] when
        closed and drained."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = self._queue[0][2] + self.max_wait_s  # counted from the oldest image's arrival
            while len(self._queue) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        if self._warmup is not None:
            try:
                self._warmup()
            except BaseException as exc:  # reported by the health route; the server does not start
                self.warmup_error = exc
                with self._cond:
                    self._closed = True
        self.ready.set()
        while True:
            batch = self._next_batch()
            if not batch:
                return
            started = time.perf_counter()
            try:
                results = self._run_batch([item for item, _, _ in batch])
                for (_, future, _), result in zip(batch, results):
                    future.set_result(result)
            except BaseException as exc:  # handed to every waiting request; the worker carries on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
            finally:
                with self._cond:
                    self._pending -= len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch), time.perf_counter() - started)
