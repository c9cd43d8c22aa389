"""Blocked vs exact greedy coreset (a script, not a test): accuracy where both run, and cost as patches grow.

Issue 13 asks for a coreset whose cost grows about linearly with the patches and that keeps image and
pixel AUROC within 0.005 of the exact greedy coreset where both can run. This script measures both.

Accuracy: for each category of ``../shared/data`` the paper's noisy split (noise 0.1, split seed 0) is
fitted once with the noise sweep's model (mobilenetv1_100, real ImageNet weights, default settings;
features cached like ``noise_sweep.py``). Then for each coreset seed the memory bank is built with the
exact greedy coreset and with the blocked one at several block sizes (``coreset_exact_rows=1`` forces the
blocked path), and the test set (overlap protocol) is scored. Printed: image and pixel AUROC per setting
(median over seeds), the median of the paired differences blocked - exact, and how far two exact coresets
of different seeds differ from each other (the noise floor of any comparison).

Cost: the greedy coreset at a 10% ratio on growing sets of real projected patches (the category's patches,
repeated with small jitter beyond their count): point-to-centre distance evaluations per patch (a machine-
independent cost) and seconds, exact vs blocked at the default block size. The exact's evaluations per
patch grow with the patches (quadratic total); the blocked's stay flat (linear total).

    .venv/bin/python benchmarks/coreset_scale.py                        # both parts, about 10 minutes
    .venv/bin/python benchmarks/coreset_scale.py --seeds 0 1 2 3 4 --blocks 16384 65536
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch
sys.path.insert(0, str(ROOT / "benchmarks"))

import noise_sweep  # noqa: E402 - the sweep's data, model and metrics, shared

EXACT = 2**40  # coreset_exact_rows that never blocks


def _accuracy(name: str, seeds: list[int], blocks: list[int], noise: float, cache: Path) -> list[dict[str, Any]]:
    from softpatch.io.datasets import make_noisy_split
    from softpatch.method.model import Embeddings, SoftPatch

    dataset = noise_sweep.load_category(name)
    rows, features, all_masks = noise_sweep.category_features(name, dataset, cache)
    split = make_noisy_split(dataset, noise=noise, overlap=True, seed=0)
    test_index = {r.path: i for i, r in enumerate(dataset.test.records)}
    masks = all_masks[[test_index[r.path] for r in split.test]]
    labels = np.array([r.label for r in split.test])
    config = noise_sweep.model_config(0)
    key = config.feature_key()
    train = Embeddings(features[[rows[r.path] for r in split.train]], [str(r.path) for r in split.train], [], key)
    test = Embeddings(features[[rows[r.path] for r in split.test]], [str(r.path) for r in split.test], [], key)
    base = SoftPatch(config).fit_embeddings(train, build_memory_bank=False)
    kept = int((~base.removed_mask_).sum())
    out = []
    settings = [("exact", EXACT, 65_536)] + [(f"blocked {b:,}", 1, b) for b in blocks if b < kept]
    for seed in seeds:
        for label, exact_rows, block_rows in settings:
            model = base.variant(seed=seed, coreset_exact_rows=exact_rows, coreset_block_rows=block_rows)
            start = time.perf_counter()
            bank = model.build_memory_bank()
            seconds = time.perf_counter() - start
            scores = model.score(test, with_maps=True)
            metrics = noise_sweep._metrics(labels, scores.image_scores, masks, scores.anomaly_maps)
            plan = bank.coreset_plan
            out.append(
                {
                    "category": name,
                    "kept": kept,
                    "seed": seed,
                    "setting": label,
                    "blocks": plan.blocks if plan is not None else 1,
                    "rows": int(bank.features.shape[0]),
                    "seconds": seconds,
                    **metrics,
                }
            )
            noise_sweep._log(
                f"{name} seed {seed} {label}: image {metrics['image_auroc']:.4f} pixel {metrics['pixel_auroc']:.4f} "
                f"({out[-1]['blocks']} blocks, {seconds:.1f} s)"
            )
    return out


def _accuracy_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| category | kept patches | setting | blocks | image AUROC | pixel AUROC | image - exact | pixel - exact "
        "| coreset (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["category"] for r in results):
        rows = [r for r in results if r["category"] == name]
        exact = {r["seed"]: r for r in rows if r["setting"] == "exact"}
        for setting in dict.fromkeys(r["setting"] for r in rows):
            these = [r for r in rows if r["setting"] == setting]
            med = {m: statistics.median(r[m] for r in these) for m in ("image_auroc", "pixel_auroc", "seconds")}
            gaps = {
                m: statistics.median(r[m] - exact[r["seed"]][m] for r in these) for m in ("image_auroc", "pixel_auroc")
            }
            lines.append(
                f"| {name} | {these[0]['kept']:,} | {setting} | {these[0]['blocks']} | {med['image_auroc']:.4f} "
                f"| {med['pixel_auroc']:.4f} | {gaps['image_auroc']:+.4f} | {gaps['pixel_auroc']:+.4f} "
                f"| {med['seconds']:.1f} |"
            )
        if len(exact) > 1:
            spread = {
                m: max(r[m] for r in exact.values()) - min(r[m] for r in exact.values())
                for m in ("image_auroc", "pixel_auroc")
            }
            lines.append(
                f"| {name} | | exact, seed to seed (max - min) | | {spread['image_auroc']:.4f} "
                f"| {spread['pixel_auroc']:.4f} | | | |"
            )
    return "\n".join(lines)


def _cost(name: str, sizes: list[int], block_rows: int, exact_max: int, cache: Path) -> str:
    import torch

    from softpatch.method.coreset import DistanceCounter, plan_coreset, random_projection, select_rows

    dataset = noise_sweep.load_category(name)
    _, features, _ = noise_sweep.category_features(name, dataset, cache)
    flat = features.reshape(-1, features.shape[-1])
    projected = random_projection(flat, 128, seed=0)
    rng = np.random.default_rng(0)
    scale = float(np.std(projected)) * 0.05
    lines = [
        f"\nGreedy coreset cost on real projected patches of {name} (10% ratio, blocks of {block_rows:,}):\n",
        "| patches | coreset | blocks | distance evaluations | per patch | seconds | µs per patch |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for m in sizes:
        repeats = -(-m // projected.shape[0])
        points = np.concatenate(
            [projected + rng.normal(0, scale if r else 0, projected.shape).astype(np.float32) for r in range(repeats)]
        )[:m]
        for label, exact_rows in (("exact", EXACT), ("blocked", 1)):
            if label == "exact" and m > exact_max:
                continue
            plan = plan_coreset(
                m,
                method="greedy",
                ratio=0.1,
                row_bytes=1,
                budget_bytes=EXACT,
                exact_rows=exact_rows,
                block_rows=block_rows,
            )
            if label == "blocked" and plan.method != "blocked":
                continue
            counter = DistanceCounter()
            start = time.perf_counter()
            select_rows(points, np.arange(m, dtype=np.int64), plan, seed=0, counter=counter)
            seconds = time.perf_counter() - start
            lines.append(
                f"| {m:,} | {label} | {plan.blocks} | {counter.evaluations:.3e} | {counter.evaluations / m:,.0f} "
                f"| {seconds:.1f} | {seconds / m * 1e6:.1f} |"
            )
            noise_sweep._log(lines[-1])
        del points
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["magnetic_tile", "battery_weld"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--blocks", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--sizes", nargs="+", type=int, default=[65_536, 131_072, 262_144, 524_288, 1_048_576])
    parser.add_argument("--exact-max", type=int, default=262_144, help="largest set the exact coreset runs on")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "softpatch_sweep")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    from softpatch.config import DEFAULTS

    torch.set_num_threads(args.threads)
    if not noise_sweep.MOBILENET.exists():
        raise SystemExit(f"weights not found: {noise_sweep.MOBILENET} (set SOFTPATCH_WEIGHTS)")
    if not args.skip_accuracy:
        results = [
            r for name in args.categories for r in _accuracy(name, args.seeds, args.blocks, args.noise, args.cache)
        ]
        print(f"\nBlocked vs exact greedy coreset, noise {args.noise:g}, medians over seeds {args.seeds}:\n")
        print(_accuracy_table(results))
    if not args.skip_cost:
        print(_cost(args.categories[0], args.sizes, DEFAULTS["coreset_block_rows"], args.exact_max, args.cache))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
