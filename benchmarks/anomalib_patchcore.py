"""Time anomalib's PatchCore fit on a list of images (runs inside the separate anomalib virtual environment).

Not part of softpatch: ``benchmarks/speed.py`` creates ``.venv-anomalib`` and runs this file there, so
that anomalib is a peer to compare with, never a dependency. It uses anomalib's own torch model
(``PatchcoreModel``: timm wide_resnet50_2, layer2 + layer3, 3x3 average pooling, concatenation) and
its own ``KCenterGreedy`` coreset (sparse random projection + greedy k-centre), i.e. exactly what
``Patchcore.fit`` runs after the training epoch, without Lightning's Engine (which adds loggers,
callbacks and a validation pass, but no fit computation).

The greedy coreset over ~180k patches takes tens of minutes on a small CPU. With
``--coreset-iterations N`` only the first N greedy iterations run (anomalib's own loop, cut short);
their mean time is extrapolated to the full count and the result is labelled ``extrapolated``.
``--coreset-iterations 0`` runs the full coreset.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path


class _TimedLoop:
    """Stands in for ``tqdm`` in anomalib's k-centre module: records when the greedy loop starts and ends."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.iterations = 0

    def __call__(self, iterable, *args, **kwargs):
        def gen():
            self.start = time.perf_counter()
            for item in iterable:
                self.iterations += 1
                yield item
            self.end = time.perf_counter()

        return gen()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, type=Path, help="text file with one image path per line")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=32, help="anomalib's default train_batch_size is 32")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument(
        "--coreset-iterations",
        type=int,
        default=200,
        help="time this many greedy iterations and extrapolate; 0 = run the full coreset",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t_import = time.perf_counter()
    import anomalib
    import torch
    from anomalib.data.utils import read_image
    from anomalib.models.components.sampling import k_center_greedy
    from anomalib.models.image.patchcore.lightning_model import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    import_s = time.perf_counter() - t_import

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    paths = [line.strip() for line in args.files.read_text().splitlines() if line.strip()]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_fit = time.perf_counter()
    # --- model construction (random init: no network here; weights do not change speed)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False).to(device)
    model.train()  # Lightning's training epoch: forward() stores embeddings (the backbone itself stays in eval)
    transform = Patchcore.configure_pre_processor(
        image_size=(args.resize, args.resize), center_crop_size=(args.crop, args.crop)
    ).transform
    sync()
    load_s = time.perf_counter() - t_fit

    # --- feature extraction: decode, resize/crop/normalise, backbone, pooling, embedding (the training epoch)
    t_feat = time.perf_counter()
    for start in range(0, len(paths), args.batch_size):
        batch = torch.stack([transform(read_image(p, as_tensor=True)) for p in paths[start : start + args.batch_size]])
        model(batch.to(device))
    sync()
    features_s = time.perf_counter() - t_feat
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    dim = int(model.embedding_store[0].shape[1])

    # --- coreset: anomalib's PatchcoreModel.subsample_embedding, with the greedy loop optionally cut short
    t_core = time.perf_counter()
    bank = torch.vstack(model.embedding_store)
    model.embedding_store.clear()
    sampler = k_center_greedy.KCenterGreedy(embedding=bank, sampling_ratio=args.coreset_ratio)
    full_size = sampler.coreset_size
    sample_mode = 0 < args.coreset_iterations < full_size - 1
    if sample_mode:
        sampler.coreset_size = args.coreset_iterations + 1  # the loop runs coreset_size - 1 times
    loop = _TimedLoop()
    original_tqdm = k_center_greedy.tqdm
    k_center_greedy.tqdm = loop
    try:
        coreset = sampler.sample_coreset()
    finally:
        k_center_greedy.tqdm = original_tqdm
    sync()
    t_end = time.perf_counter()
    model.memory_bank = coreset
    projection_s = loop.start - t_core  # vstack + sparse random projection fit/transform
    per_iteration_s = (loop.end - loop.start) / max(loop.iterations, 1)
    gather_s = t_end - loop.end
    coreset_s = projection_s + per_iteration_s * (full_size - 1) + gather_s
    fit_s = load_s + features_s + coreset_s

    result = {
        "tool": "anomalib",
        "anomalib_version": anomalib.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "images": len(paths),
        "patches": n_patches,
        "feature_dim": dim,
        "coreset_size": full_size,
        "coreset_iterations_timed": loop.iterations,
        "coreset_mode": "extrapolated" if sample_mode else "full",
        "import_s": import_s,
        "model_load_s": load_s,
        "features_s": features_s,
        "features_images_per_s": len(paths) / features_s,
        "coreset_projection_s": projection_s,
        "coreset_s_per_iteration": per_iteration_s,
        "coreset_s": coreset_s,
        "fit_s": fit_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
