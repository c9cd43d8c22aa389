"""The duplicate check on a large folder (a script, not a test): time and peak memory of its two parts.

What the Data page runs once a model is fitted: every image's pixels hashed (exact copies), then the training
features pooled into image descriptors and compared (near copies). This runs ``find_duplicates`` on a kept
feature store (``benchmarks/scale.py --keep-stores --work DIR``) and the folder of images it was built from
(``DIR/images``, the first N file names in order; the images only need to exist and decode, since the timing
does not depend on which image belongs to which row), and prints each part's seconds, the peak RSS and the
groups found. Copy it into a checkout of an older commit to time the code before on the same store.

    python benchmarks/duplicates_scale.py --store DIR/store_10000 --images DIR/images
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

from scale import PeakRSS, rss  # noqa: E402 - beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a kept feature store folder (DIR/store_N)")
    parser.add_argument("--images", required=True, help="a folder of at least N images (DIR/images)")
    args = parser.parse_args(argv)

    from softpatch.evaluation.duplicates import find_duplicates
    from softpatch.io.feature_store import FeatureStore

    store = FeatureStore.open(args.store)
    n, p, _ = store.shape
    side = math.isqrt(p)
    paths = sorted(str(q) for q in Path(args.images).iterdir() if q.is_file())[:n]
    if len(paths) < n or side * side != p:
        sys.exit(f"need {n} images in {args.images} and a square grid of positions, got {len(paths)} and {p}")
    meter = PeakRSS()
    before = rss()
    meter.step = "pixels"
    started = time.perf_counter()
    exact = find_duplicates(paths)
    pixels_s = time.perf_counter() - started
    meter.step = "features"
    started = time.perf_counter()
    found = find_duplicates(paths, train_features=store, grid=(side, side))
    both_s = time.perf_counter() - started
    meter.step = "done"
    gib = 1024**3
    print(f"{n} images, store {n} x {p} x {store.shape[2]} ({store.dtype}); RSS before {before / gib:.2f} GiB")
    print(
        f"pixels only: {pixels_s:.1f} s, peak {meter.peaks.get('pixels', 0) / gib:.2f} GiB, {len(exact.groups)} groups"
    )
    print(
        f"pixels and features: {both_s:.1f} s, peak {meter.peaks.get('features', 0) / gib:.2f} GiB, "
        f"{len(found.groups)} groups ({sum(g.kind == 'near' for g in found.groups)} near)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
