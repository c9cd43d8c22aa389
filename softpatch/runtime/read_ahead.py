"""Reading the next chunk of a feature store while the current one is worked on."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Block = TypeVar("Block")


class ReadAhead(Generic[Block]):
    """``read(start, stop)`` over ``[0, total)``, with the chunk after each call read by a background thread.

    Chunked work over a store alternates a disk read and a computation; with the store not in the page
    cache (10,000 images make 15 GB) the read is mostly waiting for the disk, which the background read
    overlaps with the work on the current chunk. The blocks are the ones ``read`` returns, so results do
    not change. A call for another range than the one read ahead (a chunk halved after a GPU ran out of
    memory) reads at once. At most one chunk beyond the caller's is held: count it in memory budgets.
    Use as a context manager, or ``close`` it.
    """

    def __init__(self, read: Callable[[int, int], Block], total: int) -> None:
        self.read = read
        self.total = total
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softpatch-read-ahead")
        self._next: tuple[int, int, Future[Block]] | None = None

    def __call__(self, start: int, stop: int) -> Block:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[:2] == (start, stop):
            block = ahead[2].result()
        else:
            if ahead is not None and not ahead[2].cancel():
                ahead[2].exception()  # let it finish and drop it: never two chunks read ahead at once
            block = self.read(start, stop)
        if stop < self.total:
            following = (stop, min(self.total, stop + (stop - start)))
            self._next = (*following, self._pool.submit(self.read, *following))
        return block

    def close(self) -> None:
        self._next = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead[Block]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
