"""Scale benchmark of softpatch (a script, not a test): fits on 1,000 to 10,000 images, per stage.

Builds training folders of the requested sizes from ``../shared/data/magnetic_tile`` (augmented copies of
real images: flips, crops of 85-100% of each side, rotations of up to 5 degrees): defect-free copies of
``MT_Free`` plus 2% planted defective copies of the ``MT_*`` classes, written once into a temporary
folder. Each size is fitted in its own child process (so peak memory is that size's own) with the default
settings (wide_resnet50_2 at 256/224, random init: weights do not change speed), and the child prints,
per stage (features, neighbours, discriminator, coreset and bank, scoring), the wall time, the peak RSS
(``/proc/self/status`` VmRSS sampled every 0.1 s) and the disk the feature store uses.

Where the exact path fits (``--exact-max``, default 2,000 images) the child also runs the exact
neighbour search on the same store and prints the approximate search's recall against it: share of the
exact tau cut's removed patches also removed, share of the exact top-2% suspects kept, recall@6 of the
exact neighbours (on 16 positions), and the vetting AUROC of the planted defective images and the test
image/pixel AUROCs (80 held-out good tiles + the last 4 of each defect class, not augmented), exact vs
approximate, with a paired bootstrap 95% interval of the image AUROC's difference (the test images resampled
within each class): with 20 defective test images, how large a difference the draw of test images alone gives.
``--fp16-check`` adds a float32-store fit at the smallest size: removed patches, ranking and AUROCs, float16
vs float32.

Targets (issue 13, on a 2-core 24 GB machine): the 10,000-image fit in at most 30 minutes with peak RSS at
most 6 GB; time per image at 10,000 at most 1.5x that at 1,000; vetting and test AUROCs within 0.02 of
the exact path at 2,000 images.

    python benchmarks/scale.py                               # 1000, 2000, 5000, 10000 (hours)
    python benchmarks/scale.py --sizes 1000,2000 --fp16-check
    python benchmarks/scale.py --sizes 2000 --real-weights   # accuracy vs the exact search on ImageNet features
    python benchmarks/scale.py --quick                       # 64 and 128 images, tiny backbone: proves it runs
    python benchmarks/scale.py --results scale.jsonl         # also keep each size's figures as it finishes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SOFTPATCH_DATA", ROOT.parent / "shared" / "data")) / "magnetic_tile"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
PLANTED_SHARE = 0.02
TEST_FREE = 80  # the last 80 MT_Free images are the test set's good ones, never augmented into training
TEST_DEFECT_PER_CLASS = 4  # the last 4 of each class
QUICK_CONFIG = {
    "backbone": "resnet18",
    "pretrained": False,
    "resize": 128,
    "crop": 112,
    "feature_dim": 128,
    "neighbour_reference": 48,  # so that the 128-image quick run takes the approximate path
}
FULL_CONFIG = {"backbone": "wide_resnet50_2", "pretrained": False}
SHARED = Path(os.environ.get("SOFTPATCH_SHARED_DIR", ROOT.parent / "shared"))
# --real-weights: ImageNet features (the shared MobileNet v1), for accuracy against the exact search; random
# features rank images by chance, so only real ones can show that the approximate search keeps the ranking.
REAL_CONFIG = {
    "backbone": "mobilenetv1_100",
    "weights": str(SHARED / "weights" / "mobilenetv1_100_keras_in1k.safetensors"),
    "backbone_kwargs": {"bn_eps": 0.001, "pad_type": "same"},
}
STAGES = ("features", "neighbours", "discriminator", "coreset", "scoring")


# ---------------------------------------------------------------------------------------------- data
def _sources() -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    """Training sources (good, defective) and the test set (good, defective), disjoint."""
    free = sorted((DATA / "MT_Free" / "Imgs").glob("*.jpg"))
    if not free:
        sys.exit(f"no magnetic_tile images under {DATA} (see shared/data/README.md)")
    defect = {c: sorted((DATA / c / "Imgs").glob("*.jpg")) for c in DEFECT_CLASSES}
    train_bad = [p for c in DEFECT_CLASSES for p in defect[c][:-TEST_DEFECT_PER_CLASS]]
    test_bad = [p for c in DEFECT_CLASSES for p in defect[c][-TEST_DEFECT_PER_CLASS:]]
    return free[:-TEST_FREE], train_bad, free[-TEST_FREE:], test_bad


def _augment(source: Path, target: Path, seed: int) -> None:
    """A flipped, cropped (85-100% of each side) and slightly rotated (<= 5 degrees) copy of ``source``."""
    import numpy as np
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    image = Image.open(source).convert("RGB")
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.5:
        image = ImageOps.flip(image)
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.85, 1.0)), int(h * rng.uniform(0.85, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((left, top, left + cw, top + ch))
    fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
    image = image.rotate(float(rng.uniform(-5, 5)), resample=Image.Resampling.BILINEAR, fillcolor=fill)
    image.save(target, quality=95)


def build_folder(root: Path, n_images: int) -> tuple[list[str], list[int]]:
    """``n_images`` augmented training copies in ``root`` (2% planted defective): paths and labels (1 = defective).

    Deterministic per index, so a smaller size's images are the first ones of a larger size's.
    """
    good, bad, _, _ = _sources()
    n_bad = max(1, round(n_images * PLANTED_SHARE))
    # Planted images spread evenly through the folder, so every prefix has about 2% of them.
    bad_slots = {round((i + 0.5) * n_images / n_bad) for i in range(n_bad)}
    root.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    g = b = 0
    for i in range(n_images):
        planted = i in bad_slots
        source = bad[b % len(bad)] if planted else good[g % len(good)]
        b, g = (b + 1, g) if planted else (b, g + 1)
        target = root / f"{i:06d}_{'bad' if planted else 'good'}_{source.stem}.jpg"
        if not target.exists():
            _augment(source, target, seed=i)
        paths.append(str(target))
        labels.append(int(planted))
    return paths, labels


# ---------------------------------------------------------------------------------------------- child
def rss() -> int:
    """This process's resident memory now (VmRSS), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak RSS per named step (set ``step``), sampled every 0.05 s by a daemon thread."""

    def __init__(self) -> None:
        self.step = "setup"
        self.peaks: dict[str, int] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peaks[self.step] = max(self.peaks.get(self.step, 0), rss())
            time.sleep(0.05)


class _Meter:
    """Wall time and peak VmRSS per stage; the stage follows the progress messages of the fit.

    A stage's time is the sum of the spans spent in it, so the stages add up to the fit even where the fit
    goes back to a stage (the discriminator's messages come before and after the neighbour search).
    """

    def __init__(self) -> None:
        self.stage = "setup"
        self.since = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            stage = self.stage
            self.peak[stage] = max(self.peak.get(stage, 0), rss())

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            now = time.perf_counter()
            self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self.since
            self.peak[self.stage] = max(self.peak.get(self.stage, 0), rss())
            self.stage, self.since = stage, now

    def progress(self, fraction: float, message: str) -> None:
        prefix = message.split(":", 1)[0]
        if prefix == "discriminator" and ("neighbours" in message or "grouping" in message):
            prefix = "neighbours"  # the search for neighbours, and the grouping by look that plans it
        if prefix in STAGES:
            self.enter(prefix)

    def stop(self) -> dict[str, dict[str, float]]:
        self.enter("done")
        self._stop.set()
        return {
            s: {"seconds": seconds, "peak_rss": self.peak.get(s, 0)}
            for s, seconds in self.seconds.items()
            if s != "setup"
        }


def _disk_used(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def _auroc_pair(model: Any, labels: Any, test: Any, test_labels: Any, masks: Any) -> dict[str, float]:
    import numpy as np

    from softpatch.evaluation.metrics import image_auroc, pixel_auroc

    result = model.score(test, with_maps=True)
    return {
        "vetting_auroc": image_auroc(np.asarray(labels), model.suspicion_),
        "image_auroc": image_auroc(np.asarray(test_labels), result.image_scores),
        "pixel_auroc": pixel_auroc(masks, result.anomaly_maps),
        "image_scores": np.asarray(result.image_scores, dtype=float).tolist(),
    }


def _paired_interval(labels: Any, first: Any, second: Any, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of AUROC(first) - AUROC(second) over the test set resampled within each class (paired: both
    scores of an image stay together). How far two fits' image AUROCs can differ by which test images were drawn."""
    import numpy as np

    from softpatch.evaluation.metrics import image_auroc

    labels, first, second = np.asarray(labels), np.asarray(first), np.asarray(second)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
    diffs = []
    for _ in range(reps):
        idx = np.concatenate([rng.choice(members, size=len(members)) for members in by_class])
        diffs.append(image_auroc(labels[idx], first[idx]) - image_auroc(labels[idx], second[idx]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def _test_set(model: Any) -> tuple[Any, list[int], Any]:
    import numpy as np
    from PIL import Image

    _, _, good, bad = _sources()
    masks = []
    for path in good + bad:
        mask_path = path.with_suffix(".png")
        mask = np.asarray(Image.open(mask_path).convert("L")) >= 128 if mask_path.exists() else None
        if mask is None:
            mask = np.zeros(Image.open(path).size[::-1], dtype=bool)
        masks.append(model.transform_.mask(mask))
    return model.embed(good + bad), [0] * len(good) + [1] * len(bad), np.stack(masks)


def _backbone_rate(model: Any, paths: list[str], runs: int = 3) -> float:
    """Images per second of the backbone and patch aggregation alone (decoded, transformed images; median of
    ``runs``): the floor under every fit's feature stage on this machine."""
    import statistics

    import torch

    from softpatch.io.images import load_image

    batch = model.config.batch_size or 8
    images = torch.stack([model.transform_(load_image(p)) for p in paths])
    extractor = model.extractor_
    rates = []
    with torch.inference_mode():
        extractor(images[:batch])  # warm-up
        for _ in range(runs):
            started = time.perf_counter()
            for i in range(0, len(images), batch):
                extractor(images[i : i + batch])
            rates.append(len(images) / (time.perf_counter() - started))
    return statistics.median(rates)


def run_child(job: dict) -> dict:
    import numpy as np
    import torch

    from softpatch.config import SoftPatchConfig
    from softpatch.method.model import SoftPatch

    torch.manual_seed(0)
    torch.set_num_threads(job["threads"])
    meter = _Meter()
    config = SoftPatchConfig(**job["config"])
    store_dir = Path(job["store_dir"])
    model = SoftPatch(config)
    backbone_rate = _backbone_rate(model, job["paths"][:64]) if job.get("backbone_rate") else None
    started = time.perf_counter()
    model.fit(job["paths"], progress=meter.progress, feature_directory=store_dir, feature_dtype=job["dtype"])
    fit_seconds = time.perf_counter() - started
    meter.enter("scoring")
    test, test_labels, masks = _test_set(model)
    approx = _auroc_pair(model, job["labels"], test, test_labels, masks)
    stages = meter.stop()
    out: dict[str, Any] = {
        "n": len(job["paths"]),
        "dtype": job["dtype"],
        "fit_seconds": fit_seconds,
        "stages": stages,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "disk": _disk_used(store_dir),
        "store_bytes": model.feature_store_.nbytes,
        "approximate": model.neighbours_.reference is not None,
        "discriminator": model.resolved_config_.discriminator,
        "accuracy": approx,
        "removed": np.packbits(model.removed_mask_.reshape(-1)).tobytes().hex() if job.get("keep_removed") else None,
        "suspicion": model.suspicion_.tolist(),
        "backbone_rate": backbone_rate,
    }
    if job["compare_exact"] and out["approximate"]:
        n = len(job["paths"])
        top = max(1, round(PLANTED_SHARE * n))
        # What the approximate fit decided, read before the exact variant replaces the shared neighbour cache.
        removed_approx = model.removed_mask_.copy()
        top_approx = set(model.vetting_report().ranking[:top].tolist())
        na = model.neighbours_
        approx_index = na.positions(0, na.dist.shape[0])[1][:: max(1, na.dist.shape[0] // 16), :, :6]
        started = time.perf_counter()
        exact = model.variant(neighbour_reference=n)
        removed_exact = exact.removed_mask_
        top_exact = set(exact.vetting_report().ranking[:top].tolist())
        exact_accuracy = _auroc_pair(exact, job["labels"], test, test_labels, masks)
        ne = exact.neighbours_
        exact_index = ne.positions(0, ne.dist.shape[0])[1][:: max(1, ne.dist.shape[0] // 16), :, :6]
        hits = (exact_index.unsqueeze(-1) == approx_index.unsqueeze(-2)).any(-1).float().mean().item()
        out["exact"] = {
            "seconds": time.perf_counter() - started,
            "removed_recall": float((removed_exact & removed_approx).sum() / max(1, removed_exact.sum())),
            "top_kept": len(top_exact & top_approx) / top,
            "recall_at_6": hits,
            "accuracy": exact_accuracy,
            "image_auroc_interval": _paired_interval(
                test_labels, exact_accuracy["image_scores"], approx["image_scores"]
            ),
        }
    return out


# ---------------------------------------------------------------------------------------------- parent
def _child(job: dict, work: Path) -> dict:
    job_file = work / f"job_{job['n']}_{job['dtype']}.json"
    job_file.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(job_file)], capture_output=True, text=True, env=os.environ.copy()
    )
    if done.returncode != 0:
        sys.exit(f"the fit of {job['n']} images failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1024**3:.2f}"


def _print_tables(results: list[dict], fp16: dict | None) -> None:
    print("\n## Fit per stage\n")
    print("| images | stage | time (s) | peak RSS (GiB) |")
    print("|---:|---|---:|---:|")
    for r in results:
        for stage, v in r["stages"].items():
            print(f"| {r['n']} | {stage} | {v['seconds']:.1f} | {_gb(v['peak_rss'])} |")
    print("\n## Whole fit\n")
    print("| images | search | fit (s) | s/image | x vs smallest | peak RSS (GiB) | store (GiB) | disk used (GiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    base = results[0]["fit_seconds"] / results[0]["n"]
    for r in results:
        per = r["fit_seconds"] / r["n"]
        search = "reference" if r["approximate"] else "exact"
        print(
            f"| {r['n']} | {search} | {r['fit_seconds']:.1f} | {per:.3f} | {per / base:.2f} | {_gb(r['peak_rss'])} "
            f"| {_gb(r['store_bytes'])} | {_gb(r['disk'])} |"
        )
    largest = results[-1]
    rate = results[0].get("backbone_rate")
    if rate:
        floor = largest["n"] / rate
        print(
            f"\nThe backbone and patch aggregation alone (no decoding, no store) run at {rate:.2f} img/s on this "
            f"machine: {floor / 60:.1f} min of the {largest['n']}-image fit's {largest['fit_seconds'] / 60:.1f} min; "
            f"everything else takes {(largest['fit_seconds'] - floor) / 60:.1f} min."
        )
    print(
        f"\nTargets at {largest['n']} images: fit {largest['fit_seconds'] / 60:.1f} min (<= 30), peak RSS "
        f"{_gb(largest['peak_rss'])} GiB (<= 6), time per image {largest['fit_seconds'] / largest['n'] / base:.2f}x "
        "the smallest size's (<= 1.5)."
    )
    compared = [r for r in results if "exact" in r]
    if compared:
        print("\n## Reference search vs exact\n")
        print(
            "| images | removed recall | top-2% kept | recall@6 | vetting AUROC exact / ref | image AUROC exact / ref "
            "| image AUROC exact - ref (paired bootstrap 95%) | pixel AUROC exact / ref | exact extra (s) |"
        )
        print("|---:|---:|---:|---:|---|---|---|---|---:|")
        for r in compared:
            e, a = r["exact"]["accuracy"], r["accuracy"]
            low, high = r["exact"]["image_auroc_interval"]
            print(
                f"| {r['n']} | {r['exact']['removed_recall']:.3f} | {r['exact']['top_kept']:.3f} "
                f"| {r['exact']['recall_at_6']:.3f} | {e['vetting_auroc']:.4f} / {a['vetting_auroc']:.4f} "
                f"| {e['image_auroc']:.4f} / {a['image_auroc']:.4f} "
                f"| {e['image_auroc'] - a['image_auroc']:+.4f} in [{low:+.3f}, {high:+.3f}] "
                f"| {e['pixel_auroc']:.4f} / {a['pixel_auroc']:.4f} "
                f"| {r['exact']['seconds']:.1f} |"
            )
    if fp16 is not None:
        half, full = fp16["float16"], fp16["float32"]
        import numpy as np

        removed_h = np.unpackbits(np.frombuffer(bytes.fromhex(half["removed"]), np.uint8))
        removed_f = np.unpackbits(np.frombuffer(bytes.fromhex(full["removed"]), np.uint8))
        same = float((removed_h == removed_f).mean())
        rank_h = np.argsort(-np.asarray(half["suspicion"]), kind="stable")
        rank_f = np.argsort(-np.asarray(full["suspicion"]), kind="stable")
        top = max(1, round(PLANTED_SHARE * half["n"]))
        kept = len(set(rank_h[:top].tolist()) & set(rank_f[:top].tolist())) / top
        ha, fa = half["accuracy"], full["accuracy"]
        print(
            f"\nfloat16 vs float32 store at {half['n']} images: removed patches {same:.5f} the same, top-2% suspects "
            f"{kept:.3f} kept, vetting AUROC {ha['vetting_auroc']:.4f} / {fa['vetting_auroc']:.4f}, image AUROC "
            f"{ha['image_auroc']:.4f} / {fa['image_auroc']:.4f}, pixel AUROC {ha['pixel_auroc']:.4f} / "
            f"{fa['pixel_auroc']:.4f}; store {_gb(half['store_bytes'])} / {_gb(full['store_bytes'])} GiB."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000", help="training set sizes, comma-separated")
    parser.add_argument("--quick", action="store_true", help="64 and 128 images, resnet18 at 128/112: proves it runs")
    parser.add_argument("--exact-max", type=int, default=2000, help="compare with the exact search up to this size")
    parser.add_argument("--fp16-check", action="store_true", help="also fit the smallest size on a float32 store")
    parser.add_argument(
        "--real-weights", action="store_true", help="the shared ImageNet MobileNet v1 instead of random wide_resnet50_2"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per fit")
    parser.add_argument("--work", default=None, help="folder for images and stores (default: a temporary one)")
    parser.add_argument("--results", default=None, help="append each size's measurements to this JSON-lines file")
    parser.add_argument(
        "--keep-stores", action="store_true", help="keep each size's feature store under --work (for stage benchmarks)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(Path(args.child).read_text()))))
        return 0
    sizes = [64, 128] if args.quick else [int(s) for s in args.sizes.split(",")]
    config = QUICK_CONFIG if args.quick else REAL_CONFIG if args.real_weights else FULL_CONFIG
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="softpatch-scale-"))
    try:
        started = time.perf_counter()
        paths, labels = build_folder(work / "images", max(sizes))
        print(f"built {max(sizes)} augmented images in {time.perf_counter() - started:.0f} s under {work}")
        results, fp16 = [], None
        for n in sizes:
            job = {
                "n": n,
                "paths": paths[:n],
                "labels": labels[:n],
                "config": config,
                "dtype": "float16",
                "threads": args.threads,
                "store_dir": str(work / f"store_{n}"),
                "compare_exact": n <= args.exact_max,
                "keep_removed": args.fp16_check and n == sizes[0],
                "backbone_rate": n == sizes[0],
            }
            results.append(_child(job, work))
            if not args.keep_stores:
                shutil.rmtree(job["store_dir"], ignore_errors=True)
            print(
                f"fitted {n} images in {results[-1]['fit_seconds']:.1f} s, peak RSS {_gb(results[-1]['peak_rss'])} GiB",
                flush=True,
            )
            if args.results:  # each size as it finishes, so that a run cut short keeps what it measured
                with open(args.results, "a") as fh:
                    fh.write(json.dumps({k: v for k, v in results[-1].items() if k != "suspicion"}) + "\n")
            if job["keep_removed"]:
                full = _child(
                    {**job, "dtype": "float32", "compare_exact": False, "store_dir": str(work / f"store_{n}_f32")}, work
                )
                shutil.rmtree(work / f"store_{n}_f32", ignore_errors=True)
                fp16 = {"float16": results[-1], "float32": full}
        _print_tables(results, fp16)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
