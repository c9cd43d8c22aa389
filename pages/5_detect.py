"""Detect: score test images, heatmaps with an opacity slider, SoftPatch vs PatchCore side by side, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from softpatch_app import plots, services
from softpatch_app.cache import load_rgb, mask_for
from softpatch_app.guard import user_errors
from softpatch_app.imaging import overlay_mask, thumbnail
from softpatch_app.keys import DETECT
from softpatch_app.loading import LoadedSplit
from softpatch_app.progress import StageProgress
from softpatch_app.state import SessionData, environment, get_session
from softpatch_app.ui import need_model, page_controls, page_header, score_button
from softpatch_app.views import scored_overlay

SOURCES = {"test set": "The test set from the Data page", "upload": "Upload images"}
GALLERY_PAGE_SIZE = 12
GALLERY_PER_ROW = 6
INTRO = (
    "Score test images with the fitted model. Each image gets an **anomaly score** (higher = more likely "
    "defective) and a **heatmap** of where it differs from the good training patches. Plain **PatchCore** (the "
    "same model without denoising) is shown next to SoftPatch, so you can see what cleaning the training set "
    "changed."
)


def _source_section(session: SessionData) -> tuple[LoadedSplit | None, bool]:
    """Which images to score (the test set or an upload) and whether to compare with PatchCore."""
    c1, c2 = st.columns([2, 1])
    source = c1.radio(
        "Images to score",
        ["test set", "upload"] if session.test is not None else ["upload"],
        format_func=SOURCES.get,
        horizontal=True,
        key=DETECT.source,
        help="The test set can carry labels and masks (then quality metrics are shown). Uploaded images are "
        "scored without labels.",
    )
    compare = c2.toggle(
        "Compare with PatchCore",
        value=True,
        key=DETECT.compare,
        help="Also score with plain PatchCore (no denoising) on the same features. Costs one more memory bank.",
    )
    if source == "test set":
        return session.test, compare
    files = st.file_uploader(
        "Images to score",
        accept_multiple_files=True,
        key=DETECT.files,
        help="Any number of image files (PNG, JPEG, BMP, TIFF, …), or a .zip of them.",
    )
    split = None
    if files:
        with user_errors("read the uploaded images"):
            split = services.read_detect_upload(session, environment(), files)
        if split is not None and split.skipped:
            st.warning(
                f"{len(split.skipped)} uploaded files were skipped: "
                + "; ".join(f"{s.path}: {s.reason}" for s in split.skipped[:5])
            )
    return split, compare


def _score_section(session: SessionData, split: LoadedSplit, compare: bool) -> services.Detection | None:
    records = list(split.records)
    detection = services.cached_detection(session, records, compare)
    if detection is not None:
        return detection
    detection = score_button(
        session,
        records,
        labelled=bool(split.labelled),
        compare=compare,
        label=f"Score {len(records)} images",
        help="Computes each image's anomaly score and heatmap (and PatchCore's, when comparing).",
    )
    if detection is None:
        st.caption("Scoring extracts the test features once; re-tuning later only re-runs the fast part.")
    return detection


def _thresholds(session: SessionData, detection: services.Detection):
    """(SoftPatch's threshold, how it was chosen, PatchCore's ChosenThreshold or None)."""
    with user_errors("set the threshold"):
        bars = StageProgress(st.container())
        threshold, why = services.current_threshold(session, progress=bars)
        base = services.baseline_threshold(session, detection, progress=bars) if detection.patchcore else None
        bars.finish()
        return threshold, why, base
    return None


def _side_by_side_section(session: SessionData, detection, threshold: float, why: str, base_choice) -> float:
    """The picked image, SoftPatch's heatmap and PatchCore's; returns the heatmap opacity."""
    transform = session.model.transform_
    c1, c2, c3 = st.columns([2, 1.3, 1.3])
    i = int(
        c1.selectbox(
            "Image",
            [int(k) for k in detection.order],
            format_func=detection.describe,
            key=DETECT.pick,
            help="Sorted by SoftPatch score, most anomalous first.",
        )
    )
    alpha = c2.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key=DETECT.alpha, help="0 shows the photo only.")
    c3.metric(
        "Threshold",
        f"{threshold:.4f}",
        help=f"The one threshold of this session, used here, on the Deploy page, in the bundle and the report: {why}. "
        "Change it on the Deploy page.",
    )
    vrange = detection.map_range()
    base = detection.patchcore
    cols = st.columns(3 if base is not None else 2)
    with cols[0], user_errors("show the image"):
        image = load_rgb(detection.paths[i])
        mask = mask_for(detection.mask_paths[i], image.size) if detection.mask_paths[i] else None
        if mask is not None and mask.any():
            st.image(
                overlay_mask(image, mask, colour=(0, 200, 255), alpha=0.25), caption="Ground truth", width="stretch"
            )
        else:
            st.image(image, caption="Image", width="stretch")
    models = [("SoftPatch", detection.softpatch, threshold)]
    if base is not None:
        models.append(("PatchCore", base, base_choice.threshold))
    for column, (name, result, cut) in zip(cols[1:], models, strict=True):
        with column, user_errors(f"draw the {name} heatmap"):
            score = float(result.image_scores[i])
            overlay = scored_overlay(detection, result, i, transform, alpha=alpha, vrange=vrange, threshold=cut)
            verdict = "DEFECTIVE" if score >= cut else "good"
            st.image(overlay, caption=f"{name} · score {score:.2f} → {verdict}", width="stretch")
    st.caption(
        "Both heatmaps use one colour scale (blue = like the good training patches, red = unlike). Yellow outlines: "
        "the region around the highest scores of every image called defective."
        + (
            f" PatchCore has its own threshold, {base_choice.threshold:.4f}, set by the same rule "
            f"({base_choice.method}): the two models' scores are on different scales."
            if base_choice is not None
            else ""
        )
    )
    return alpha


def _leakage_choice(session: SessionData, detection) -> np.ndarray:
    """(n,) True for the images the metrics leave out: leaked copies of training images, unless asked not to."""
    leaked = np.zeros(len(detection.names), dtype=bool)
    with user_errors("check the test images for leakage"):
        bars = StageProgress(st.container())
        leaked = services.leaked_mask(session, detection, progress=bars)
        bars.finish()
    if not leaked.any():
        return leaked
    keep_out = st.toggle(
        f"Leave out the {int(leaked.sum())} test images that are also in the training folder",
        value=True,
        key=DETECT.leak,
        help="A test image that is also a training image scores as if it were good: its own patches are in the "
        "memory bank. The Data page lists them.",
    )
    if keep_out:
        st.caption(f"Metrics on {int((~leaked).sum())} of {len(leaked)} images (leaked copies left out).")
        return leaked
    st.warning("These metrics include test images that are also in training (leakage).", icon=":material/warning:")
    return np.zeros_like(leaked)


def _metrics_section(session: SessionData, detection, threshold: float, base_choice) -> None:
    if detection.labels is None:
        st.info("These images have no labels, so no quality metrics. Load a labelled test folder on the Data page.")
        return
    if not detection.has_both_classes:
        return
    st.subheader("How well are defects found?")
    exclude = _leakage_choice(session, detection)
    with user_errors("compute the metrics"):
        bars = StageProgress(st.container())
        table = services.evaluate(detection, session.model.transform_, exclude=exclude, progress=bars)
        bars.finish()
    df = pd.DataFrame({name: {k: services.format_metric(v) for k, v in row.items()} for name, row in table.items()})
    st.dataframe(df, width="content")
    st.caption(
        "AUROC: 1.0 = every defective image scores above every good one, 0.5 = chance. Pixel AUROC and AUPRO "
        "measure how well the heatmaps cover the masked defect regions."
    )
    kept = ~exclude
    histograms = [("SoftPatch", detection.softpatch, threshold, DETECT.histogram_softpatch)]
    if detection.patchcore is not None:
        histograms.append(("PatchCore", detection.patchcore, base_choice.threshold, DETECT.histogram_patchcore))
    for column, (name, result, cut, key) in zip(st.columns(2), histograms, strict=False):
        with column:
            figure = plots.score_histogram(
                result.image_scores[kept], detection.labels[kept], threshold=cut, title=f"{name} scores"
            )
            st.plotly_chart(figure, key=key)
    a, b = st.columns(2)
    with a:
        st.plotly_chart(plots.roc_figure(services.roc_curves(detection, table, kept)), key=DETECT.roc)
    with b:
        st.markdown(
            "**Reading these charts.** Each histogram shows the image scores of good (blue) and defective "
            "(orange) test images. The less they overlap, the easier one threshold separates them. The ROC curve "
            "shows every possible threshold at once: the closer it hugs the top-left corner, the better."
        )


def _gallery_section(session: SessionData, detection, threshold: float, alpha: float) -> None:
    """The scored images, most anomalous first, one page at a time (heatmaps drawn for the shown page only)."""
    st.subheader("Most anomalous images")
    span = page_controls(DETECT.gallery_page, len(detection.names), GALLERY_PAGE_SIZE, noun="images")
    shown = [int(k) for k in span.take(detection.order)]
    vrange = detection.map_range()
    transform = session.model.transform_
    for start in range(0, len(shown), GALLERY_PER_ROW):
        row = st.columns(GALLERY_PER_ROW)
        for col, k in zip(row, shown[start : start + GALLERY_PER_ROW], strict=False):
            with col, user_errors("draw a heatmap"):
                img = scored_overlay(
                    detection,
                    detection.softpatch,
                    k,
                    transform,
                    alpha=alpha,
                    vrange=vrange,
                    threshold=threshold,
                    px=220,
                )
                st.image(thumbnail(img, 220), caption=detection.describe(k), width="stretch")


def main() -> None:
    session = get_session()
    page_header(session, "Detect", INTRO)
    if not need_model(session):
        return
    split, compare = _source_section(session)
    if split is None or not len(split):
        st.info("Choose images to score.")
        return
    detection = _score_section(session, split, compare)
    if detection is None:
        return
    if detection.search_note:
        st.caption(detection.search_note)
    chosen = _thresholds(session, detection)
    if chosen is None:
        return
    threshold, why, base_choice = chosen
    alpha = _side_by_side_section(session, detection, threshold, why, base_choice)
    _metrics_section(session, detection, threshold, base_choice)
    _gallery_section(session, detection, threshold, alpha)


main()
