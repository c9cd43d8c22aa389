"""The paper's noisy benchmark (seeds/000 sec. 4.1): inject anomalies into training, compare methods."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from softpatch.config import SoftPatchConfig
from softpatch.errors import SoftPatchError
from softpatch.evaluation.metrics import aupro, image_auroc, pixel_auroc
from softpatch.evaluation.protocols import PROTOCOL_CHOICES, PROTOCOLS
from softpatch.io.datasets import ImageRecord, NoisySplit, load_mvtec, make_noisy_split
from softpatch.io.images import ImageTransform, load_mask_for_crop
from softpatch.method.model import SoftPatch
from softpatch.runtime.progress import ProgressCallback, report

# Benchmark method name -> the config changes that make it.
BENCHMARK_METHODS: dict[str, dict[str, object]] = {
    "patchcore": {"discriminator": "none", "soft_weight": False},
    "softpatch-nearest": {"discriminator": "nearest"},
    "softpatch-gaussian": {"discriminator": "gaussian"},
    "softpatch-lof": {"discriminator": "lof"},
    "softpatch-fusion": {"discriminator": "fusion"},
    "softpatch-auto": {"discriminator": "auto"},  # LOF, with k raised when many images look defective
}


@dataclass(frozen=True)
class MethodResult:
    """One method under one protocol: AUROCs and AUPRO (higher = better, in [0, 1]) and its seconds."""

    method: str
    protocol: str  # "overlap": the injected images stay in the test set; "no-overlap": they leave it
    image_auroc: float
    pixel_auroc: float | None  # None when the test set has no masks
    aupro: float | None
    fit_s: float  # training feature extraction + denoising + coreset
    score_s: float  # test feature extraction + nearest-neighbour search + maps


@dataclass(frozen=True)
class BenchmarkReport:
    """The benchmark's set-up (data, noise, split sizes, backbone, device) and one result per method and protocol."""

    config: dict[str, object]
    results: list[MethodResult]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values (what ``softpatch bench --json`` prints)."""
        return {"config": self.config, "results": [asdict(r) for r in self.results]}

    def table(self) -> str:
        """The results as a fixed-width text table, one row per method and protocol."""
        header = (
            f"{'method':<20} {'protocol':<10} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} "
            f"{'fit s':>7} {'score s':>8}"
        )
        lines = [header, "-" * len(header)]

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        for r in self.results:
            lines.append(
                f"{r.method:<20} {r.protocol:<10} {fmt(r.image_auroc):>11} {fmt(r.pixel_auroc):>11} {fmt(r.aupro):>7} "
                f"{r.fit_s:>7.1f} {r.score_s:>8.1f}"
            )
        return "\n".join(lines)


def ground_truth_masks(records: Sequence[ImageRecord], transform: ImageTransform) -> np.ndarray | None:
    """Bool ``(n, crop, crop)`` ground-truth masks of labelled test ``records`` in ``transform``'s geometry
    (True = defect pixel); all False for good images; None when an anomalous image has no mask."""
    if any(record.label == 1 and record.mask_path is None for record in records):
        return None
    # A good image's mask is all False whatever file it names.
    return np.stack([load_mask_for_crop(r.mask_path if r.label else None, transform) for r in records])


def protocol_metrics(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    keep: np.ndarray,
) -> dict[str, float | None]:
    """Image AUROC, pixel AUROC and AUPRO over the test images where ``keep`` ``(n,)`` is True.

    ``labels`` ``(n,)``, ``image_scores`` ``(n,)``, ``masks``/``maps`` ``(n, crop, crop)`` or None (then the
    pixel metrics are None). One scoring of the overlap test set serves both protocols: the no-overlap test
    set is the same images without the injected ones.
    """
    pixel = pro = None
    if masks is not None and maps is not None:
        pixel = pixel_auroc(masks[keep], maps[keep])
        pro = aupro(masks[keep], maps[keep])
    return {"image_auroc": image_auroc(labels[keep], image_scores[keep]), "pixel_auroc": pixel, "aupro": pro}


def protocol_keep(split: NoisySplit, protocol: str) -> np.ndarray:
    """``(n_test,)`` bool over ``split.test`` of an overlap split: the images the protocol tests on."""
    if protocol not in PROTOCOLS:
        raise SoftPatchError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOL_CHOICES)}")
    if protocol == "overlap":
        return np.ones(len(split.test), dtype=bool)
    injected = set(split.injected)
    return np.array([r not in injected for r in split.test], dtype=bool)


def run_benchmark(
    data_dir: str | Path,
    *,
    noise: float,
    seed: int,
    methods: list[str],
    config: SoftPatchConfig,
    protocol: str = "both",
    progress: ProgressCallback | None = None,
) -> BenchmarkReport:
    """Fit each method on the same noisy training split and evaluate it under ``protocol``.

    ``protocol``: "overlap", "no-overlap" or "both" (``PROTOCOL_CHOICES``). Both protocols share the
    training set, so each method is fitted once and scored once on the overlap test set; the no-overlap
    figures leave the injected images out of that scoring.

    Features are extracted once and shared (every method differs only after feature extraction);
    each method's ``fit_s`` and ``score_s`` include that shared extraction time, so the columns are
    what a single fit of that method would cost.
    """
    if protocol not in PROTOCOL_CHOICES:
        raise SoftPatchError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOL_CHOICES)}")
    unknown = [m for m in methods if m not in BENCHMARK_METHODS]
    if unknown:
        raise SoftPatchError(f"unknown methods {unknown}; choose from {', '.join(BENCHMARK_METHODS)}")
    if not methods:
        raise SoftPatchError("no methods to benchmark")
    protocols = PROTOCOL_CHOICES[protocol]
    dataset = load_mvtec(data_dir)
    split = make_noisy_split(dataset, noise=noise, overlap=True, seed=seed)
    keeps = {p: protocol_keep(split, p) for p in protocols}
    labels = np.array([r.label for r in split.test])
    for p, keep in keeps.items():
        if len(set(labels[keep].tolist())) < 2:
            raise SoftPatchError(f"the {p} test split needs both good and anomalous images")

    first = SoftPatch(config.replace(**BENCHMARK_METHODS[methods[0]]))
    report(progress, 0.0, f"features: training set of {len(split.train)} images")
    start = time.perf_counter()
    embeddings = first.embed(split.train)
    train_features_s = time.perf_counter() - start
    start = time.perf_counter()
    test_embeddings = first.embed(split.test)
    test_features_s = time.perf_counter() - start
    masks = ground_truth_masks(split.test, first.transform_)

    results = []
    base: SoftPatch | None = None
    for i, method in enumerate(methods):
        report(progress, i / len(methods), f"scoring: {method}")
        start = time.perf_counter()
        if base is None:
            base = first.fit_embeddings(embeddings)
            model = base
        else:
            # Start from the user's settings each time, so one method's changes never leak into the next.
            settings = {
                "soft_weight": config.soft_weight,
                "discriminator": config.discriminator,
                **BENCHMARK_METHODS[method],
            }
            model = base.variant(**settings)
        model.build_memory_bank()
        fit_s = train_features_s + time.perf_counter() - start
        start = time.perf_counter()
        scores = model.score(test_embeddings, with_maps=masks is not None)
        score_s = test_features_s + time.perf_counter() - start
        for p in protocols:
            values = protocol_metrics(labels, scores.image_scores, masks, scores.anomaly_maps, keeps[p])
            results.append(MethodResult(method, p, **values, fit_s=fit_s, score_s=score_s))
    report(progress, 1.0, "scoring: done")
    summary = {
        "data_dir": str(data_dir),
        "noise": noise,
        "protocols": list(protocols),
        "seed": seed,
        "n_train": len(split.train),
        "n_injected": len(split.injected),
        "n_test": {p: int(keep.sum()) for p, keep in keeps.items()},
        "backbone": config.backbone,
        "weights": config.weights_source,
        "device": str(first.device_),
        **{k: v for k, v in config.to_dict().items() if k in ("tau", "lof_k", "coreset_ratio", "resize", "crop")},
    }
    return BenchmarkReport(summary, results)
