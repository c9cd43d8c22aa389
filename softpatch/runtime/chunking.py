"""Running position-wise work in chunks that shrink, then move to the CPU, when the GPU runs out of memory."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def run_in_chunks(total: int, step: int, device: torch.device, work: Callable[[int, int, torch.device], None]) -> None:
    """Call ``work(start, stop, device)`` over ``[0, total)`` in chunks of at most ``step``.

    On a CUDA out-of-memory error the failed chunk is retried at half the size; a chunk of one that
    still does not fit moves the rest of the work to the CPU, with a warning. Chunks already done are
    kept (``work`` writes its results itself), so no work is lost.
    """
    start = 0
    step = max(1, step)
    while start < total:
        stop = min(total, start + step)
        try:
            work(start, stop, device)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda":
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if step > 1:
                step = max(1, step // 2)
            else:
                warnings.warn("the GPU ran out of memory: continuing on the CPU", stacklevel=2)
                device = torch.device("cpu")
            continue
        start = stop
