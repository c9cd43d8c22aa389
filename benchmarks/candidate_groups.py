"""The look-alike search's group size against accuracy (a script, not a test), on a kept 2,000-image store.

Above ``neighbour_reference`` images, each group of at most ``CANDIDATE_GROUP`` look-alike images shares its
candidates (``softpatch.method.discriminators``). Smaller groups fit each image's candidates more closely and
cost more (fewer, smaller matrix products). This refits the store that ``benchmarks/scale.py --sizes 2000
--real-weights --keep-stores --work DIR`` left in ``DIR`` once per group size (the backbone is not run again)
and prints the vetting AUROC, the test image and pixel AUROCs and the seconds of each refit and scoring, to
set against the exact search's figures that ``scale.py`` printed.

    python benchmarks/candidate_groups.py --work DIR --groups 256,128,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch

import scale  # noqa: E402 - beside this script: the test set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the --work folder of scale.py --keep-stores")
    parser.add_argument("--size", type=int, default=2000, help="which kept size (default 2,000)")
    parser.add_argument("--groups", default="256,128,64", help="group sizes, comma-separated")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from softpatch.config import SoftPatchConfig
    from softpatch.io.feature_store import FeatureStore
    from softpatch.method import discriminators
    from softpatch.method.model import Embeddings, SoftPatch

    work = Path(args.work)
    job_file, store_dir = work / f"job_{args.size}_float16.json", work / f"store_{args.size}"
    if not job_file.is_file() or not store_dir.is_dir():
        sys.exit(f"no kept store of {args.size} images in {work}: run scale.py --keep-stores --work {work} first")
    torch.manual_seed(0)
    job = json.loads(job_file.read_text())
    config = SoftPatchConfig(**job["config"])
    store = FeatureStore.open(store_dir)
    sizes = [Image.open(p).size for p in job["paths"]]
    test = None
    print("| group | vetting AUROC | image AUROC | pixel AUROC | refit and scoring (s) |")
    print("|---:|---:|---:|---:|---:|")
    for group in (int(g) for g in args.groups.split(",")):
        discriminators.CANDIDATE_GROUP = group  # the module's setting, read when the plan is made
        started = time.perf_counter()
        model = SoftPatch(config)
        model.fit_embeddings(Embeddings(store, list(job["paths"]), sizes, config.feature_key()))
        if test is None:
            test, labels, masks = scale._test_set(model)
        accuracy = scale._auroc_pair(model, job["labels"], test, labels, masks)  # what scale.py prints
        print(
            f"| {group} | {accuracy['vetting_auroc']:.4f} | {accuracy['image_auroc']:.4f} "
            f"| {accuracy['pixel_auroc']:.4f} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
