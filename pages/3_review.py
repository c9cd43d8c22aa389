"""Review: walk the suspicious training images one by one, label them, drop the defective ones and export."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from softpatch.errors import WeightsError
from softpatch_app import exports, loading, services
from softpatch_app.guard import user_errors
from softpatch_app.progress import StageProgress
from softpatch_app.state import LABELS, SessionData, get_session
from softpatch_app.ui import need_model, offer_file, show_notices
from softpatch_app.views import geometry, outlier_heatmap, removed_overlay, score_range

session: SessionData = get_session()

st.title("Review")
show_notices(session)
st.markdown(
    "Walk through the training images SoftPatch finds most suspicious and say what each one is: "
    "**defective**, **good** or **unsure**. Keys: **D** defective, **G** good, **U** unsure, **←/→** previous/next."
)
if not need_model(session):
    st.stop()

vet = services.vetting(session)
n = len(vet.names)
labels = session.labels

c1, c2 = st.columns([1, 1])
with c1:
    default_n = int(min(n, max(10, int((vet.removed_fraction > session.model.config.tau).sum()))))
    remembered = st.session_state.get("rv_n", session.review_count or default_n)
    st.session_state["rv_n"] = int(min(max(1, remembered), n))
    n_review = st.slider(
        "How many of the most suspicious images to walk through",
        1,
        max(n, 2),
        key="rv_n",
        help="Images are shown most suspicious first. The ones SoftPatch removed many patches from come first.",
    )
    session.review_count = n_review
with c2:
    only_open = st.toggle(
        "Skip images already labelled",
        key="rv_only_open",
        help="Show only the images you have not labelled yet.",
    )
queue = [int(i) for i in vet.ranking[:n_review]]
if only_open:
    queue = [i for i in queue if vet.names[i] not in labels] or queue
session.review_pos = min(max(0, session.review_pos), len(queue) - 1)


def go(step: int) -> None:
    session.review_pos = min(max(0, session.review_pos + step), len(queue) - 1)


def mark(label: str, index: int) -> None:
    labels[vet.names[index]] = label
    if session.review_pos < len(queue) - 1:
        session.review_pos += 1


pos = session.review_pos
i = queue[pos]
rank = int(np.where(vet.ranking == i)[0][0]) + 1
done = sum(vet.names[j] in labels for j in queue)
st.progress(done / len(queue), text=f"{done} of {len(queue)} reviewed")

with st.container(border=True):
    current = labels.get(vet.names[i], "not labelled")
    st.markdown(
        f"**Image {pos + 1} of {len(queue)}** · #{rank} most suspicious · `{vet.names[i]}` · "
        f"suspicion {vet.suspicion[i]:.2f} · {vet.removed_fraction[i]:.1%} of patches removed · "
        f"label: **{current}**"
    )
    b = st.columns([1, 1.2, 1, 1, 1])
    b[0].button(
        "Previous",
        on_click=go,
        args=(-1,),
        shortcut="Left",
        icon=":material/arrow_back:",
        disabled=pos == 0,
        help="Previous image (← key)",
    )
    # (label, key, icon, meaning): one button per label, each moving on to the next image.
    label_buttons = (
        ("defective", "D", ":material/report:", "This image shows a defect: it should not be in the training set"),
        ("good", "G", ":material/check_circle:", "This image is fine"),
        ("unsure", "U", ":material/help:", "Cannot tell; decide later"),
    )
    for column, (label, key, icon, meaning) in zip(b[1:4], label_buttons, strict=True):
        column.button(
            label.capitalize(),
            on_click=mark,
            args=(label, i),
            shortcut=key,
            type="primary" if label == "defective" else "secondary",
            icon=icon,
            help=f"{meaning} ({key} key). Moves to the next image.",
        )
    b[4].button(
        "Next",
        on_click=go,
        args=(1,),
        shortcut="Right",
        icon=":material/arrow_forward:",
        disabled=pos >= len(queue) - 1,
        help="Next image (→ key)",
    )
    geom = geometry(session.model)
    left, right = st.columns(2)
    with left, user_errors("show the image"):
        st.image(
            removed_overlay(vet.paths[i], vet.removed_mask[i], geom), caption="Removed patches (red)", width="stretch"
        )
    with right, user_errors("show the heatmap"):
        st.image(
            outlier_heatmap(vet.paths[i], vet.outlier_scores[i], geom, score_range(vet.outlier_scores)),
            caption="Patch outlier score (blue low → red high)",
            width="stretch",
        )

# ----------------------------------------------------------------------------------------------- labels
st.subheader("Labels")
counts = {lab: sum(v == lab for v in labels.values()) for lab in LABELS}
m = st.columns(4)
m[0].metric("Defective", counts["defective"])
m[1].metric("Good", counts["good"])
m[2].metric("Unsure", counts["unsure"])
m[3].metric("Not reviewed", n - len(labels))
rows = [
    {
        "rank": r + 1,
        "image": vet.names[j],
        "path": vet.paths[j],
        "suspicion": round(float(vet.suspicion[j]), 4),
        "removed_share": round(float(vet.removed_fraction[j]), 4),
        "label": labels.get(vet.names[j], ""),
    }
    for r, j in enumerate(int(x) for x in vet.ranking)
]
with st.expander("All labels", expanded=False):
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
d1, d2, d3 = st.columns(3)
d1.download_button(
    "Labels (CSV)",
    exports.labels_csv(rows),
    file_name=f"{session.dataset_name or 'softpatch'}-labels.csv".replace(" ", "_"),
    mime="text/csv",
    icon=":material/download:",
    help="Every training image with its rank, suspicion score and your label.",
)
if d2.button("Clear all labels", icon=":material/delete_sweep:", help="Forget every label of this session."):
    labels.clear()
    st.rerun()

# ----------------------------------------------------------------------------------------------- clean + refit
st.subheader("Clean the training set")
defective = {name for name, lab in labels.items() if lab == "defective"}
records = list(session.train.records)
kept = [r for r in records if r.name not in defective]
st.markdown(f"**{len(defective)}** images marked defective; the cleaned training set has **{len(kept)}** images.")
c1, c2, c3 = st.columns(3)
with c1:
    if st.button(
        f"Drop the {len(defective)} images marked defective and refit",
        disabled=not defective or len(kept) < 2,
        type="primary",
        icon=":material/cleaning_services:",
        help="Removes them from this session's training set (your files are not touched) and fits again.",
    ):
        bars = StageProgress(st.container())
        with user_errors("refit without the defective images"):
            try:
                services.fit(session, session.settings, progress=bars, split=loading.without(session.train, defective))
                bars.finish()
                session.review_pos = 0
                session.notify("success", f"Dropped {len(defective)} images and fitted again on {len(kept)}.")
                st.rerun()
            except WeightsError as exc:
                st.error(f"{exc} (change the weights on the Denoise page)")
with c2:
    st.download_button(
        "Cleaned file list (CSV)",
        exports.cleaned_list_csv(records, labels),
        file_name=f"{session.dataset_name or 'softpatch'}-cleaned.csv".replace(" ", "_"),
        mime="text/csv",
        icon=":material/list_alt:",
        help="The training images that are not marked defective, with their paths.",
    )
with c3:
    if st.button(
        "Prepare the cleaned folder (.zip)",
        icon=":material/folder_zip:",
        help="Packs every training image not marked defective into one .zip, keeping the folder names.",
    ):
        with user_errors("pack the cleaned folder"), st.spinner("Packing images…"):
            dest = session.workspace.subdir("exports") / f"cleaned-{int(time.time())}.zip"
            path, count = exports.cleaned_zip(records, labels, dest)
            session.cleaned_zip = (str(path), count)
    prepared = session.cleaned_zip
    if prepared:
        path, count = prepared
        offer_file(
            path,
            f"Download cleaned folder ({count} images, {{mb}} MB)",
            file_name=f"{session.dataset_name or 'softpatch'}-cleaned.zip".replace(" ", "_"),
            mime="application/zip",
            help="A .zip of every training image not marked defective, with its folder names.",
        )
