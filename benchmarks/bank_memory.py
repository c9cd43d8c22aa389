"""Peak memory of building a memory bank at the default 2 GiB budget and searching it (a script, not a test).

The coreset stage holds the fit's peak at 10,000 images: the bank itself (``bank_budget_mb``, 2,048 MB by
default) and what its nearest-neighbour search builds beside it. This script reproduces that stage in minutes
on a kept feature store (``benchmarks/scale.py --keep-stores --work DIR``; any store of at least 1,000 images at
1,024 dims): it asks for a bank over the budget (random coreset, so no greedy time), builds it with its search,
scores 20 of the store's images, and prints the RSS before, the peak of each step, the bank's size, the search
the bank chose and the fit's memory estimate for the same settings.

    python benchmarks/bank_memory.py --store DIR/store_2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

from scale import PeakRSS, rss  # noqa: E402 - beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a feature store folder of 1,024-dim features")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from softpatch.config import SoftPatchConfig
    from softpatch.io.feature_store import FeatureStore
    from softpatch.method.model import Embeddings, SoftPatch
    from softpatch.runtime.resources import coreset_memory_bytes

    store = FeatureStore.open(args.store)
    n, p, d = store.shape
    if d != 1024 or n * p < 800_000:
        sys.exit(f"need a store of at least 1,000 images at 1,024 dims (28 x 28 grid), got {n} x {p} x {d}")
    budget_rows = SoftPatchConfig().bank_budget_mb * 1024**2 // (d * 4)
    # Ask for more rows than the budget allows, so that the bank is capped at it as at 10,000 images.
    # Random init: the backbone only gives the patch grid here (the store holds the features).
    config = SoftPatchConfig(
        pretrained=False,
        discriminator="none",
        coreset="random",
        coreset_ratio=min(1.0, 1.05 * budget_rows / (n * p)),
    )
    meter = PeakRSS()
    model = SoftPatch(config)
    names, sizes = [f"{i}" for i in range(n)], [(256, 256)] * n
    model.fit_embeddings(Embeddings(store, names, sizes, config.feature_key()), build_memory_bank=False)
    time.sleep(0.2)
    before = rss()
    meter.step = "bank"
    started = time.perf_counter()
    bank = model.build_memory_bank()
    bank_seconds = time.perf_counter() - started
    test = Embeddings(store[np.arange(20)], names[:20], sizes[:20], config.feature_key())
    meter.step = "scoring"
    started = time.perf_counter()
    model.score(test, with_maps=False)
    score_seconds = time.perf_counter() - started
    time.sleep(0.2)
    index = bank.prepare_search(torch.device("cpu"), config.search)  # the one built above, not a new one
    search = f"{type(index).__name__} in {index.dim_} directions" if hasattr(index, "dim_") else type(index).__name__
    estimate = coreset_memory_bytes(config, n * p, streaming=True)
    gib = 1024**3
    print(
        f"bank of {len(bank):,} rows ({bank.features.numel() * 4 / gib:.2f} GiB), {search}; RSS before "
        f"{before / gib:.2f} GiB, peak while building {meter.peaks['bank'] / gib:.2f} GiB ({bank_seconds:.0f} s), "
        f"while scoring 20 images {meter.peaks['scoring'] / gib:.2f} GiB ({score_seconds:.0f} s); the estimate "
        f"counts {estimate / gib:.2f} GiB for this stage"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
