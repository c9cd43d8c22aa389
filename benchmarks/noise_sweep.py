"""Noise sweep (a script, not a test): every discriminator at several noise levels, both protocols, several seeds.

For each category of ``../shared/data`` (magnetic_tile, battery_weld), each seed and each noise level, the
paper's noisy split (seeds/000 sec. 4.1) injects ``int(noise * n_train)`` defective test images into the
training set; every method in ``softpatch.evaluation.benchmark.BENCHMARK_METHODS`` is fitted on it and scored on the test set
under both protocols:

- overlap: the injected images stay in the test set (the paper's protocol);
- no-overlap: the injected images leave the test set (what a model learned about "good").

Cheap by construction: every image's features are extracted once per category (a training split is a
selection of rows, so no image is read twice) and cached on disk; per (seed, noise) one fit computes the
neighbour cache that every discriminator re-uses (``SoftPatch.variant``); the overlap test set is scored
once and the no-overlap figures are the same scores without the injected images (the training set is the
same under both protocols). Results are written to a JSON file after every method, and a re-run skips what
is there, so an interrupted sweep resumes. Prints one table of medians over seeds.

Model: mobilenetv1_100 with the real ImageNet weights from ``../shared/weights`` at the default resize/crop.
magnetic_tile (not in MVTec layout): training = 209 ``MT_Free`` images, test = 40 other ``MT_Free`` images + 16 of
each defect class (80 defective, enough to inject 62 = 0.3 * 209 and keep 18 under no-overlap), all picked
evenly over the name order so that every capture session is in both (see ``load_category``). Masks are soft
0-255, cut at 128.

    nice -n 10 nohup .venv/bin/python benchmarks/noise_sweep.py --seeds 0 1 2 > sweep.log 2>&1 &
    .venv/bin/python benchmarks/noise_sweep.py --table-only        # the table of what is done so far
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the checkout; from a worktree under ../wt/, the one above it.
SHARED = next(
    (p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared").is_dir()), ROOT.parent / "shared"
)
DATA = Path(os.environ.get("SOFTPATCH_DATA", SHARED / "data"))
WEIGHTS = Path(os.environ.get("SOFTPATCH_WEIGHTS", SHARED / "weights"))
MOBILENET = WEIGHTS / "mobilenetv1_100_keras_in1k.safetensors"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "noise_sweep.json"
DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
TILE_TRAIN = 209
TILE_TEST_FREE = 40  # MT_Free images never used for training
TILE_TEST_PER_CLASS = 16
NOISES = (0.0, 0.1, 0.2, 0.3)
PROTOCOLS = ("overlap", "no-overlap")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
# Sweep-only candidates beside softpatch.evaluation.benchmark.BENCHMARK_METHODS: LOF with k above the number of look-alike defects.
EXTRA_METHODS: dict[str, dict[str, object]] = {"softpatch-lof-k32": {"discriminator": "lof", "lof_k": 32}}


def all_methods() -> dict[str, dict[str, object]]:
    from softpatch.evaluation.benchmark import BENCHMARK_METHODS

    return {**BENCHMARK_METHODS, **EXTRA_METHODS}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def model_config(seed: int) -> Any:
    from softpatch.config import SoftPatchConfig

    return SoftPatchConfig(
        backbone="mobilenetv1_100",
        weights=str(MOBILENET),
        backbone_kwargs={"bn_eps": 0.001, "pad_type": "same"},
        device="cpu",
        seed=seed,
    )


def _spread(items: list[Path], count: int) -> list[Path]:
    """``count`` of ``items`` at evenly spaced positions (first and last included)."""
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, min(count, len(items))).round()]


def load_category(name: str) -> Any:
    """The category as a ``softpatch.io.datasets.Dataset`` (magnetic_tile is laid out as one here)."""
    from softpatch.io.datasets import Dataset, ImageFolder, ImageRecord, load_mvtec

    if name != "magnetic_tile":
        return load_mvtec(DATA / name)
    tile = DATA / "magnetic_tile"

    def jpgs(folder: str) -> list[Path]:
        return sorted((tile / folder / "Imgs").glob("*.jpg"))

    free = jpgs("MT_Free")
    # Every 4th image for training, the ones two further on for testing: both spread over all seven capture
    # sessions (exp0-exp6, in name order). The first 209 by name are sessions 0-2 only, and a model trained
    # on them calls the other sessions' good images anomalous (clean image AUROC 0.38).
    train_pool, test_pool = free[0::4], free[2::4]
    train = [ImageRecord(p, relpath=f"MT_Free/{p.name}") for p in _spread(train_pool, TILE_TRAIN)]
    test = [ImageRecord(p, relpath=f"MT_Free/{p.name}") for p in _spread(test_pool, TILE_TEST_FREE)]
    for defect in DEFECT_CLASSES:
        for p in _spread(jpgs(defect), TILE_TEST_PER_CLASS):
            test.append(ImageRecord(p, 1, defect, p.with_suffix(".png"), f"{defect}/{p.name}"))
    return Dataset(tile, name, ImageFolder(tile / "MT_Free", train), ImageFolder(tile, test))


def category_features(name: str, dataset: Any, cache_dir: Path) -> tuple[dict[Path, int], Any, np.ndarray]:
    """(row of each image path, ``(n, P, D)`` features of every train + test image, ``(n_test, crop, crop)`` masks).

    Extracted once and cached under ``cache_dir``: every split of this category selects rows of it.
    """
    import torch

    from softpatch.evaluation.benchmark import ground_truth_masks
    from softpatch.method.model import SoftPatch

    records = list(dataset.train.records) + list(dataset.test.records)
    rows = {r.path: i for i, r in enumerate(records)}
    model = SoftPatch(model_config(0))
    cache = cache_dir / f"{name}_{model.config.feature_key()}.pt"
    if cache.exists():
        features = torch.load(cache)
        _log(f"{name}: features of {len(records)} images from {cache}")
    else:
        start = time.perf_counter()
        features = model.embed(records).features
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(features, cache)
        _log(f"{name}: features of {len(records)} images in {time.perf_counter() - start:.0f} s")
    masks = ground_truth_masks(dataset.test.records, model.transform_)
    return rows, features, masks


def _metrics(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray) -> dict:
    from softpatch.evaluation.metrics import aupro, image_auroc, pixel_auroc

    out = {"image_auroc": image_auroc(labels, image_scores), "pixel_auroc": None, "aupro": None}
    if masks is not None:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps)
    return out


def run_split(
    name: str,
    dataset: Any,
    rows: dict[Path, int],
    features: Any,
    all_masks: np.ndarray | None,
    seed: int,
    noise: float,
    methods: list[str],
    done: dict[str, Any],
    save: Any,
) -> None:
    """Fit every missing method of one (category, seed, noise) and store both protocols' metrics."""
    from softpatch.io.datasets import make_noisy_split
    from softpatch.method.denoise import image_suspicion
    from softpatch.method.model import Embeddings, SoftPatch

    todo = [m for m in methods if _key(name, seed, noise, m) not in done]
    if not todo:
        return
    split = make_noisy_split(dataset, noise=noise, overlap=True, seed=seed)
    test_rows = [rows[r.path] for r in split.test]
    test_index = {r.path: i for i, r in enumerate(dataset.test.records)}
    masks = None if all_masks is None else all_masks[[test_index[r.path] for r in split.test]]
    injected = {r.path for r in split.injected}
    keep = np.array([r.path not in injected for r in split.test])  # the no-overlap test set
    labels = np.array([r.label for r in split.test])
    config = model_config(seed)
    key = config.feature_key()
    train = Embeddings(features[[rows[r.path] for r in split.train]], [str(r.path) for r in split.train], [], key)
    test = Embeddings(features[test_rows], [str(r.path) for r in split.test], [], key)
    base = SoftPatch(config).fit_embeddings(train, build_memory_bank=False)
    split_key = _key(name, seed, noise, "_split")
    if "suspicion_k32" not in done.get(split_key, {}):
        # What an automatic choice could see of this training set, and the truth to check it against.
        neighbours = base.neighbours_
        done[split_key] = {
            "category": name,
            "seed": seed,
            "noise": noise,
            "injected": [r.path in injected for r in split.train],
            "suspicion": [round(float(v), 5) for v in base.suspicion_],
            "suspicion_k1": [round(float(v), 5) for v in image_suspicion(neighbours.dist[:, :, 0].T.numpy())],
            "suspicion_k32": [round(float(v), 5) for v in image_suspicion(neighbours.dist.mean(-1).T.numpy())],
        }
        save()
    for method in todo:
        start = time.perf_counter()
        model = base.variant(**all_methods()[method])
        model.build_memory_bank()
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = model.score(test, with_maps=masks is not None)
        score_s = time.perf_counter() - start
        maps = scores.anomaly_maps
        result = {
            "category": name,
            "seed": seed,
            "noise": noise,
            "method": method,
            "n_train": len(split.train),
            "n_injected": len(split.injected),
            "settings": {k: model.config.to_dict()[k] for k in ("discriminator", "tau", "lof_k", "soft_weight")},
            "overlap": _metrics(labels, scores.image_scores, masks, maps),
            "no-overlap": _metrics(
                labels[keep], scores.image_scores[keep], None if masks is None else masks[keep], maps[keep]
            ),
            "n_test": {"overlap": int(labels.size), "no-overlap": int(keep.sum())},
            "fit_s": round(fit_s, 2),
            "score_s": round(score_s, 2),
        }
        done[_key(name, seed, noise, method)] = result
        save()
        o, n = result["overlap"], result["no-overlap"]
        _log(
            f"{name} seed {seed} noise {noise:g} {method}: overlap {o['image_auroc']:.3f}/{o['pixel_auroc'] or 0:.3f} "
            f"no-overlap {n['image_auroc']:.3f}/{n['pixel_auroc'] or 0:.3f} ({fit_s:.0f}+{score_s:.0f} s)"
        )


def _key(category: str, seed: int, noise: float, method: str) -> str:
    return f"{category}|{seed}|{noise:g}|{method}"


def medians(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (category, protocol, noise, method): the median of each metric over the seeds done."""
    groups: dict[tuple, list[dict]] = {}
    for key, r in results.items():
        if key.endswith("|_split"):
            continue
        for protocol in PROTOCOLS:
            groups.setdefault((r["category"], protocol, r["noise"], r["method"]), []).append(r[protocol])
    rows = []
    for (category, protocol, noise, method), runs in sorted(groups.items()):
        row = {"category": category, "protocol": protocol, "noise": noise, "method": method, "seeds": len(runs)}
        for m in METRICS:
            values = [run[m] for run in runs if run[m] is not None]
            row[m] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: per category and protocol, one line per method, image / pixel AUROC / AUPRO by noise."""
    rows = medians(results)
    noises = sorted({r["noise"] for r in rows})
    index = {(r["category"], r["protocol"], r["noise"], r["method"]): r for r in rows}
    lines = []
    for category in sorted({r["category"] for r in rows}):
        for protocol in PROTOCOLS:
            methods = sorted({r["method"] for r in rows if r["category"] == category and r["protocol"] == protocol})
            seeds = {r["seeds"] for r in rows if r["category"] == category and r["protocol"] == protocol}
            lines.append(
                f"\n**{category}, {protocol}** (image AUROC / pixel AUROC / AUPRO, median over "
                f"{'-'.join(map(str, sorted(seeds)))} seeds)\n"
            )
            lines.append("| method | " + " | ".join(f"noise {n:g}" for n in noises) + " |")
            lines.append("| --- |" + " --- |" * len(noises))
            for method in methods:
                cells = []
                for n in noises:
                    r = index.get((category, protocol, n, method))
                    if r is None:
                        cells.append("")
                    else:
                        cells.append(" / ".join("n/a" if r[m] is None else f"{r[m]:.3f}" for m in METRICS))
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    methods = all_methods()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["magnetic_tile", "battery_weld"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--noises", nargs="+", type=float, default=list(NOISES))
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT, help="results JSON (resumed when it exists)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "softpatch_sweep")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--table-only", action="store_true", help="print the table of the results file and stop")
    parser.add_argument(
        "--merge", nargs="*", type=Path, default=[], help="more results files for the table (runs of other methods)"
    )
    args = parser.parse_args(argv)

    done: dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {}

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1, sort_keys=True))
        tmp.replace(args.output)  # atomic: an interrupted write never leaves a broken file

    if not args.table_only:
        import torch

        torch.set_num_threads(args.threads)
        if not MOBILENET.exists():
            raise SystemExit(f"weights not found: {MOBILENET} (set SOFTPATCH_WEIGHTS)")
        # Seeds outermost: a partial run has whole seeds of every setting, not all seeds of a few.
        loaded = {}
        for seed in args.seeds:
            for name in args.categories:
                if name not in loaded:
                    dataset = load_category(name)
                    loaded[name] = (dataset, *category_features(name, dataset, args.cache))
                dataset, rows, features, masks = loaded[name]
                for noise in args.noises:
                    run_split(name, dataset, rows, features, masks, seed, noise, args.methods, done, save)
    table = dict(done)
    for extra in args.merge:
        table.update(json.loads(extra.read_text()))
    print(format_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
