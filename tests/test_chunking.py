"""GPU out-of-memory fallbacks, simulated on the CPU: smaller chunks, then the CPU, and no work lost."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from softpatch.config import SoftPatchConfig
from softpatch.method.model import SoftPatch
from softpatch.runtime.chunking import run_in_chunks

CUDA = torch.device("cuda")  # only compared by type: no GPU is touched


def test_an_oversized_chunk_is_retried_in_halves_and_every_position_is_done_once() -> None:
    done: list[tuple[int, int]] = []

    def work(start: int, stop: int, device: torch.device) -> None:
        if stop - start > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        done.append((start, stop))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shrinking the chunks is silent
        run_in_chunks(20, 16, CUDA, work)
    covered = [i for start, stop in done for i in range(start, stop)]
    assert covered == list(range(20))
    assert max(stop - start for start, stop in done) <= 3


def test_when_even_one_position_does_not_fit_the_rest_runs_on_the_cpu() -> None:
    calls: list[tuple[int, int, str]] = []

    def work(start: int, stop: int, device: torch.device) -> None:
        if device.type == "cuda" and start >= 4:  # the GPU fills up after the first chunks
            raise torch.cuda.OutOfMemoryError("simulated")
        calls.append((start, stop, device.type))

    with pytest.warns(UserWarning, match="continuing on the CPU"):
        run_in_chunks(10, 4, CUDA, work)
    assert calls[0] == (0, 4, "cuda"), "work done on the GPU before the failure is kept, not redone"
    assert [i for s, e, _ in calls for i in range(s, e)] == list(range(10))
    assert {d for s, _, d in calls if s >= 4} == {"cpu"}


def test_an_out_of_memory_error_on_the_cpu_is_not_swallowed() -> None:
    def work(start: int, stop: int, device: torch.device) -> None:
        raise torch.cuda.OutOfMemoryError("simulated")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_in_chunks(4, 2, torch.device("cpu"), work)


class _PickyBackbone(nn.Module):
    """Stands in for a feature extractor whose GPU fits at most ``limit`` images at once."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.limit = limit
        self.on_gpu = True
        self.batches: list[int] = []

    def to(self, *args: object, **kwargs: object) -> _PickyBackbone:
        self.on_gpu = False  # any move is the move to the CPU in these tests
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_gpu and x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("simulated")
        self.batches.append(x.shape[0])
        return x.flatten(1) * self.scale


def test_a_backbone_batch_that_does_not_fit_is_split_and_nothing_is_lost() -> None:
    model = SoftPatch(SoftPatchConfig(pretrained=False, device="cpu"))
    model.device_ = CUDA  # as if fitting on a GPU
    backbone = _PickyBackbone(limit=2)
    batch = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model._forward_with_fallback(backbone, batch)
    torch.testing.assert_close(out, batch.flatten(1) * 2)
    assert max(backbone.batches) <= 2 and sum(backbone.batches) == 7


def test_a_backbone_that_fits_no_image_moves_to_the_cpu_with_a_notice() -> None:
    model = SoftPatch(SoftPatchConfig(pretrained=False, device="cpu"))
    model.device_ = CUDA  # as if fitting on a GPU
    backbone = _PickyBackbone(limit=0)
    batch = torch.ones(3, 2, 1, 1)
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        out = model._forward_with_fallback(backbone, batch)
    torch.testing.assert_close(out, batch.flatten(1) * 2)
    assert model.device_.type == "cpu"
