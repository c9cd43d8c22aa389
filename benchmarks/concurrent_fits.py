"""Two fits at once on one machine: each should take about twice one alone, not ten times.

Every fit (then a scoring of test images) runs in its own process. Per thread setting, one fit alone and
two at once (started together, after their imports) are timed over several runs; printed per setting: the
median fit and scoring wall times and the ratio of a concurrent job's total to the lone job's.

A third row per setting: one job while a busy single-threaded process runs on every core (other work).

Settings: ``default`` (no bound: torch and faiss each start a thread per core), ``passive`` (the same with
``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning) and ``bounded`` (each job within
``cores / jobs`` threads: ``softpatch.runtime.threads.limit_threads``). See that module for the why.

    python benchmarks/concurrent_fits.py                 # 40 images, wide_resnet50_2 random init, 3 runs
    python benchmarks/concurrent_fits.py --quick         # a tiny run to prove it works
    python benchmarks/concurrent_fits.py --train-dir DIR --test-dir DIR --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's softpatch, not an installed one
SETTINGS = ("default", "passive", "bounded")


def _synthetic_images(root: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_parts  # the tests' striped part texture

    return (
        write_parts(root / "train", n_train, seed=1, defective=())[0].parent,
        write_parts(root / "test", n_test, seed=2, defective=())[0].parent,
    )


def _worker(args: argparse.Namespace) -> None:
    """One job: wait for "go" on stdin (so that concurrent jobs start together), fit, score, print times."""
    import torch  # noqa: F401 - imported before the start signal: import time is not the job's

    from softpatch.config import SoftPatchConfig
    from softpatch.io.datasets import scan_images
    from softpatch.method.model import SoftPatch
    from softpatch.runtime.threads import current_limits, limit_threads

    config = SoftPatchConfig(
        backbone=args.backbone,
        pretrained=False,
        resize=args.resize,
        crop=args.crop,
        device="cpu",
        discriminator="lof",
    )
    train = scan_images(args.train_dir).records[: args.images]
    test = scan_images(args.test_dir).records
    print("ready", flush=True)
    sys.stdin.readline()
    bound = limit_threads(args.threads) if args.threads else None
    if bound is not None:
        bound.__enter__()
    limits = current_limits()
    start = time.perf_counter()
    model = SoftPatch(config).fit(train)
    fitted = time.perf_counter()
    model.score(test, with_maps=False)
    scored = time.perf_counter()
    if bound is not None:
        bound.__exit__(None, None, None)
    print(
        json.dumps({"fit_s": fitted - start, "score_s": scored - fitted, "torch": limits.torch, "faiss": limits.faiss}),
        flush=True,
    )


# Other work sharing the machine: one busy single-threaded process per core (pure Python, no OpenMP).
_BUSY = "while True: pass"


def _run_jobs(args: argparse.Namespace, setting: str, jobs: int, cores: int, *, load: bool = False) -> list[dict]:
    """Times of ``jobs`` concurrent jobs (``load``: one job among a busy process per core)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    # Bounded: each job its share of the cores; beside other work, the share of one of two jobs.
    threads = max(1, cores // (2 if load else jobs)) if setting == "bounded" else 0
    command = [sys.executable, __file__, "--worker", "--threads", str(threads)]
    command += ["--train-dir", str(args.train_dir), "--test-dir", str(args.test_dir), "--images", str(args.images)]
    command += ["--backbone", args.backbone, "--resize", str(args.resize), "--crop", str(args.crop)]
    procs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for _ in range(jobs)
    ]
    busy: list[subprocess.Popen] = []
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark job failed to start")
        if load:
            busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(cores)]
        for p in procs:  # all imported and loaded: start them together
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"a benchmark job failed with exit code {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in [*procs, *busy]:  # only the processes started here, by handle
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: proves the script works")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--train-dir", type=Path, default=None)
    parser.add_argument("--test-dir", type=Path, default=None)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated of " + ", ".join(SETTINGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.runs, args.images, args.backbone, args.resize, args.crop = 1, 8, "resnet18", 72, 64
    from softpatch.runtime.threads import cpu_count

    cores = cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        if args.train_dir is None or args.test_dir is None:
            args.train_dir, args.test_dir = _synthetic_images(Path(tmp), args.images, max(4, args.images // 4))
        print(
            f"{args.images} training images, {args.backbone} (random init) at {args.crop} px, {cores} cores, "
            f"median of {args.runs} run(s); each job = fit + scoring, in its own process"
        )
        print(
            f"{'setting':<9} {'jobs':>10} {'threads/job':>11} {'fit s':>8} {'score s':>8} {'total s':>8} {'x alone':>8}"
        )
        for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
            if setting not in SETTINGS:
                parser.error(f"unknown setting {setting!r}")
            alone = None
            for jobs, load in ((1, False), (2, False), (1, True)):
                runs = [r for _ in range(args.runs) for r in _run_jobs(args, setting, jobs, cores, load=load)]
                fit = statistics.median(r["fit_s"] for r in runs)
                score = statistics.median(r["score_s"] for r in runs)
                total = statistics.median(r["fit_s"] + r["score_s"] for r in runs)
                alone = alone or total
                threads = f"{runs[0]['torch']}/{runs[0]['faiss']}"
                label = f"1+{cores} busy" if load else str(jobs)
                print(
                    f"{setting:<9} {label:>10} {threads:>11} {fit:>8.2f} {score:>8.2f} {total:>8.2f} {total / alone:>8.2f}"
                )


if __name__ == "__main__":
    main()
