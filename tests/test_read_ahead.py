"""Reading a store's next chunk in the background: the same blocks, the next one read before it is asked for."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from softpatch.io.feature_store import FeatureStore
from softpatch.method.discriminators import compute_neighbours, reference_images
from softpatch.runtime.read_ahead import ReadAhead

CPU = torch.device("cpu")


class _Recorder:
    """A read function that records each call's range and thread, and how many run at once."""

    def __init__(self, background_delay: float = 0.0) -> None:
        self.background_delay = background_delay  # seconds a background read takes: overlaps become visible
        self.calls: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.called = threading.Event()  # set by the second call: the first read ahead

    def __call__(self, start: int, stop: int) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.calls.append((start, stop, threading.current_thread().name))
            if len(self.calls) == 2:
                self.called.set()
        try:
            if threading.current_thread() is not threading.main_thread():
                time.sleep(self.background_delay)
            return np.arange(start, stop)
        finally:
            with self.lock:
                self.running -= 1


def test_each_next_chunk_is_read_in_the_background_before_it_is_asked_for() -> None:
    read = _Recorder()
    with ReadAhead(read, 10) as ahead:
        first = ahead(0, 3)
        # The chunk after (0, 3) is read by the background thread, before anyone asks for it.
        assert read.called.wait(timeout=30)
        assert read.calls[-1][:2] == (3, 6) and read.calls[-1][2].startswith("softpatch-read-ahead")
        blocks = [first, ahead(3, 6), ahead(6, 9), ahead(9, 10)]
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(10))
    main = threading.current_thread().name
    assert [c[:2] for c in read.calls if c[2] == main] == [(0, 3)], "only the first chunk was read by the caller"
    assert read.most_running == 1, "at most one chunk beyond the caller's"


def test_a_chunk_other_than_the_one_read_ahead_is_read_right_after_the_read_ahead_ends() -> None:
    read = _Recorder(background_delay=0.3)
    with ReadAhead(read, 12) as ahead:
        ahead(0, 4)
        halved = ahead(4, 6)  # as run_in_chunks asks after a GPU ran out of memory: (4, 8) was read ahead
        rest = [ahead(6, 8), ahead(8, 12)]
    np.testing.assert_array_equal(halved, np.arange(4, 6))
    np.testing.assert_array_equal(np.concatenate(rest), np.arange(6, 12))
    main = threading.current_thread().name
    assert (4, 6, main) in read.calls
    assert read.most_running == 1, "the chunk out of turn waited for the slow read ahead of (4, 8) to end"


def test_an_error_in_the_background_read_reaches_the_caller() -> None:
    def read(start: int, stop: int) -> np.ndarray:
        if start >= 4:
            raise OSError("the disk went away")
        return np.arange(start, stop)

    with ReadAhead(read, 8) as ahead:
        ahead(0, 4)
        with pytest.raises(OSError, match="the disk went away"):
            ahead(4, 8)


@pytest.mark.parametrize("reference_size", [None, 12])
def test_neighbours_from_a_store_read_ahead_in_many_chunks_equal_those_from_memory(
    tmp_path: Path, reference_size: int | None
) -> None:
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(40, 36, 16, generator=generator)
    store = FeatureStore.create(tmp_path / "store", 40, 36, 16, dtype="float32")
    store.write_images(0, features)
    reference = None if reference_size is None else reference_images(40, reference_size, seed=0)
    # A budget of one byte: one position per chunk, so 36 chunks, each but the first read ahead.
    from_store = compute_neighbours(store, 5, device=CPU, budget_bytes=1, reference=reference, seed=0)
    in_memory = compute_neighbours(features, 5, device=CPU, budget_bytes=1, reference=reference, seed=0)
    assert torch.equal(torch.as_tensor(from_store.dist), torch.as_tensor(in_memory.dist))
    assert torch.equal(torch.as_tensor(from_store.index), torch.as_tensor(in_memory.index))
