"""Writing to a feature store on a background thread while the next batch is computed."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# Batches of features a fit lets wait for the store beside the one being computed (counted in its memory estimate).
STORE_WRITES_PENDING = 1


class WriteBehind:
    """``write(*args)`` run in order by one background thread, the caller going on at once.

    Filling a store writes 3 MB per image at 224 px; at 10,000 images the kernel's dirty-page throttling makes
    those writes about a quarter of a fast backbone's time, which the background thread overlaps with the
    next batch's features. At most ``pending`` writes wait (each holds its batch): one more waits for the
    oldest. A write's error reaches the caller at the next call or at ``close``. Use as a context manager:
    leaving it waits for every write, so the store is complete afterwards.
    """

    def __init__(self, write: Callable[..., None], pending: int) -> None:
        if pending < 1:
            raise ValueError("pending must be at least 1")
        self.write = write
        self.pending = pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softpatch-write-behind")
        self._queued: deque[Future[None]] = deque()

    def __call__(self, *args: Any) -> None:
        while len(self._queued) >= self.pending:
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(self.write, *args))

    def close(self) -> None:
        """Wait for every write; the first error among them is raised."""
        try:
            while self._queued:
                self._queued.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: let the queued writes finish (the store stays consistent), keep the first error.
        for future in self._queued:
            future.exception()
        self._queued.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
