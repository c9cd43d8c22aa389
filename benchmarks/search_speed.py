"""Nearest-neighbour search speed, bounded vs exhaustive, on real and random features (a script, not a test).

The speed benchmark (``speed.py``) times a random-init wide_resnet50_2, as the issue allows: weights do
not change the cost of the backbone. They do change how well the bounded search prunes, because real
features spread their variance over more directions. This script fits three models and times both CPU
searches on each one's memory bank with its own test features, in the same process:

- magnetic_tile, the speed workload (229 training images, 100 scored), random-init wide_resnet50_2;
- the same with the real ImageNet MobileNet v1 weights from ../shared/weights;
- battery_weld (its train/test split) with those weights.

It prints per-image search time (median of 3 runs after the first), the first search, the number of
principal directions the fit chose, the share of queries left to the full search,
and the largest distance difference from the exhaustive search's row measured directly.

    .venv/bin/python benchmarks/search_speed.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import DATA, FIT_PARAMS, MOBILENET, workload  # noqa: E402

from softpatch.config import SoftPatchConfig  # noqa: E402
from softpatch.io.datasets import scan_images  # noqa: E402
from softpatch.method.memory_bank import _BOUNDED_MIN_ROWS  # noqa: E402
from softpatch.method.model import SoftPatch  # noqa: E402

CPU = torch.device("cpu")
MOBILENET_PARAMS = {
    "backbone": "mobilenetv1_100",
    "weights": str(MOBILENET),
    "backbone_kwargs": {"bn_eps": 0.001, "pad_type": "same"},
}


def _cases() -> list[tuple[str, SoftPatchConfig, list[str], list[str]]]:
    train, score = workload(229)
    tile_train, tile_score = [str(p) for p in train], [str(p) for p in score]
    weld = DATA / "battery_weld"
    weld_train = [str(p) for p in scan_images(weld / "train").paths]
    weld_test = [str(p) for p in scan_images(weld / "test").paths]
    random_wrn = SoftPatchConfig(**FIT_PARAMS)
    real_mobilenet = SoftPatchConfig(**{**FIT_PARAMS, **MOBILENET_PARAMS, "pretrained": True})
    return [
        ("magnetic_tile, wide_resnet50_2 random", random_wrn, tile_train, tile_score),
        ("magnetic_tile, mobilenet real", real_mobilenet, tile_train, tile_score),
        ("battery_weld, mobilenet real", real_mobilenet, weld_train, weld_test),
    ]


def _time(bank, queries: torch.Tensor, method: str, n_images: int) -> tuple[float, float, object]:
    # The bounded index is timed as the fit built it, tuned on held-out training patches.
    start = time.perf_counter()
    match = bank.search(queries, CPU, method=method)
    first = time.perf_counter() - start
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        bank.search(queries, CPU, method=method)
        runs.append(time.perf_counter() - start)
    return first / n_images, statistics.median(runs) / n_images, match


def main() -> None:
    if not MOBILENET.exists():
        raise SystemExit(f"MobileNet weights not found: {MOBILENET}")
    header = f"{'case':38} {'bank':>6} {'exhaustive':>11} {'bounded':>9} {'first':>7} {'speed-up':>8} {'dim':>4} "
    header += f"{'full':>6} {'max diff':>9}"
    rows = []
    for name, config, train, test in _cases():
        print(f"fitting {name} ({len(train)} images) ...", file=sys.stderr, flush=True)
        model = SoftPatch(config).fit(train)
        embeddings = model.embed(test)
        bank = model.memory_bank_
        queries = embeddings.features.reshape(-1, embeddings.features.shape[-1])
        _, exhaustive_s, exhaustive = _time(bank, queries, "exhaustive", len(test))
        bounded_first, bounded_s, bounded = _time(bank, queries, "bounded", len(test))
        index = bank._indexes.get("bounded")  # absent: the bank is too small, "bounded" ran the exhaustive search
        direct = (bank.features[exhaustive.index] - queries).norm(dim=1)
        diff = float((bounded.distance - direct).abs().max())
        rows.append(
            f"{name:38} {len(bank):>6} {exhaustive_s:>9.4f} s {bounded_s:>7.4f} s {bounded_first:>5.3f} s "
            f"{exhaustive_s / bounded_s:>7.1f}x {getattr(index, 'dim_', '-')!s:>4} "
            f"{getattr(index, 'fallback_fraction_', 0.0):>6.2%} {diff:>9.1e}"
        )
    print("nearest-neighbour search per scored image (784 queries), CPU, median of 3 runs after the first")
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    print("first = the first bounded search; dim = principal directions the fit chose on held-out training patches;")
    print("full = queries left to the exhaustive search; max diff = largest |bounded distance - distance to the")
    print("exhaustive search's row, measured directly| (both are measured directly: float rounding only);")
    print(f"dim '-' = a bank under {_BOUNDED_MIN_ROWS} rows, which is always searched exhaustively")


if __name__ == "__main__":
    main()
