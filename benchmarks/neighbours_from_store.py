"""The noise discriminator's neighbour search alone, on a feature store a fit left behind (a script, not a test).

Times the look-alike candidate search that fits above ``neighbour_reference`` images use (grouping the images by
look, then comparing each with its group's candidates) and, with ``--compare-sample``, the search among one
seeded sample of the same size that it replaced; prints the peak RSS, and the recall@6 of one against the other
on 16 positions. Keep a store with ``benchmarks/scale.py --keep-stores --work DIR`` (``DIR/store_N``).

    python benchmarks/neighbours_from_store.py --store /tmp/scale/store_10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

from scale import PeakRSS  # noqa: E402 - beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a feature store folder (scale.py --keep-stores)")
    parser.add_argument("--reference", type=int, default=1024, help="neighbour_reference (default 1,024)")
    parser.add_argument("--k", type=int, default=32, help="neighbours kept per patch (the cache's 32)")
    parser.add_argument("--compare-sample", action="store_true", help="also time the one-sample search it replaced")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from softpatch.io.feature_store import FeatureStore
    from softpatch.method.discriminators import (
        CandidatePlan,
        compute_neighbours,
        reference_images,
    )
    from softpatch.runtime.resources import work_budget

    store = FeatureStore.open(args.store)
    n, p, d = store.shape
    reference = reference_images(n, args.reference, seed=0)
    if reference is None:
        sys.exit(f"{n} images are not more than --reference {args.reference}: the search is exact")
    cpu = torch.device("cpu")
    meter = PeakRSS()
    messages: list[tuple[float, str]] = []
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        messages.append((time.perf_counter() - started, message))

    with tempfile.TemporaryDirectory() as out:
        found = compute_neighbours(
            store,
            args.k,
            device=cpu,
            budget_bytes=work_budget(cpu),
            progress=progress,
            reference=reference,
            directory=out,
        )
        total = time.perf_counter() - started
        grouped = next((t for t, m in messages if m.startswith("discriminator: neighbours at 0/")), 0.0)
        plan = found.plan
        assert isinstance(plan, CandidatePlan)
        sizes = [len(g) for g in plan.groups]
        print(
            f"{n} images x {p} positions x {d} dims, each compared with {args.reference} look-alike images: "
            f"{total:.1f} s ({grouped:.1f} s grouping {len(sizes)} groups of {min(sizes)}-{max(sizes)} images, "
            f"{total - grouped:.1f} s searching), peak RSS {max(meter.peaks.values()) / 1024**3:.2f} GiB"
        )
        if args.compare_sample:
            sample_plan = CandidatePlan((np.arange(n),), (reference,))
            started = time.perf_counter()
            sample = compute_neighbours(
                store, args.k, device=cpu, budget_bytes=work_budget(cpu), reference=reference, plan=sample_plan
            )
            sample_seconds = time.perf_counter() - started
            rows = np.linspace(0, p - 1, 16).astype(np.int64)
            a = torch.from_numpy(np.stack([found.positions(r, r + 1)[1][0, :, :6].numpy() for r in rows]))
            b = torch.from_numpy(np.stack([sample.positions(r, r + 1)[1][0, :, :6].numpy() for r in rows]))
            overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean().item()
            print(
                f"one sample of {args.reference} for every image: {sample_seconds:.1f} s; 6 nearest shared {overlap:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
