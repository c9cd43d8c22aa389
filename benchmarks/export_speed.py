"""Exported models against the package's own scorer, on the same CPU in one run (a script, not a test).

Fits battery_weld (its 37 training images) with the real ImageNet MobileNet v1 weights from ../shared/weights,
exports the model to ONNX and to OpenVINO, and scores the 128 test images three ways, interleaved so that
other load on the machine hits all of them alike:

- ``softpatch``: ``SoftPatch.score(images)`` on decoded PIL images (transform, backbone, search, maps);
- ``onnxruntime`` and ``openvino``: the reference script's ``Scorer.score_images`` on the same decoded
  images in batches of 8 (Pillow resize and crop, then the exported graph).

Each runtime uses its default threads (all cores). It prints images per second (median and min-max of
the runs after a warm-up), the exported file sizes next to the backbone and bank they hold, and how
closely each export reproduced the package's scores on these images.

    .venv/bin/python benchmarks/export_speed.py [--resize 256 --crop 224] [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softpatch import metrics  # noqa: E402
from softpatch.config import SoftPatchConfig  # noqa: E402
from softpatch.deployment.bundle import save_bundle  # noqa: E402
from softpatch.deployment.export import compare_with_scorer, export_model  # noqa: E402
from softpatch.io.datasets import load_mvtec  # noqa: E402
from softpatch.io.images import load_image  # noqa: E402
from softpatch.method.model import SoftPatch  # noqa: E402

SHARED = Path(os.environ.get("SOFTPATCH_SHARED_DIR") or ROOT.parent / "shared")  # as in tests/conftest.py
MOBILENET = SHARED / "weights" / "mobilenetv1_100_keras_in1k.safetensors"
BATCH = 8


def _reference_script():
    spec = importlib.util.spec_from_file_location("softpatch_infer", ROOT / "deploy" / "softpatch_infer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["softpatch_infer"] = module
    spec.loader.exec_module(module)
    return module


def _in_batches(scorer, images) -> dict[str, np.ndarray]:
    parts = [scorer.score_images(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per scorer after one warm-up (default 3)")
    parser.add_argument("--data", default=str(SHARED / "data" / "battery_weld"))
    args = parser.parse_args()
    infer = _reference_script()

    config = SoftPatchConfig(
        backbone="mobilenetv1_100",
        backbone_kwargs={"bn_eps": 0.001, "pad_type": "same"},
        weights=str(MOBILENET),
        resize=args.resize,
        crop=args.crop,
        device="cpu",
    )
    dataset = load_mvtec(args.data)
    model = SoftPatch(config).fit(dataset.train.records)
    images = [load_image(r.path) for r in dataset.test.records]
    labels = np.array([r.label for r in dataset.test.records])
    scores = model.score(images, with_maps=False).image_scores
    threshold = metrics.f1_threshold(labels, scores).threshold  # the middle of the widest gap
    print(
        f"battery_weld: {len(dataset.train.records)} training / {len(images)} test images, mobilenetv1_100 (real "
        f"weights), {args.resize}/{args.crop}, memory bank {len(model.memory_bank_)} x {config.feature_dim}"
    )

    scorers = {"softpatch": lambda: model.score(images, with_maps=True)}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle_bytes = save_bundle(model, Path(tmp) / "battery.softpatch", threshold=threshold).stat().st_size
        for fmt, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            try:
                report = export_model(model, Path(tmp) / "battery", format=fmt, threshold=threshold)
                scorer = infer.Scorer(report.model_file, runtime=runtime)
            except Exception as exc:  # noqa: BLE001 - a runtime missing here is reported, not fatal
                print(f"{runtime}: not measured ({exc})")
                continue
            reports[runtime] = report
            scorers[runtime] = lambda scorer=scorer: _in_batches(scorer, images)
        times: dict[str, list[float]] = {name: [] for name in scorers}
        outputs = {}
        for name, run in scorers.items():  # warm-up: first sessions, caches, thread pools
            outputs[name] = run()
        for _ in range(args.runs):
            for name, run in scorers.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

        print(f"\n| scorer | img/s, median [min-max] of {args.runs} | file MB | backbone MB | bank MB |")
        print("| --- | --- | --- | --- | --- |")
        mb = 2**20
        for name, spans in times.items():
            rates = sorted(len(images) / s for s in spans)
            cell = f"{statistics.median(rates):.1f} [{rates[0]:.1f}-{rates[-1]:.1f}]"
            report = reports.get(name)
            if report:
                sizes = (
                    f"{report.file_bytes / mb:.1f} | {report.backbone_bytes / mb:.1f} | {report.bank_bytes / mb:.1f}"
                )
            else:  # the package scores from its bundle, which also keeps the training vetting data
                sizes = f"{bundle_bytes / mb:.1f} (bundle) | | "
            print(f"| {name} | {cell} | {sizes} |")
        print()
        for name, report in reports.items():
            agreement = compare_with_scorer(model, images, outputs[name], threshold)
            print(
                f"{name}: image scores within {agreement.score_difference:.1e} relative, maps within "
                f"{agreement.map_difference:.1e} ({agreement.raw_map_difference:.1e} before {agreement.tied_patches} "
                f"tied patches take the export's pick), {agreement.untied_patches} other patches differ, "
                f"{agreement.decisions_differ} decisions differ at threshold {threshold:.4f}; "
                f"{report.distance_bytes_per_image / mb:.1f} MB of distances per image"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
