"""The app-side helpers (softpatch_app): settings from the environment, drawing geometry, exports, report."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch.io.datasets import ImageRecord
from softpatch.io.images import ImageTransform
from softpatch_app import exports, imaging, plots
from softpatch_app.embedding import subsample
from softpatch_app.html_report import ReportContent, ReportImage, build_report
from softpatch_app.progress import StageProgress
from softpatch_app.settings import read_environment


def test_environment_defaults_and_overrides(tmp_path: Path) -> None:
    env = read_environment({})
    assert env.settings.backbone == "wide_resnet50_2" and env.settings.weights_mode == "pretrained"
    assert (env.settings.resize, env.settings.crop) == (256, 224)
    assert not env.warnings
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    env = read_environment(
        {
            "SOFTPATCH_BACKBONE": "resnet18",
            "SOFTPATCH_WEIGHTS": str(weights),
            "SOFTPATCH_BACKBONE_KWARGS": '{"bn_eps": 0.001}',
            "SOFTPATCH_DEVICE": "cpu",
            "SOFTPATCH_RESIZE": "160",
            "SOFTPATCH_CROP": "144",
            "SOFTPATCH_MAX_UPLOAD_MB": "5",
            "SOFTPATCH_WORK_DIR": str(tmp_path / "work"),
        }
    )
    s = env.settings
    assert (s.backbone, s.weights_mode, s.weights_path, s.device) == ("resnet18", "file", str(weights), "cpu")
    assert s.backbone_kwargs == {"bn_eps": 0.001} and (s.resize, s.crop) == (160, 144)
    assert env.limits.max_upload_bytes == 5 * 2**20
    assert env.workdir == tmp_path / "work"
    config = s.fit_config()
    assert config.weights_source == "file" and config.weights == str(weights)


def test_bad_environment_values_become_warnings() -> None:
    env = read_environment(
        {
            "SOFTPATCH_BACKBONE_KWARGS": "[1, 2]",
            "SOFTPATCH_DEVICE": "tpu",
            "SOFTPATCH_RESIZE": "big",
            "SOFTPATCH_CROP": "999",
            "SOFTPATCH_WEIGHTS": "/no/such/file",
        }
    )
    text = " ".join(env.warnings)
    for needle in ("SOFTPATCH_BACKBONE_KWARGS", "SOFTPATCH_DEVICE", "SOFTPATCH_RESIZE", "SOFTPATCH_CROP", "not a file"):
        assert needle in text
    assert env.settings.device == "auto" and env.settings.crop <= env.settings.resize


def test_cell_boxes_follow_the_core_transform() -> None:
    """A patch-grid cell drawn on the original image covers the pixels the transform maps into that cell."""
    transform = ImageTransform(256, 224)
    geom = imaging.Geometry.of(transform, (28, 28))
    size = (400, 300)
    # Mark one cell (row 5, col 9) in crop coordinates and map it back with the core's own geometry.
    crop_map = np.zeros((224, 224), np.float32)
    crop_map[5 * 8 : 6 * 8, 9 * 8 : 10 * 8] = 1.0
    back = transform.map_to_original(crop_map, size) > 0.5
    ys, xs = np.nonzero(back)
    x0, y0, x1, y1 = geom.cell_box(5, 9, size)
    assert abs(xs.min() - x0) <= 2 and abs(xs.max() + 1 - x1) <= 2
    assert abs(ys.min() - y0) <= 2 and abs(ys.max() + 1 - y1) <= 2
    mask = geom.grid_mask_to_original(np.eye(28, dtype=bool)[:, ::-1], size)
    assert mask.shape == (300, 400) and mask.any()
    assert geom.cell_box(0, 0, size, pad=1)[:2] == (12, 9)  # (16 - 8) px of 256 -> of 400 / 300


def test_overlays_keep_size_and_mark_pixels() -> None:
    image = Image.new("RGB", (120, 80), (100, 100, 100))
    mask = np.zeros((80, 120), bool)
    mask[20:40, 30:60] = True
    out = np.asarray(imaging.overlay_mask(image, mask))
    assert out.shape == (80, 120, 3)
    assert out[30, 45, 0] > out[30, 45, 1] and (out[0, 0] == 100).all()
    heat = imaging.overlay_heatmap(image, np.linspace(0, 1, 80 * 120).reshape(80, 120), alpha=0.5, vmin=0, vmax=1)
    assert heat.size == image.size
    outlined = np.asarray(imaging.draw_outline(image, mask))
    assert (outlined[20, 45] == imaging.OUTLINE_COLOUR).all() and (outlined[30, 45] == 100).all()
    crop = imaging.patch_crop(image, (10, 10, 30, 20), out=64)
    assert max(crop.size) == 64


def test_subsample_keeps_removed_patches_visible() -> None:
    bank, removed = subsample(10_000, 50, max_points=2000)
    assert len(removed) == 50 and len(bank) + len(removed) <= 2000
    bank, removed = subsample(10_000, 10_000, max_points=2000)
    assert len(removed) >= 600 and len(bank) + len(removed) <= 2000
    again = subsample(10_000, 10_000, max_points=2000)
    assert (again[0] == bank).all(), "deterministic"


def test_cleaned_zip_leaves_out_defective_images(tmp_path: Path) -> None:
    records = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8)).save(p)
        records.append(ImageRecord(p, relpath=f"train/good/{i}.png"))
    labels = {"train/good/1.png": "defective", "train/good/2.png": "unsure"}
    path, count = exports.cleaned_zip(records, labels, tmp_path / "out" / "clean.zip")
    assert count == 2
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["train/good/0.png", "train/good/2.png"]
    text = exports.cleaned_list_csv(records, labels)
    assert "1.png" not in text and "unsure" in text


def test_report_is_self_contained() -> None:
    fig = plots.outlier_histogram(np.random.default_rng(0).random(1000), np.arange(1000) > 900, tau=0.1)
    content = ReportContent(
        dataset="demo <b>",
        settings={"tau": "0.1"},
        summary={"images": "3"},
        removed_examples=[ReportImage("first", [Image.new("RGB", (20, 20)), Image.new("RGB", (20, 20))])],
        coreset_figure=fig,
        figures=[("again", fig)],
    )
    html = build_report(content)
    assert html.count('<script type="text/javascript">/**') <= 1, "plotly.js is embedded once"
    assert "demo &lt;b&gt;" in html and "data:image/jpeg;base64," in html


def test_progress_draws_one_bar_per_stage() -> None:
    class Bar:
        def __init__(self):
            self.calls = []

        def progress(self, value, text=""):
            self.calls.append((value, text))
            return self

    class Container:
        def __init__(self):
            self.bars = []

        def empty(self):
            return self

        def container(self):
            return self

        def progress(self, value, text=""):
            bar = Bar()
            bar.calls.append((value, text))
            self.bars.append(bar)
            return bar

    box = Container()
    cb = StageProgress(box, min_interval=0)
    for stage in ("features", "discriminator", "coreset"):
        for k in range(3):
            cb(k / 2, f"{stage}: step {k}")
    cb(1.0, "scoring: done")
    assert [b.calls[0][1].split(" —")[0] for b in box.bars] == [
        "Extracting patch features",
        "Scoring patches for noise",
        "Building the memory bank (coreset)",
        "Scoring images",
    ]
    assert box.bars[0].calls[-1][0] == pytest.approx(1.0)


def test_image_sizes_read_each_header_once_per_list_and_again_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from softpatch_app import cache

    cache._image_sizes.clear()
    reads: list[str] = []
    real = cache.image_size
    monkeypatch.setattr(cache, "image_size", lambda path: reads.append(str(path)) or real(path))
    paths = []
    for i, size in enumerate([(30, 20), (16, 16), (8, 40)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", size).save(paths[-1])
    gone = tmp_path / "gone.png"
    assert cache.image_sizes([*paths, gone]) == [(30, 20), (16, 16), (8, 40), (0, 0)]
    assert len(reads) == 4
    assert cache.image_sizes([*paths, gone]) == [(30, 20), (16, 16), (8, 40), (0, 0)]
    assert len(reads) == 4, "a rerun of the page reads no header again"
    Image.new("RGB", (12, 12)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a new token even on a file system with coarse times
    assert cache.image_sizes([*paths, gone])[1] == (12, 12)
