"""ONNX / OpenVINO export: the exported graph reproduces the Python scorer, the file holds backbone + bank once,
the reference script runs without torch, and bad models or inputs get one clear sentence.

The main comparison fits battery_weld with the real mobilenetv1 weights at 128/112 and scores all 128 test
images with both runtimes; the rest uses the random-init resnet18 of conftest at crop 64.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softpatch.cli import main
from softpatch.deployment.bundle import save_bundle
from softpatch.deployment.export import (
    MAP_ATOL,
    SCORE_RTOL,
    _float32_at_least,
    compare_with_scorer,
    export_model,
    read_export_metadata,
)
from softpatch.errors import ExportError
from softpatch.evaluation import metrics
from softpatch.io.images import ImageTransform, load_image
from softpatch.method.model import SoftPatch
from tests.conftest import SHARED

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "softpatch_infer.py"
BATTERY = SHARED / "data" / "battery_weld"


def _load_script():
    spec = importlib.util.spec_from_file_location("softpatch_infer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["softpatch_infer"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


infer = _load_script()


def _score_with_script(model_file: Path, paths: list[Path], runtime: str) -> tuple[dict[str, np.ndarray], object]:
    """The reference script's own decoding, cropping and model calls, in batches of 8 like its command."""
    scorer = infer.Scorer(model_file, runtime=runtime)
    parts = []
    for start in range(0, len(paths), 8):
        parts.append(scorer.score_images([infer.load_image(p) for p in paths[start : start + 8]]))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, scorer


# ------------------------------------------------------------------------------- battery_weld, real weights


@pytest.fixture(scope="module")
def battery(mobilenet_config, tmp_path_factory):
    """A battery_weld fit at 128/112, its test images, their embeddings and a threshold by best F1."""
    from softpatch.io.datasets import load_mvtec

    if not BATTERY.is_dir():
        pytest.skip(f"battery_weld not found at {BATTERY}")
    config = mobilenet_config.replace(resize=128, crop=112, feature_dim=1024)
    dataset = load_mvtec(BATTERY)
    model = SoftPatch(config).fit(dataset.train.records)
    paths = [r.path for r in dataset.test.records]
    labels = np.array([r.label for r in dataset.test.records])
    embeddings = model.embed(paths)
    scores = model.score(embeddings, with_maps=False).image_scores
    # Best F1 cuts at one image's score; halfway down to the next keeps its confusion counts with a margin.
    threshold = metrics.f1_threshold(labels, scores).threshold  # the middle of the widest gap
    return {
        "model": model,
        "paths": paths,
        "embeddings": embeddings,
        "scores": scores,
        "threshold": threshold,
        "dir": tmp_path_factory.mktemp("battery_export"),
    }


def _check_battery(battery, fmt: str, runtime: str) -> None:
    model, threshold = battery["model"], battery["threshold"]
    report = export_model(model, battery["dir"] / "battery", format=fmt, threshold=threshold)
    # Backbone + bank once, in either format: no second copy of the bank, no unused backbone stages.
    assert [f.suffix for f in report.files] == ([".onnx"] if fmt == "onnx" else [".xml", ".bin"])
    assert report.bank_bytes == len(model.memory_bank_) * (1024 + 2) * 4
    assert report.bank_bytes + report.backbone_bytes <= report.file_bytes
    assert report.file_bytes <= report.bank_bytes + report.backbone_bytes + 256 * 1024
    outputs, scorer = _score_with_script(report.model_file, battery["paths"], runtime)
    agreement = compare_with_scorer(model, battery["embeddings"], outputs, threshold)
    n_patches = outputs["patch_scores"].size
    print(f"{fmt}: {agreement}; {report.summary()}")
    assert agreement.images == len(battery["paths"]) == 128
    assert agreement.score_difference <= SCORE_RTOL
    assert agreement.map_difference <= MAP_ATOL
    assert agreement.untied_patches == 0
    assert agreement.tied_patches <= n_patches * 1e-4  # ties are rare: a few patches in 25,088 at most
    # Identical decisions, and a meaningful check of them: both verdicts occur, and no image is close enough to
    # the threshold for the allowed score difference to flip it.
    assert agreement.decisions_differ == 0
    assert 0 < int(outputs["anomalous"].sum()) < len(battery["paths"])
    margin = np.abs(battery["scores"] - threshold) / threshold
    assert margin.min() > SCORE_RTOL
    assert scorer.geometry.threshold == pytest.approx(threshold)
    meta = read_export_metadata(report.model_file)  # from the ONNX protobuf, or the OpenVINO IR's rt_info
    assert float(meta["threshold"]) == threshold and (meta["resize"], meta["crop"]) == ("128", "112")


def test_onnx_reproduces_the_python_scorer_on_battery_weld(battery) -> None:
    _check_battery(battery, "onnx", "onnxruntime")


def test_openvino_reproduces_the_python_scorer_on_battery_weld(battery) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed")
    _check_battery(battery, "openvino", "openvino")


def test_script_pixels_equal_the_package_transform_on_battery_weld(battery) -> None:
    transform = battery["model"].transform_
    geometry = infer.Geometry(transform.resize, transform.crop, transform.offset, 1.0)
    for path in battery["paths"][::8]:
        expected = transform.crop_pixels(load_image(path))
        assert np.array_equal(infer.crop_pixels(infer.load_image(path), geometry), expected)


# ------------------------------------------------------------------------------- small random-init model


@pytest.fixture(scope="module")
def small_model(small_config, extractor, train_embeddings) -> SoftPatch:
    """Shared by the tests below, which must not change it (copy.copy it first)."""
    model = SoftPatch(small_config, extractor=extractor).fit_embeddings(train_embeddings)
    model.threshold_ = 2.5
    return model


@pytest.fixture(scope="module")
def small_onnx(small_model, tmp_path_factory):
    return export_model(small_model, tmp_path_factory.mktemp("small") / "small.onnx")


def test_folded_resnet_export_matches_on_synthetic_images(small_model, small_onnx, synthetic_set) -> None:
    # resnet18's batch norms are folded by torch.fx (mobilenet's are not): the folded runner must export too.
    assert small_model._get_extractor().inference_backbone is not None
    outputs, _ = _score_with_script(small_onnx.model_file, synthetic_set.test, "onnxruntime")
    agreement = compare_with_scorer(small_model, synthetic_set.test, outputs, 2.5)
    assert agreement.ok, agreement
    assert outputs["anomaly_map"].shape == (len(synthetic_set.test), 64, 64)
    assert outputs["patch_scores"].shape == (len(synthetic_set.test), 8, 8)


def test_file_holds_backbone_and_bank_once(small_model, small_onnx) -> None:
    import onnx

    bank = small_model.memory_bank_
    m, d = bank.features.shape
    report = small_onnx
    assert report.bank_rows == m and report.feature_dim == d
    assert report.bank_bytes == m * d * 4 + 2 * m * 4  # rows, squared norms, soft weights
    assert report.backbone_bytes > 1_000_000  # resnet18 up to layer 3: millions of weights
    # The file is the two plus protobuf framing and small constants, not a second copy of either.
    assert report.bank_bytes + report.backbone_bytes <= report.file_bytes
    assert report.file_bytes <= report.bank_bytes + report.backbone_bytes + 256 * 1024
    proto = onnx.load(str(report.model_file))
    bank_sized = [i.name for i in proto.graph.initializer if int(np.prod(i.dims)) == m * d]
    assert bank_sized == ["bank_t"]


def test_bf16_model_exports_in_fp32(small_model, tmp_path) -> None:
    bf16 = copy.copy(small_model)
    bf16.config = small_model.config.replace(precision="bf16")
    report = export_model(bf16, tmp_path / "bf16.onnx")  # checked against the fp32 scorer, the graph's arithmetic
    assert report.probe_agreement.ok
    assert bf16.config.precision == "bf16"  # the caller's model is left as it was
    assert read_export_metadata(report.model_file)["precision"] == "fp32"


def test_metadata_records_threshold_and_preprocessing(small_model, small_onnx, tmp_path) -> None:
    meta = read_export_metadata(small_onnx.model_file)
    transform = small_model.transform_
    assert meta["format"] == "softpatch-export" and meta["format_version"] == "1"
    assert float(meta["threshold"]) == 2.5
    assert (int(meta["resize"]), int(meta["crop"]), int(meta["crop_offset"])) == (72, 64, transform.offset)
    assert meta["opset"] == "17"
    assert int(meta["bank_rows"]) == len(small_model.memory_bank_)
    scorer = infer.Scorer(small_onnx.model_file)
    assert scorer.geometry == infer.Geometry(72, 64, transform.offset, 2.5)


def test_threshold_argument_overrides_the_models(small_model, tmp_path) -> None:
    report = export_model(small_model, tmp_path / "t.onnx", threshold=1e9)
    assert report.threshold == 1e9
    pixels = np.full((2, 64, 64, 3), 128, dtype=np.uint8)
    outputs = infer.Scorer(report.model_file).score_pixels(pixels)
    assert not outputs["anomalous"].any()


def test_decision_threshold_in_float32_is_exact() -> None:
    # For every float32 score s: s >= t (float64) exactly when s >= the graph's float32 threshold.
    rng = np.random.default_rng(0)
    for t in [*rng.uniform(0, 50, 200).tolist(), 3.1, 17.3196334, 1.0, 0.0]:
        t32 = _float32_at_least(t)
        centre = np.float32(t)
        for s in (np.nextafter(centre, np.float32(-np.inf)), centre, np.nextafter(centre, np.float32(np.inf))):
            assert (float(s) >= t) == (s >= np.float32(t32))


# ------------------------------------------------------------------------------- the reference script


_BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'softpatch', 'torchvision', 'timm'):
            raise ImportError('blocked in this test: ' + name)
        return None
sys.meta_path.insert(0, Block())
import runpy
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    assert not any(m.split('.')[0] in ('torch', 'softpatch') for m in sys.modules), 'torch was imported'
"""


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_script_scores_a_folder_without_torch(small_onnx, synthetic_set, tmp_path) -> None:
    out_csv, heat = tmp_path / "scores.csv", tmp_path / "heat"
    folder = synthetic_set.test_bad[0].parent
    done = _run_script(str(small_onnx.model_file), str(folder), "--csv", str(out_csv), "--heatmaps", str(heat))
    assert done.returncode == 0, done.stderr
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected, _ = _score_with_script(small_onnx.model_file, synthetic_set.test_bad, "onnxruntime")
    assert [Path(r["path"]).name for r in rows] == [p.name for p in synthetic_set.test_bad]
    assert [float(r["score"]) for r in rows] == pytest.approx(expected["image_score"].tolist(), rel=1e-6)
    assert [r["anomalous"] == "True" for r in rows] == expected["anomalous"].tolist()
    pngs = sorted(heat.glob("*.png"))
    assert len(pngs) == len(rows)
    assert Image.open(pngs[0]).size == Image.open(synthetic_set.test_bad[0]).size  # drawn on the original image


def test_script_preprocessing_equals_image_transform_for_every_colour_mode(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    images = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "gray16.png": Image.fromarray(rng.integers(0, 65536, (50, 70), dtype=np.uint16)),
        "alpha.png": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (50, 70), dtype=np.uint8)])),
        "palette.gif": Image.fromarray(rgb).convert("P"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the stored pixels are turned before use
    for name, image in images.items():
        image.save(tmp_path / name)
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    transform = ImageTransform(40, 32)
    geometry = infer.Geometry(40, 32, transform.offset, 1.0)
    for path in sorted(tmp_path.iterdir()):
        ours = infer.load_image(path)
        theirs = load_image(path)
        assert ours.size == theirs.size, path.name
        assert np.array_equal(infer.crop_pixels(ours, geometry), transform.crop_pixels(theirs)), path.name
        # ImageTransform's normalised tensor is the graph's arithmetic on these pixels.
        scale, bias = transform.normalisation
        normalised = infer.crop_pixels(ours, geometry).astype(np.float32) * scale + bias
        assert np.array_equal(normalised.transpose(2, 0, 1), transform(theirs).numpy())


def test_script_refuses_wrong_pixels_with_one_sentence(small_onnx) -> None:
    scorer = infer.Scorer(small_onnx.model_file)
    with pytest.raises(infer.InputError, match=r"must be uint8 \(0-255\), got float32"):
        scorer.score_pixels(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(infer.InputError, match=r"shape \(N, 64, 64, 3\).*got \(1, 100, 100, 3\)"):
        scorer.score_pixels(np.zeros((1, 100, 100, 3), dtype=np.uint8))
    with pytest.raises(infer.InputError, match=r"shape \(N, 64, 64, 3\).*got \(64, 64, 3\)"):
        scorer.score_pixels(np.zeros((64, 64, 3), dtype=np.uint8))


def test_script_skips_unreadable_files_and_fails_cleanly(small_onnx, synthetic_set, tmp_path) -> None:
    (tmp_path / "notes.png").write_text("not an image at all")
    good = synthetic_set.test_good[0]
    done = _run_script(str(small_onnx.model_file), str(tmp_path / "notes.png"), str(good))
    assert done.returncode == 0, done.stderr
    assert "skipped: cannot read image" in done.stderr and "notes.png" in done.stderr
    assert "Traceback" not in done.stderr
    only_bad = _run_script(str(small_onnx.model_file), str(tmp_path / "notes.png"))
    assert only_bad.returncode == 2
    assert only_bad.stderr.strip().splitlines()[-1] == "softpatch_infer: error: none of the given images can be read"
    not_a_model = tmp_path / "model.onnx"
    not_a_model.write_bytes(b"garbage")
    bad_model = _run_script(str(not_a_model), str(good))
    assert bad_model.returncode == 2 and "Traceback" not in bad_model.stderr
    assert len(bad_model.stderr.strip().splitlines()) == 1
    assert "cannot be loaded by onnxruntime" in bad_model.stderr


# ------------------------------------------------------------------------------- refusals and the CLI


class _Untraceable(torch.nn.Module):
    """Wraps a backbone and adds an operation that has no ONNX equivalent (an eigen-decomposition)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.inner(x)
        gram = maps[0][:, :3, 0, :3] @ maps[0][:, :3, 0, :3].transpose(-1, -2)
        return [maps[0] + torch.linalg.eigh(gram).eigenvalues.sum() * 0, *maps[1:]]


def test_untraceable_backbone_gives_one_clear_error(small_config, extractor, train_embeddings, tmp_path, capfd) -> None:
    own = copy.deepcopy(extractor)  # the session's extractor is shared: change a copy
    own.inference_backbone = _Untraceable(own.runner)
    model = SoftPatch(small_config, extractor=own).fit_embeddings(train_embeddings)
    model.threshold_ = 1.0
    with pytest.raises(ExportError, match=r"cannot be exported to ONNX: its backbone does not trace") as info:
        export_model(model, tmp_path / "m.onnx")
    assert "linalg_eigh" in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())
    out, err = capfd.readouterr()
    assert "graph" not in out and "graph" not in err  # the exporter's C++ graph dump is kept from the user


def test_export_that_does_not_reproduce_the_scores_is_not_kept(small_model, tmp_path, monkeypatch) -> None:
    import softpatch.deployment.export as export

    real = export.run_exported

    def off_by_one_percent(path, pixels):
        outputs = real(path, pixels)
        return {**outputs, "image_score": outputs["image_score"] * 1.01}

    monkeypatch.setattr(export, "run_exported", off_by_one_percent)
    with pytest.raises(ExportError, match=r"does not reproduce this package's scores .*it was not kept"):
        export_model(small_model, tmp_path / "m", format="onnx")
    assert not list(tmp_path.iterdir())


def test_model_without_threshold_is_refused(small_config, extractor, train_embeddings, tmp_path) -> None:
    model = SoftPatch(small_config, extractor=extractor).fit_embeddings(train_embeddings)
    with pytest.raises(ExportError, match="has no threshold"):
        export_model(model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.onnx", format="tflite", threshold=1.0)
    assert not list(tmp_path.iterdir())


def test_cli_export(small_model, small_onnx, synthetic_set, tmp_path, capsys) -> None:
    bundle = save_bundle(small_model, tmp_path / "m.softpatch", threshold=3.0)
    assert main(["export", str(bundle), "--format", "onnx", "-o", str(tmp_path / "line")]) == 0
    out = capsys.readouterr().out
    assert "line.onnx" in out and "memory bank" in out and "backbone" in out
    assert float(read_export_metadata(tmp_path / "line.onnx")["threshold"]) == 3.0
    # Exported from the loaded bundle: the same graph as from the fitted model.
    pixels = np.stack([small_model.transform_.crop_pixels(load_image(p)) for p in synthetic_set.test])
    from_bundle = infer.Scorer(tmp_path / "line.onnx").score_pixels(pixels)
    from_model = infer.Scorer(small_onnx.model_file).score_pixels(pixels)
    assert np.array_equal(from_bundle["image_score"], from_model["image_score"])
    assert np.array_equal(from_bundle["anomaly_map"], from_model["anomaly_map"])
    assert main(["export", str(tmp_path / "missing.softpatch"), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"softpatch: error: bundle not found: {tmp_path / 'missing.softpatch'}"]
    unset = copy.copy(small_model)
    unset.threshold_ = None
    no_threshold = save_bundle(unset, tmp_path / "n.softpatch")
    assert main(["export", str(no_threshold), "-o", str(tmp_path / "y.onnx")]) == 2
    assert "has no threshold" in capsys.readouterr().err
