"""The noisy benchmark runner: one result per method, shared features, no settings leaking between methods."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from softpatch.config import SoftPatchConfig
from softpatch.errors import DataError, SoftPatchError
from softpatch.evaluation.benchmark import (
    BENCHMARK_METHODS,
    PROTOCOLS,
    BenchmarkReport,
    MethodResult,
    protocol_keep,
    run_benchmark,
)
from softpatch.io.datasets import load_mvtec, make_noisy_split
from softpatch.method.model import SoftPatch


class ModelRecorder:
    """Records, for every model the benchmark scores with, its config and memory-bank weights."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[dict] = []
        self.embed_calls = 0
        original_score, original_embed = SoftPatch.score, SoftPatch.embed

        def score(model: SoftPatch, *args, **kwargs):
            bank = model.build_memory_bank()
            self.seen.append(
                {
                    "config": model.config,
                    "weights": bank.weights.clone(),
                    "removed": int(model.removed_mask_.sum()),
                }
            )
            return original_score(model, *args, **kwargs)

        def embed(model: SoftPatch, *args, **kwargs):
            self.embed_calls += 1
            return original_embed(model, *args, **kwargs)

        monkeypatch.setattr(SoftPatch, "score", score)
        monkeypatch.setattr(SoftPatch, "embed", embed)


def _run(mvtec_root: Path, config: SoftPatchConfig, methods: list[str], **kwargs) -> BenchmarkReport:
    torch.manual_seed(0)
    options = {"noise": 0.2, "protocol": "overlap", "seed": 0, **kwargs}
    return run_benchmark(mvtec_root, methods=methods, config=config, **options)


@pytest.fixture(scope="module")
def full_report(mvtec_root: Path, small_config: SoftPatchConfig) -> BenchmarkReport:
    return _run(mvtec_root, small_config, list(BENCHMARK_METHODS))


def test_one_result_per_method_with_metrics_in_range(
    full_report: BenchmarkReport, small_config: SoftPatchConfig
) -> None:
    methods = list(BENCHMARK_METHODS)
    report = full_report
    assert [r.method for r in report.results] == methods
    for result in report.results:
        assert isinstance(result, MethodResult)
        for value in (result.image_auroc, result.pixel_auroc, result.aupro):
            assert value is not None and 0.0 <= value <= 1.0
        assert result.fit_s >= 0 and result.score_s >= 0
    summary = report.config
    assert (summary["n_train"], summary["n_injected"], summary["n_test"]) == (14, 2, {"overlap": 10})
    assert summary["protocols"] == ["overlap"] and {r.protocol for r in report.results} == {"overlap"}
    assert summary["backbone"] == "resnet18" and summary["weights"] == "random" and summary["device"] == "cpu"
    assert summary["tau"] == small_config.tau and summary["crop"] == 64
    document = json.loads(json.dumps(report.to_dict()))
    assert [r["method"] for r in document["results"]] == methods
    table = report.table().splitlines()
    assert len(table) == 2 + len(methods) and table[0].split()[0] == "method"


def test_softpatch_beats_patchcore_on_a_contaminated_training_set(full_report: BenchmarkReport) -> None:
    # Overlap protocol: two blob test images are also in training. PatchCore memorises their blobs,
    # SoftPatch removes them (the paper's headline result, on the tiny synthetic part).
    by_method = {r.method: r for r in full_report.results}
    patchcore, softpatch = by_method["patchcore"], by_method["softpatch-lof"]
    assert softpatch.image_auroc > patchcore.image_auroc
    assert softpatch.pixel_auroc > patchcore.pixel_auroc + 0.2
    assert softpatch.aupro > patchcore.aupro + 0.2


def test_features_are_extracted_once_for_all_methods(
    monkeypatch: pytest.MonkeyPatch, mvtec_root: Path, small_config: SoftPatchConfig
) -> None:
    recorder = ModelRecorder(monkeypatch)
    _run(mvtec_root, small_config, ["patchcore", "softpatch-nearest", "softpatch-lof"])
    assert recorder.embed_calls == 2, "one pass over the training set and one over the test set"
    assert len(recorder.seen) == 3


@pytest.mark.parametrize(
    "order",
    [["patchcore", "softpatch-lof"], ["softpatch-lof", "patchcore"], ["patchcore", "softpatch-gaussian", "patchcore"]],
    ids=lambda o: "-then-".join(o),
)
def test_method_settings_do_not_leak_into_the_next(
    monkeypatch: pytest.MonkeyPatch, mvtec_root: Path, small_config: SoftPatchConfig, order: list[str]
) -> None:
    recorder = ModelRecorder(monkeypatch)
    _run(mvtec_root, small_config, order)
    assert len(recorder.seen) == len(order)
    for method, seen in zip(order, recorder.seen, strict=True):
        if method == "patchcore":
            assert seen["config"].discriminator == "none"
            assert torch.all(seen["weights"] == 1) and seen["removed"] == 0
        else:
            assert seen["config"].discriminator == BENCHMARK_METHODS[method]["discriminator"]
            assert seen["config"].soft_weight is True
            assert not torch.all(seen["weights"] == 1), f"{method} keeps its soft weights"
            assert seen["removed"] > 0
        assert seen["config"].tau == small_config.tau and seen["config"].crop == small_config.crop


def test_user_settings_apply_to_every_softpatch_method(
    monkeypatch: pytest.MonkeyPatch, mvtec_root: Path, small_config: SoftPatchConfig
) -> None:
    recorder = ModelRecorder(monkeypatch)
    _run(mvtec_root, small_config.replace(soft_weight=False, tau=0.05), ["softpatch-nearest", "softpatch-lof"])
    for seen in recorder.seen:
        assert seen["config"].soft_weight is False and torch.all(seen["weights"] == 1)
        assert seen["config"].tau == 0.05


def test_no_overlap_removes_injected_images_from_the_test_set(mvtec_root: Path, small_config: SoftPatchConfig) -> None:
    report = _run(mvtec_root, small_config, ["softpatch-nearest"], protocol="no-overlap")
    assert report.config["n_test"] == {"no-overlap": 10 - 2} and report.config["protocols"] == ["no-overlap"]
    assert [r.protocol for r in report.results] == ["no-overlap"]


def test_both_protocols_from_one_fit_equal_each_protocol_alone(
    monkeypatch: pytest.MonkeyPatch, mvtec_root: Path, small_config: SoftPatchConfig
) -> None:
    methods = ["patchcore", "softpatch-lof"]
    recorder = ModelRecorder(monkeypatch)
    both = _run(mvtec_root, small_config, methods, protocol="both")
    assert len(recorder.seen) == len(methods), "each method is fitted and scored once for both protocols"
    assert both.config["protocols"] == ["overlap", "no-overlap"]
    assert both.config["n_test"] == {"overlap": 10, "no-overlap": 8}
    assert [(r.method, r.protocol) for r in both.results] == [(m, p) for m in methods for p in PROTOCOLS]
    for protocol in PROTOCOLS:
        alone = _run(mvtec_root, small_config, methods, protocol=protocol)
        shared = [r for r in both.results if r.protocol == protocol]
        for a, b in zip(alone.results, shared, strict=True):
            assert (a.method, a.image_auroc, a.pixel_auroc, a.aupro) == (
                b.method,
                b.image_auroc,
                b.pixel_auroc,
                b.aupro,
            )
    by = {(r.method, r.protocol): r for r in both.results}
    # The overlap test set holds the two blob images PatchCore memorised: they score low there, so PatchCore
    # looks worse under overlap than under no-overlap, which leaves them out.
    assert by["patchcore", "no-overlap"].pixel_auroc > by["patchcore", "overlap"].pixel_auroc


def test_protocol_keep_and_unknown_protocol(mvtec_root: Path, small_config: SoftPatchConfig) -> None:
    split = make_noisy_split(load_mvtec(mvtec_root), noise=0.2, overlap=True, seed=0)
    keep = protocol_keep(split, "no-overlap")
    assert keep.shape == (10,) and int(keep.sum()) == 8
    assert {r.path for r, k in zip(split.test, keep, strict=True) if not k} == {r.path for r in split.injected}
    assert protocol_keep(split, "overlap").all()
    with pytest.raises(SoftPatchError, match="unknown protocol"):
        protocol_keep(split, "sideways")
    with pytest.raises(SoftPatchError, match="unknown protocol"):
        _run(mvtec_root, small_config, ["patchcore"], protocol="sideways")


def test_unknown_or_no_method(mvtec_root: Path, small_config: SoftPatchConfig) -> None:
    with pytest.raises(SoftPatchError, match="unknown methods"):
        _run(mvtec_root, small_config, ["patchcore", "isolation-forest"])
    with pytest.raises(SoftPatchError, match="no methods"):
        _run(mvtec_root, small_config, [])


def test_dataset_problems_are_clear_errors(tmp_path: Path, mvtec_root: Path, small_config: SoftPatchConfig) -> None:
    with pytest.raises(DataError):
        _run(tmp_path / "missing", small_config, ["patchcore"])
    with pytest.raises(DataError, match="noise"):
        _run(mvtec_root, small_config, ["patchcore"], noise=5.0)
    only_good = tmp_path / "only_good"
    shutil.copytree(mvtec_root / "train", only_good / "train")
    shutil.copytree(mvtec_root / "test" / "good", only_good / "test" / "good")
    with pytest.raises(SoftPatchError):
        _run(only_good, small_config, ["patchcore"], noise=0.0)


def test_without_masks_pixel_metrics_are_none(tmp_path: Path, mvtec_root: Path, small_config: SoftPatchConfig) -> None:
    root = tmp_path / "no_masks"
    shutil.copytree(mvtec_root, root)
    shutil.rmtree(root / "ground_truth")
    report = _run(root, small_config, ["softpatch-nearest"], noise=0.0)
    (result,) = report.results
    assert result.pixel_auroc is None and result.aupro is None
    assert 0.0 <= result.image_auroc <= 1.0 and np.isfinite(result.image_auroc)
