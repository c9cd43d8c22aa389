"""Detect: score test images, heatmaps with an opacity slider, SoftPatch vs PatchCore side by side, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from softpatch.io.datasets import scan_images
from softpatch.io.paths import ReadScope
from softpatch_app import loading, plots, services
from softpatch_app.cache import load_rgb, mask_for
from softpatch_app.guard import user_errors
from softpatch_app.imaging import overlay_mask, thumbnail
from softpatch_app.progress import StageProgress
from softpatch_app.state import SessionData, environment, get_session
from softpatch_app.ui import need_model, show_notices
from softpatch_app.views import detection_overlay, score_range

session: SessionData = get_session()
env = environment()

st.title("Detect")
show_notices(session)
st.markdown(
    "Score test images with the fitted model. Each image gets an **anomaly score** (higher = more likely "
    "defective) and a **heatmap** of where it differs from the good training patches. Plain **PatchCore** (the "
    "same model without denoising) is shown next to SoftPatch, so you can see what cleaning the training set "
    "changed."
)
if not need_model(session):
    st.stop()
model = session.model

sources = ["test set", "upload"] if session.test is not None else ["upload"]
c1, c2 = st.columns([2, 1])
source = c1.radio(
    "Images to score",
    sources,
    format_func={"test set": "The test set from the Data page", "upload": "Upload images"}.get,
    horizontal=True,
    key="dt_source",
    help="The test set can carry labels and masks (then quality metrics are shown). Uploaded images are scored "
    "without labels.",
)
compare = c2.toggle(
    "Compare with PatchCore",
    value=True,
    key="dt_compare",
    help="Also score with plain PatchCore (no denoising) on the same features. Costs one more memory bank.",
)

split: loading.LoadedSplit | None = None
if source == "test set":
    split = session.test
else:
    files = st.file_uploader(
        "Images to score",
        accept_multiple_files=True,
        key="dt_files",
        help="Any number of image files (PNG, JPEG, BMP, TIFF, …), or a .zip of them.",
    )
    if files:
        token = tuple((f.file_id, f.name, f.size) for f in files)
        cached = session.detect_upload
        if cached and cached[0] == token:
            split = cached[1]
        else:
            with user_errors("read the uploaded images"):
                root, skipped = loading.save_browser_files(files, session.workspace, session.slot("detect"), env.limits)
                folder = scan_images(root, limits=env.limits, scope=ReadScope.of([session.workspace.path]))
                split = loading.with_upload_skips(loading.LoadedSplit(folder, "upload", "uploaded images"), skipped)
                session.detect_upload = (token, split)
        if split is not None and split.skipped:
            st.warning(
                f"{len(split.skipped)} uploaded files were skipped: "
                + "; ".join(f"{s.path}: {s.reason}" for s in split.skipped[:5])
            )
if split is None or not len(split):
    st.info("Choose images to score.")
    st.stop()

records = list(split.records)
labelled = bool(split.labelled)
detection = services.cached_detection(session, records, compare)
if detection is None:
    if st.button(
        f"Score {len(records)} images",
        type="primary",
        icon=":material/play_arrow:",
        help="Computes each image's anomaly score and heatmap (and PatchCore's, when comparing).",
    ):
        bars = StageProgress(st.container())
        with user_errors("score the images"):
            detection = services.score_test(session, records, labelled=labelled, progress=bars, compare=compare)
            bars.finish()
    if detection is None:
        st.caption("Scoring extracts the test features once; re-tuning later only re-runs the fast part.")
        st.stop()

soft, base = detection.softpatch, detection.patchcore
transform = model.transform_

# ----------------------------------------------------------------------------------------------- controls
with user_errors("set the threshold"):
    bars = StageProgress(st.container())
    threshold, why = services.current_threshold(session, progress=bars)
    base_choice = services.baseline_threshold(session, detection, progress=bars) if base is not None else None
    bars.finish()
c1, c2, c3 = st.columns([2, 1.3, 1.3])
order = np.argsort(-soft.image_scores, kind="stable")


def describe(i: int) -> str:
    label = ""
    if detection.labels is not None:
        label = " · defective" if detection.labels[i] else " · good"
    return f"{detection.names[i]} — score {soft.image_scores[i]:.2f}{label}"


pick = c1.selectbox(
    "Image",
    [int(i) for i in order],
    format_func=describe,
    key="dt_pick",
    help="Sorted by SoftPatch score, most anomalous first.",
)
alpha = c2.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="dt_alpha", help="0 shows the photo only.")
c3.metric(
    "Threshold",
    f"{threshold:.4f}",
    help=f"The one threshold of this session, used here, on the Deploy page, in the bundle and the report: {why}. "
    "Change it on the Deploy page.",
)

# ----------------------------------------------------------------------------------------------- side by side
maps = [soft.anomaly_maps] + ([base.anomaly_maps] if base is not None else [])
vrange = score_range(np.concatenate([m.reshape(-1) for m in maps]))
base_threshold = base_choice.threshold if base_choice is not None else None

i = int(pick)
cols = st.columns(3 if base is not None else 2)
with cols[0], user_errors("show the image"):
    image = load_rgb(detection.paths[i])
    mask = mask_for(detection.mask_paths[i], image.size) if detection.mask_paths[i] else None
    if mask is not None and mask.any():
        st.image(overlay_mask(image, mask, colour=(0, 200, 255), alpha=0.25), caption="Ground truth", width="stretch")
    else:
        st.image(image, caption="Image", width="stretch")


def heatmap(column, name: str, result, cut: float) -> None:
    """One model's heatmap of image ``i`` against its own threshold, the verdict in the caption."""
    with column, user_errors(f"draw the {name} heatmap"):
        score = float(result.image_scores[i])
        overlay = detection_overlay(
            detection.paths[i],
            result.anomaly_maps[i],
            transform,
            alpha=alpha,
            vrange=vrange,
            threshold=cut,
            image_score=score,
        )
        verdict = "DEFECTIVE" if score >= cut else "good"
        st.image(overlay, caption=f"{name} · score {score:.2f} → {verdict}", width="stretch")


heatmap(cols[1], "SoftPatch", soft, threshold)
if base is not None:
    heatmap(cols[2], "PatchCore", base, base_threshold)
st.caption(
    "Both heatmaps use one colour scale (blue = like the good training patches, red = unlike). Yellow outlines: "
    "the region around the highest scores of every image called defective."
    + (
        f" PatchCore has its own threshold, {base_threshold:.4f}, set by the same rule ({base_choice.method}): "
        "the two models' scores are on different scales."
        if base_choice is not None
        else ""
    )
)

# ----------------------------------------------------------------------------------------------- metrics
if detection.labels is not None and 0 < int(detection.labels.sum()) < len(detection.labels):
    st.subheader("How well are defects found?")
    leaked = np.zeros(len(detection.names), dtype=bool)
    with user_errors("check the test images for leakage"):
        bars = StageProgress(st.container())
        leaked = services.leaked_mask(session, detection, progress=bars)
        bars.finish()
    exclude = leaked.copy()
    if leaked.any():
        keep_out = st.toggle(
            f"Leave out the {int(leaked.sum())} test images that are also in the training folder",
            value=True,
            key="dt_leak",
            help="A test image that is also a training image scores as if it were good: its own patches are in the "
            "memory bank. The Data page lists them.",
        )
        if keep_out:
            st.caption(f"Metrics on {int((~leaked).sum())} of {len(leaked)} images (leaked copies left out).")
        else:
            exclude[:] = False
            st.warning(
                "These metrics include test images that are also in training (leakage).", icon=":material/warning:"
            )
    with user_errors("compute the metrics"):
        bars = StageProgress(st.container())
        table = services.evaluate(detection, transform, exclude=exclude, progress=bars)
        bars.finish()

    def fmt(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else f"n/a ({v})"

    df = pd.DataFrame({name: {k: fmt(v) for k, v in row.items()} for name, row in table.items()})
    st.dataframe(df, width="content")
    st.caption(
        "AUROC: 1.0 = every defective image scores above every good one, 0.5 = chance. Pixel AUROC and AUPRO "
        "measure how well the heatmaps cover the masked defect regions."
    )
    kept = ~exclude
    curves = {
        "SoftPatch": (
            *services.roc_points(detection.labels[kept], soft.image_scores[kept]),
            table["SoftPatch"]["image AUROC"],
        )
    }
    if base is not None:
        curves["PatchCore"] = (
            *services.roc_points(detection.labels[kept], base.image_scores[kept]),
            table["PatchCore"]["image AUROC"],
        )
    curves = {k: v for k, v in curves.items() if isinstance(v[2], float)}
    a, b = st.columns(2)
    with a:
        st.plotly_chart(
            plots.score_histogram(
                soft.image_scores[kept], detection.labels[kept], threshold=threshold, title="SoftPatch scores"
            ),
            key="dt_hist_soft",
        )
    if base is not None:
        with b:
            st.plotly_chart(
                plots.score_histogram(
                    base.image_scores[kept], detection.labels[kept], threshold=base_threshold, title="PatchCore scores"
                ),
                key="dt_hist_base",
            )
    a, b = st.columns(2)
    with a:
        st.plotly_chart(plots.roc_figure(curves), key="dt_roc")
    with b:
        st.markdown(
            "**Reading these charts.** Each histogram shows the image scores of good (blue) and defective "
            "(orange) test images. The less they overlap, the easier one threshold separates them. The ROC curve "
            "shows every possible threshold at once: the closer it hugs the top-left corner, the better."
        )
elif detection.labels is None:
    st.info("These images have no labels, so no quality metrics. Load a labelled test folder on the Data page.")

# ----------------------------------------------------------------------------------------------- gallery
st.subheader("Most anomalous images")
top = [int(k) for k in order[:12]]
per_row = 6
for start in range(0, len(top), per_row):
    row = st.columns(per_row)
    for col, k in zip(row, top[start : start + per_row], strict=False):
        with col, user_errors("draw a heatmap"):
            img = detection_overlay(
                detection.paths[k],
                soft.anomaly_maps[k],
                transform,
                alpha=alpha,
                vrange=vrange,
                threshold=threshold,
                image_score=float(soft.image_scores[k]),
                px=220,
            )
            st.image(thumbnail(img, 220), caption=describe(k), width="stretch")
