"""Speed benchmark of softpatch (a script, not a test): prints one table of medians over several runs.

Measures, on CPU and on CUDA where present: feature extraction images/s, seconds of the discriminator,
the coreset and the whole fit, seconds to re-tune tau and LOF-k on a fitted model, images/s of scoring
with maps, and peak memory. Also runs anomalib's PatchCore on the same images and machine, from a
separate virtual environment this script creates itself (``.venv-anomalib``), and prints the speed-up.

Workload: 209 defect-free images of magnetic_tile/MT_Free plus 20 defective ones (the first 4 of each
defect class), resize 256 / crop 224, wide_resnet50_2 with random init (weights do not change speed),
LOF k=6, tau 0.15, greedy coreset 10%. Scoring: 100 other images (80 MT_Free, 4 per defect class).

Every measured configuration runs in a fresh child process, so peak memory (``ru_maxrss``) is that
configuration's own. Run ``python benchmarks/speed.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SOFTPATCH_DATA", ROOT.parent / "shared" / "data"))
WEIGHTS = Path(os.environ.get("SOFTPATCH_WEIGHTS", ROOT.parent / "shared" / "weights"))
ANOMALIB_VENV = ROOT / ".venv-anomalib"
ANOMALIB_SCRIPT = ROOT / "benchmarks" / "anomalib_patchcore.py"
ANOMALIB_PIN = "anomalib==2.7.0"  # verified: PatchcoreModel / KCenterGreedy API used by anomalib_patchcore.py
MOBILENET = WEIGHTS / "mobilenetv1_100_keras_in1k.safetensors"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
BASE_IMAGES = 229  # 209 good + 20 defective
BASE_DEFECT_PER_CLASS = 4
SCORE_FREE = slice(852, 932)  # 80 MT_Free images never used for training (training uses at most the first 852)
SCORE_DEFECT_PER_CLASS = 4  # the last 4 of each class (training uses at most the first 28)

FIT_PARAMS = {
    "backbone": "wide_resnet50_2",
    "pretrained": False,
    "coreset": "greedy",
    "coreset_ratio": 0.1,
    "discriminator": "lof",  # the paper's, as the README's figures say (the default is now "auto")
    "lof_k": 6,
    "tau": 0.15,
}
RETUNE_TAU = 0.2
RETUNE_LOF_K = 8

GB = 1024**3


# ============================================================================ workload


def _sorted_jpgs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def workload(n_images: int) -> tuple[list[Path], list[Path]]:
    """Training paths (good + ~8.7% defective, like 209 + 20) and 100 disjoint scoring paths."""
    tile = DATA / "magnetic_tile"
    free = _sorted_jpgs(tile / "MT_Free" / "Imgs")
    defects = {c: _sorted_jpgs(tile / c / "Imgs") for c in DEFECT_CLASSES}
    if not free or not all(defects.values()):
        raise SystemExit(f"magnetic_tile data not found under {tile} (set SOFTPATCH_DATA)")
    per_class = max(1, round(BASE_DEFECT_PER_CLASS * n_images / BASE_IMAGES))
    n_free = n_images - per_class * len(DEFECT_CLASSES)
    usable = min(len(v) for v in defects.values()) - SCORE_DEFECT_PER_CLASS
    if n_free < 1 or n_free > SCORE_FREE.start or per_class > usable:
        raise SystemExit(f"--images {n_images} is out of range for magnetic_tile (at most about 940)")
    train = free[:n_free] + [p for c in DEFECT_CLASSES for p in defects[c][:per_class]]
    score = free[SCORE_FREE] + [p for c in DEFECT_CLASSES for p in defects[c][-SCORE_DEFECT_PER_CLASS:]]
    return train, score


def _write_list(paths: list[Path], folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("".join(f"{p}\n" for p in paths))
    return path


def _read_list(path: str | Path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


# ============================================================================ child: one softpatch measurement


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _RssSampler:
    """Samples this process's resident memory every ``interval`` s; keeps the peak per named phase."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _current(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._current()
            except OSError:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_times(events: list[tuple[float, float, str]], start: float, end: float) -> dict[str, float]:
    """Seconds per progress stage from ``(time, fraction, "<stage>: ...")`` events.

    A stage ends at its last event; it starts at its first event when that reports fraction 0, else where
    the previous stage ended (or at ``start``). Time not inside any stage is returned as ``other``.
    """
    order: list[str] = []
    first: dict[str, tuple[float, float]] = {}
    last: dict[str, float] = {}
    for t, fraction, message in events:
        stage = message.split(":", 1)[0].strip()
        if stage not in first:
            order.append(stage)
            first[stage] = (t, fraction)
        last[stage] = t
    out: dict[str, float] = {}
    previous_end = start
    for stage in order:
        t_first, fraction = first[stage]
        begin = t_first if fraction <= 1e-9 else previous_end
        out[stage] = out.get(stage, 0.0) + max(last[stage] - begin, 0.0)
        previous_end = last[stage]
    out["other"] = max((end - start) - sum(out.values()), 0.0)
    return out


def child_softpatch(args: argparse.Namespace) -> dict[str, Any]:
    t_import = time.perf_counter()
    import torch

    import softpatch
    from softpatch import SoftPatch, SoftPatchConfig

    import_s = time.perf_counter() - t_import
    device = torch.device(args.device)
    cuda_init_s = 0.0
    if device.type == "cuda":
        t = time.perf_counter()
        torch.cuda.init()
        torch.zeros(1, device=device)
        cuda_init_s = time.perf_counter() - t

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train = _read_list(args.files)
    score = _read_list(args.score_files)
    rss_before_fit = _peak_rss_bytes()
    events: list[tuple[float, float, str]] = []

    sampler = _RssSampler().__enter__()

    def progress(fraction: float, message: str) -> None:
        events.append((time.perf_counter(), fraction, message))
        stage = message.split(":", 1)[0].strip()
        # Work after a stage's last report belongs to whatever comes next, not yet named.
        sampler.phase = f"after {stage}" if fraction >= 1.0 else stage

    config = SoftPatchConfig(**FIT_PARAMS, precision=args.precision, device=args.device)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    model = SoftPatch(config).fit(train, progress=progress)
    model.build_memory_bank(progress=progress)  # a no-op when fit already built it
    sync()
    t1 = time.perf_counter()
    fit_cpu_s = _cpu_seconds() - cpu0
    sampler.phase = "after fit"
    stages = stage_times(events, t0, t1)
    rss_after_fit = _peak_rss_bytes()
    n = len(train)
    features_s = stages.get("features", float("nan"))
    out: dict[str, Any] = {
        "tool": "softpatch",
        "softpatch_version": getattr(softpatch, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "images": n,
        "import_s": import_s,
        "cuda_init_s": cuda_init_s,
        "fit_s": t1 - t0,
        "fit_cpu_s": fit_cpu_s,
        "stages_s": stages,
        "features_s": features_s,
        "features_images_per_s": n / features_s if features_s > 0 else float("nan"),
        "discriminator_s": stages.get("discriminator", float("nan")),
        "coreset_s": stages.get("coreset", float("nan")),
        "memory_bank_size": int(model.memory_bank_.features.shape[0]),
        "train_features_bytes": int(model.train_features_.numel() * model.train_features_.element_size()),
        "rss_before_fit_bytes": rss_before_fit,
        "peak_rss_fit_bytes": rss_after_fit,
        "rss_peak_by_phase_bytes": sampler.peaks,
    }
    if args.fit_only:
        sampler.__exit__()
        out["peak_rss_bytes"] = _peak_rss_bytes()
        return out
    sampler.phase = "scoring"

    # score(paths) = embed(paths) + score(embeddings): timed in two parts to show where scoring time goes.
    t = time.perf_counter()
    embeddings = model.embed(score)
    sync()
    score_embed_s = time.perf_counter() - t
    t = time.perf_counter()
    result = model.score(embeddings, with_maps=True)
    sync()
    score_search_s = time.perf_counter() - t
    score_s = score_embed_s + score_search_s
    assert result.anomaly_maps is not None and len(result.image_scores) == len(score)

    sampler.phase = "re-tune"
    timings: dict[str, float] = {}
    for name, change in (("retune_tau", {"tau": RETUNE_TAU}), ("retune_lof_k", {"lof_k": RETUNE_LOF_K})):
        t = time.perf_counter()
        model.retune(**change)
        sync()
        timings[f"{name}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model.build_memory_bank()  # what the next score() would pay after this re-tune
        sync()
        timings[f"{name}_bank_s"] = time.perf_counter() - t

    out.update(
        {
            "score_images": len(score),
            "score_s": score_s,
            "score_images_per_s": len(score) / score_s,
            "score_embed_s": score_embed_s,
            "score_search_and_maps_s": score_search_s,
            **timings,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    )
    sampler.__exit__()
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


# ============================================================================ child: fp32 vs bf16 accuracy


def _accuracy_sets() -> dict[str, tuple[list[str], list[str], list[int], list[str | None]]]:
    """name -> (train paths, test paths, test labels, test mask paths) for the shared datasets."""
    from softpatch.io.datasets import load_mvtec

    sets = {}
    train, score = workload(BASE_IMAGES)
    labels = [0 if "MT_Free" in str(p) else 1 for p in score]
    masks = [str(p.with_suffix(".png")) if p.with_suffix(".png").exists() else None for p in score]
    sets["magnetic_tile"] = ([str(p) for p in train], [str(p) for p in score], labels, masks)
    weld = load_mvtec(DATA / "battery_weld")
    sets["battery_weld"] = (
        [str(p) for p in weld.train.paths],
        [str(r.path) for r in weld.test.records],
        [int(r.label) for r in weld.test.records],
        [str(r.mask_path) if r.mask_path else None for r in weld.test.records],
    )
    return sets


def child_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Image and pixel AUROC with fp32 and bf16, per dataset and backbone."""
    import numpy as np

    from softpatch import SoftPatch, SoftPatchConfig
    from softpatch.evaluation.metrics import image_auroc, pixel_auroc
    from softpatch.io.images import load_mask_for_crop

    backbones = {
        "wide_resnet50_2 (random init)": {"backbone": "wide_resnet50_2", "pretrained": False},
        "mobilenetv1_100 (ImageNet)": {
            "backbone": "mobilenetv1_100",
            "weights": str(MOBILENET),
            "backbone_kwargs": {"bn_eps": 1e-3, "pad_type": "same"},
        },
    }
    if not MOBILENET.exists():
        del backbones["mobilenetv1_100 (ImageNet)"]
    rows = []
    for data_name, (train, test, labels, mask_paths) in _accuracy_sets().items():
        for bb_name, bb in backbones.items():
            row: dict[str, Any] = {"dataset": data_name, "backbone": bb_name}
            # fp32 with another seed (coreset start + projection) shows how much AUROC moves without any
            # change of precision: the noise floor to read the bf16 difference against.
            for label, precision, seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32_seed1", "fp32", 1)):
                params = {**FIT_PARAMS, **bb, "precision": precision, "device": args.device, "seed": seed}
                model = SoftPatch(SoftPatchConfig(**params)).fit(train)
                result = model.score(test, with_maps=True)
                masks = np.stack([load_mask_for_crop(m or None, model.transform_) for m in mask_paths])
                row[label] = {
                    "image_auroc": image_auroc(labels, np.asarray(result.image_scores)),
                    "pixel_auroc": pixel_auroc(masks, np.asarray(result.anomaly_maps)),
                }
            keys = ("image_auroc", "pixel_auroc")
            row["max_abs_diff"] = max(abs(row["bf16"][k] - row["fp32"][k]) for k in keys)
            row["seed_max_abs_diff"] = max(abs(row["fp32_seed1"][k] - row["fp32"][k]) for k in keys)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"tool": "accuracy", "device": args.device, "rows": rows}


# ============================================================================ parent: orchestration


def _cpu_busy_fraction(interval: float = 1.0) -> float:
    """Fraction of all CPU time that was busy over ``interval`` seconds (from /proc/stat)."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return idle, sum(values)

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the CPU; return the last reading."""
    deadline = time.monotonic() + max_wait
    busy = _cpu_busy_fraction()
    while busy >= threshold and time.monotonic() < deadline:
        busy = _cpu_busy_fraction(2.0)
    return busy


def _log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_child(cmd: list[str], timeout: float | None, args: argparse.Namespace) -> dict[str, Any]:
    busy = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else _cpu_busy_fraction(0.5)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("PYTHONWARNINGS", "ignore")
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
        raise RuntimeError(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"child printed no JSON: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["cpu_busy_before"] = busy
    out["child_wall_s"] = wall
    return out


def softpatch_cmd(files: Path, score_files: Path, device: str, precision: str, fit_only: bool = False) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "softpatch",
        "--files",
        str(files),
        "--score-files",
        str(score_files),
        "--device",
        device,
        "--precision",
        precision,
    ] + (["--fit-only"] if fit_only else [])


def _anomalib_works(python: Path) -> bool:
    if not python.exists():
        return False
    probe = "import anomalib, torch; from anomalib.models.image.patchcore.torch_model import PatchcoreModel"
    return subprocess.run([str(python), "-c", probe], check=False, capture_output=True).returncode == 0


def ensure_anomalib_venv(venv: Path = ANOMALIB_VENV) -> Path:
    """Create ``venv`` with anomalib and this environment's torch/torchvision versions, unless it works already."""
    python = venv / "bin" / "python"
    if _anomalib_works(python):
        return python
    pins = [ANOMALIB_PIN]
    for dist in ("torch", "torchvision"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    _log(f"creating {venv} with {' '.join(pins)} (one-off; pip's cache makes torch quick)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    if not _anomalib_works(python):
        raise RuntimeError(f"anomalib does not import in {venv} after installing {pins}")
    return python


def anomalib_cmd(python: Path, files: Path, device: str, iterations: int) -> list[str]:
    return [
        str(python),
        str(ANOMALIB_SCRIPT),
        "--files",
        str(files),
        "--device",
        device,
        "--coreset-iterations",
        str(iterations),
    ]


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else float("nan")


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: _median(runs, k) for k in keys}
    stage_names = list(dict.fromkeys(s for r in runs for s in r.get("stages_s", {})))  # in fit order
    if stage_names:
        out["stages_s"] = {s: statistics.median(r["stages_s"].get(s, 0.0) for r in runs) for s in stage_names}
    return out


def _spread(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


# ============================================================================ the table


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "GB":
        return f"{value / GB:.2f} GB"
    if unit == "x":
        return f"{value:.1f}x"
    if unit == "AUROC":
        return f"{value:.4f}"
    digits = 2 if abs(value) < 10 else 1
    return f"{value:.{digits}f} {unit}".strip()


def build_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (metric, value, target, met) per device, plus the anomalib comparison and the checks."""
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: float, unit: str, target: str = "", ok: bool | None = None, spread=None) -> None:
        text = _fmt(value, unit)
        if spread is not None and not math.isnan(spread[0]) and spread[0] != spread[1]:
            low, high = (v / GB for v in spread) if unit == "GB" else spread
            text += f" [{low:.2f}-{high:.2f}]" if max(abs(low), abs(high)) < 10 else f" [{low:.1f}-{high:.1f}]"
        met = "" if ok is None else ("yes" if ok else "NO")
        rows.append({"metric": metric, "value": value, "text": text, "target": target, "met": met})

    for device, block in report["devices"].items():
        runs, m = block["runs"], block["median"]
        cpu = device == "cpu"
        tag = f"[{device}]"
        add(
            f"{tag} feature extraction ({report['precision']})",
            m["features_images_per_s"],
            "img/s",
            ">= 12 img/s" if cpu else "",
            (m["features_images_per_s"] >= 12) if cpu else None,
            _spread(runs, "features_images_per_s"),
        )
        add(f"{tag} discriminator (LOF k=6)", m["discriminator_s"], "s", spread=_spread(runs, "discriminator_s"))
        add(f"{tag} coreset (greedy 10%)", m["coreset_s"], "s", spread=_spread(runs, "coreset_s"))
        add(
            f"{tag} whole fit, incl. model load",
            m["fit_s"],
            "s",
            "<= 60 s" if cpu else "<= 10 s",
            m["fit_s"] <= (60 if cpu else 10),
            _spread(runs, "fit_s"),
        )
        add(
            f"{tag} re-tune tau 0.15 -> {RETUNE_TAU}",
            m["retune_tau_s"],
            "s",
            "<= 0.3 s" if cpu else "",
            (m["retune_tau_s"] <= 0.3) if cpu else None,
            _spread(runs, "retune_tau_s"),
        )
        add(f"{tag}   + memory bank rebuild", m["retune_tau_bank_s"], "s", spread=_spread(runs, "retune_tau_bank_s"))
        add(
            f"{tag} re-tune LOF k 6 -> {RETUNE_LOF_K}",
            m["retune_lof_k_s"],
            "s",
            "<= 5 s" if cpu else "",
            (m["retune_lof_k_s"] <= 5) if cpu else None,
            _spread(runs, "retune_lof_k_s"),
        )
        add(
            f"{tag}   + memory bank rebuild", m["retune_lof_k_bank_s"], "s", spread=_spread(runs, "retune_lof_k_bank_s")
        )
        add(
            f"{tag} scoring with maps",
            m["score_images_per_s"],
            "img/s",
            ">= 10 img/s" if cpu else ">= 200 img/s",
            m["score_images_per_s"] >= (10 if cpu else 200),
            _spread(runs, "score_images_per_s"),
        )
        add(
            f"{tag} peak memory (process RSS)",
            m["peak_rss_bytes"],
            "GB",
            "<= 6 GB" if cpu else "",
            (m["peak_rss_bytes"] <= 6 * GB) if cpu else None,
            _spread(runs, "peak_rss_bytes"),
        )
        if "cuda_peak_allocated_bytes" in m:
            add(f"{tag} peak GPU memory (allocated)", m["cuda_peak_allocated_bytes"], "GB")
        scale = block.get("scale")
        if scale:
            small, big = scale["small"], scale["large"]
            g_small = small["peak_rss_fit_bytes"] - small["rss_before_fit_bytes"]
            g_big = big["peak_rss_fit_bytes"] - big["rss_before_fit_bytes"]
            ratio_img = big["images"] / small["images"]
            per_image = (big["peak_rss_fit_bytes"] - small["peak_rss_fit_bytes"]) / (big["images"] - small["images"])
            add(
                f"{tag} peak memory of the fit at {small['images']} images (one run)", small["peak_rss_fit_bytes"], "GB"
            )
            add(f"{tag} peak memory of the fit at {big['images']} images", big["peak_rss_fit_bytes"], "GB")
            add(f"{tag}   marginal memory per training image", per_image / 1024**2, "MB")
            add(f"{tag} fit at {big['images']} images", big["fit_s"], "s")
            add(
                f"{tag} memory growth above pre-fit RSS, {big['images']}/{small['images']} images",
                g_big / g_small,
                "x",
                f"~{ratio_img:.0f}x (linear)",
                g_big / g_small <= 1.15 * ratio_img,
            )
        ano = block.get("anomalib")
        if ano:
            am = ano["median"]
            label = ano["mode"]
            add(
                f"{tag} anomalib PatchCore features",
                am["features_images_per_s"],
                "img/s",
                spread=_spread(ano["runs"], "features_images_per_s"),
            )
            add(
                f"{tag} anomalib PatchCore coreset ({label})",
                am["coreset_s"],
                "s",
                spread=_spread(ano["runs"], "coreset_s"),
            )
            add(f"{tag} anomalib PatchCore whole fit ({label})", am["fit_s"], "s", spread=_spread(ano["runs"], "fit_s"))
            ratio = am["fit_s"] / m["fit_s"]
            add(
                f"{tag} speed-up vs anomalib (fit)", ratio, "x", ">= 20x" if cpu else "", (ratio >= 20) if cpu else None
            )
    acc = report.get("accuracy")
    if acc:
        for row in acc["rows"]:
            add(
                f"|bf16 - fp32| AUROC, {row['dataset']}, {row['backbone']}",
                row["max_abs_diff"],
                "AUROC",
                "<= 0.005",
                row["max_abs_diff"] <= 0.005,
            )
    return rows


def format_table(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ("metric", "median [min-max]", "target", "met")
    cells = [head] + [(r["metric"], r["text"], r["target"], r["met"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [
        (
            f"softpatch speed benchmark: {report['images']} images, wide_resnet50_2 (random init) 256/224, "
            f"LOF k=6, tau 0.15, coreset 10%, precision {report['precision']}; medians of {report['runs']} runs"
        ),
        f"machine: {report['machine']}",
        "",
    ]
    for i, c in enumerate(cells):
        lines.append("  ".join(c[j].ljust(widths[j]) for j in range(4)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for device, block in report["devices"].items():
        stages = block["median"].get("stages_s", {})
        if stages:
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
            lines.append(f"\n[{device}] fit time per stage (median): {parts}")
        m = block["median"]
        phases = block["runs"][0].get("rss_peak_by_phase_bytes")
        if phases:
            parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in phases.items())
            lines.append(f"[{device}] peak RSS by phase (GB, run 1): {parts}")
        scale = block.get("scale")
        if scale and scale["large"].get("rss_peak_by_phase_bytes"):
            parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in scale["large"]["rss_peak_by_phase_bytes"].items())
            lines.append(f"[{device}] peak RSS by phase at {scale['large']['images']} images (GB): {parts}")
        if "score_embed_s" in m:
            lines.append(
                f"[{device}] scoring {m['score_images']:.0f} images (median): features {m['score_embed_s']:.1f} s, "
                f"nearest-neighbour search + maps {m['score_search_and_maps_s']:.1f} s "
                f"(memory bank {m['memory_bank_size']:.0f} patches)"
            )
        ano = block.get("anomalib")
        if ano:
            am = ano["median"]
            lines.append(
                f"[{device}] anomalib {ano['version']}: {am['patches']:.0f} patches x {am['feature_dim']:.0f} dims, "
                f"coreset {am['coreset_size']:.0f}; model {am['model_load_s']:.1f} s, features {am['features_s']:.1f} s, "
                f"projection {am['coreset_projection_s']:.1f} s, {am['coreset_s_per_iteration'] * 1000:.0f} ms/greedy "
                f"iteration ({ano['mode']}: {am['coreset_iterations_timed']:.0f} iterations timed)"
            )
    acc = report.get("accuracy")
    if acc:
        lines.append("\nAUROC fp32 -> bf16 (fp32 with seed 1: the seed-to-seed noise floor):")
        for row in acc["rows"]:
            f, b, r = row["fp32"], row["bf16"], row.get("fp32_seed1")
            line = (
                f"  {row['dataset']:<14} {row['backbone']:<30} image {f['image_auroc']:.4f} -> {b['image_auroc']:.4f}"
                f"   pixel {f['pixel_auroc']:.4f} -> {b['pixel_auroc']:.4f}"
            )
            if r:
                line += f"   (seed 1: image {r['image_auroc']:.4f}, pixel {r['pixel_auroc']:.4f})"
            lines.append(line)
    busy = [r.get("cpu_busy_before", 0.0) for b in report["devices"].values() for r in b["runs"]]
    if busy and max(busy) > 0.25:
        lines.append(f"\nnote: other processes kept the CPU up to {max(busy):.0%} busy before some runs")
    return "\n".join(lines)


def _machine() -> str:
    import torch

    text = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
        text += f", {kb / 1024**2:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def main(argv: list[str] | None = None) -> int:
    from softpatch.config import DEVICES, PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CPU, and CUDA too where present")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration; the table shows medians")
    parser.add_argument("--images", type=int, default=BASE_IMAGES, help="training images (default 229)")
    parser.add_argument(
        "--scale-check", action="store_true", help="also fit 4x the images once, to show that memory grows linearly"
    )
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument(
        "--accuracy-check",
        choices=("auto", "yes", "no"),
        default="auto",
        help="compare fp32 and bf16 AUROC on the shared datasets (auto: when --precision bf16)",
    )
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument("--anomalib-runs", type=int, default=None, help="default: --runs")
    parser.add_argument(
        "--anomalib-coreset-iterations",
        type=int,
        default=200,
        help="time this many greedy iterations and extrapolate; 0 = full coreset (slow on CPU)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="wait up to this many seconds for other processes to leave the CPU before each run",
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON instead of the table")
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    # internal: child processes
    parser.add_argument("--child", choices=("softpatch", "accuracy"), help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--score-files", help=argparse.SUPPRESS)
    parser.add_argument("--fit-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "softpatch":
        print(json.dumps(child_softpatch(args)), flush=True)
        return 0
    if args.child == "accuracy":
        print(json.dumps(child_accuracy(args)), flush=True)
        return 0

    import torch

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but no CUDA GPU is available")
    else:
        devices = [args.device]
    anomalib_runs = args.runs if args.anomalib_runs is None else args.anomalib_runs
    report: dict[str, Any] = {
        "images": args.images,
        "runs": args.runs,
        "precision": args.precision,
        "machine": _machine(),
        "workload": {"data": str(DATA / "magnetic_tile"), **FIT_PARAMS},
        "devices": {},
    }
    anomalib_python = None
    if not args.skip_anomalib:
        anomalib_python = ensure_anomalib_venv()
    with tempfile.TemporaryDirectory(prefix="softpatch-speed-") as tmp:
        folder = Path(tmp)
        train, score = workload(args.images)
        files = _write_list(train, folder, "train.txt")
        score_files = _write_list(score, folder, "score.txt")
        for device in devices:
            block: dict[str, Any] = {"runs": []}
            for i in range(args.runs):
                _log(f"softpatch {device} run {i + 1}/{args.runs}")
                run = run_child(softpatch_cmd(files, score_files, device, args.precision), None, args)
                _log(
                    f"  fit {run['fit_s']:.1f} s, stages {run['stages_s']}, score {run['score_images_per_s']:.1f} img/s"
                )
                block["runs"].append(run)
            block["median"] = _medians(block["runs"])
            if args.scale_check:
                big_n = 4 * args.images
                big_train, _ = workload(big_n)
                big_files = _write_list(big_train, folder, "train_big.txt")
                _log(f"softpatch {device} scale check: {big_n} images")
                big = run_child(
                    softpatch_cmd(big_files, score_files, device, args.precision, fit_only=True), None, args
                )
                small = min(block["runs"], key=lambda r: abs(r["fit_s"] - block["median"]["fit_s"]))
                block["scale"] = {"small": small, "large": big}
            if anomalib_python is not None and anomalib_runs > 0:
                ano_runs = []
                for i in range(anomalib_runs):
                    _log(f"anomalib {device} run {i + 1}/{anomalib_runs}")
                    iterations = args.anomalib_coreset_iterations
                    ano_runs.append(run_child(anomalib_cmd(anomalib_python, files, device, iterations), None, args))
                    _log(f"  anomalib fit {ano_runs[-1]['fit_s']:.1f} s ({ano_runs[-1]['coreset_mode']})")
                block["anomalib"] = {
                    "runs": ano_runs,
                    "median": _medians(ano_runs),
                    "mode": ano_runs[0]["coreset_mode"],
                    "version": ano_runs[0]["anomalib_version"],
                }
            report["devices"][device] = block
        if args.accuracy_check == "yes" or (args.accuracy_check == "auto" and args.precision == "bf16"):
            _log("accuracy check fp32 vs bf16")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "accuracy", "--device", devices[0]]
            report["accuracy"] = run_child(cmd, None, args)
    rows = build_rows(report)
    report["table"] = rows
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
