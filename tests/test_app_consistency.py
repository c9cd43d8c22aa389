"""App-side helpers for one consistent story: outlines follow verdicts, the removed-patch sentence, the CLI line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from softpatch.io.heatmaps import outline_level
from softpatch.io.images import ImageTransform
from softpatch_app import services
from softpatch_app.views import detection_overlay, outlier_with_removed


@pytest.mark.parametrize(
    ("threshold", "score", "peak", "expected"),
    [(5.0, 4.0, 3.5, None), (5.0, 6.0, 5.5, 5.0), (5.0, 6.0, 3.0, 2.5), (5.0, 5.0, 4.0, 4.0)],
)
def test_outline_level_agrees_with_the_verdict(threshold, score, peak, expected) -> None:
    assert outline_level(threshold, score, peak) == expected
    level = outline_level(threshold, score, peak)
    if score >= threshold:
        assert level <= peak  # the peak, at least, is outlined on every image called defective


def test_a_defective_image_whose_blurred_map_stays_below_the_threshold_is_outlined(tmp_path) -> None:
    path = tmp_path / "part.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    transform = ImageTransform(64, 64)
    amap = np.zeros((64, 64), dtype=np.float32)
    amap[20:30, 20:30] = 4.0  # the blur kept the peak at 4, the image score (max patch) is 6
    drawn = np.asarray(
        detection_overlay(str(path), amap, transform, alpha=0.0, vrange=(0.0, 6.0), threshold=5.0, image_score=6.0)
    )
    plain = np.asarray(detection_overlay(str(path), amap, transform, alpha=0.0, vrange=(0.0, 6.0), threshold=5.0))
    assert (drawn != plain).any(axis=-1).sum() > 0  # outlined only when the verdict is known
    passing = np.asarray(
        detection_overlay(str(path), amap, transform, alpha=0.0, vrange=(0.0, 6.0), threshold=5.0, image_score=4.5)
    )
    assert (passing == plain).all()


def _vetting(removed_fraction) -> services.Vetting:
    n = len(removed_fraction)
    return services.Vetting(
        names=[f"{i}.png" for i in range(n)],
        paths=[f"/x/{i}.png" for i in range(n)],
        suspicion=np.zeros(n),
        removed_fraction=np.asarray(removed_fraction, dtype=float),
        ranking=np.arange(n),
        outlier_scores=np.zeros((n, 2, 2)),
        removed_mask=np.zeros((n, 2, 2), dtype=bool),
    )


def test_removed_explanation_compares_with_the_typical_image() -> None:
    vet = _vetting([0.10, 0.12, 0.11, 0.60])
    text = services.removed_explanation(vet, 3, 0.15, "global")
    assert text.startswith("60.0% of this image's patches were removed, 5.2x the typical image's share (median 11.5%)")
    assert "nearly every image loses a few" in text and "per-position cut" in text
    assert "about as many as a typical image" in services.removed_explanation(vet, 0, 0.15, "global")
    assert "every position loses the same share" in services.removed_explanation(vet, 0, 0.15, "position")


def test_outlier_view_outlines_the_removed_patches(tmp_path) -> None:
    from softpatch_app.imaging import Geometry

    path = tmp_path / "part.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    geom = Geometry.of(ImageTransform(64, 64), (4, 4))
    scores = np.arange(16, dtype=np.float32).reshape(4, 4)
    removed = np.zeros((4, 4), dtype=bool)
    none = np.asarray(outlier_with_removed(str(path), scores, removed, geom, (0.0, 15.0)))
    removed[3, 3] = True
    one = np.asarray(outlier_with_removed(str(path), scores, removed, geom, (0.0, 15.0)))
    changed = np.argwhere((none != one).any(axis=-1))
    assert changed.size and changed.min(axis=0).tolist() >= [40, 40]  # only around the bottom-right patch


def test_the_cli_line_parses_with_the_real_parser() -> None:
    from softpatch.cli import build_parser

    line = services.cli_score_command("model-1.softpatch")
    assert line[:3] == ["softpatch", "score", "model-1.softpatch"]
    args = build_parser().parse_args(line[1:])
    assert args.bundle == "model-1.softpatch" and args.json


@pytest.mark.parametrize(("colour_by", "n_images"), [("status", 3), ("weight", 3), ("image", 3), ("image", 40)])
def test_coreset_map_selects_on_click_and_names_every_point(colour_by: str, n_images: int) -> None:
    from softpatch_app.plots import coreset_scatter

    n = 120
    rng = np.random.default_rng(0)
    sources = [f"img{i % n_images}.png" for i in range(n)]
    fig = coreset_scatter(
        rng.normal(size=(n, 2)),
        colour_by=colour_by,
        removed=np.arange(n) % 5 == 0,
        weights=rng.uniform(size=n),
        sources=sources,
        rows=np.zeros(n, int),
        cols=np.zeros(n, int),
        in_bank=np.arange(n) % 5 != 0,
    )
    assert "select" in fig.layout.clickmode
    assert sum(len(t.x) for t in fig.data) == n
    for trace in fig.data:
        assert "%{customdata[1]}" in trace.hovertemplate  # the source image, whatever the colouring
    if colour_by == "image" and n_images <= 24:
        assert sorted(t.name for t in fig.data) == sorted(set(sources))  # a legend entry per image


def test_the_sidebar_tells_the_true_weights_state(tmp_path) -> None:
    from types import SimpleNamespace

    from softpatch_app.settings import AppSettings
    from softpatch_app.state import SessionData
    from softpatch_app.ui import weights_status
    from softpatch_app.workspace import Workspace

    session = SessionData(workspace=Workspace.create(tmp_path), settings=AppSettings())
    kind, text = weights_status(session)
    assert kind == "markdown" and "not loaded yet" in text, "before any fit nobody knows the weights can be had"
    session.weights_problem = "pretrained weights could not be downloaded"
    kind, text = weights_status(session)
    assert kind == "error" and "could not be had" in text
    session.model = SimpleNamespace(config=AppSettings().fit_config())  # a fit has loaded them
    kind, text = weights_status(session)
    assert kind == "markdown" and text.endswith("loaded")
    session.model = None
    session.settings = AppSettings(weights_mode="random")
    assert weights_status(session)[0] == "warning"
