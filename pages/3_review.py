"""Review: walk the suspicious training images one by one, label them, drop the defective ones and export."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from softpatch.errors import WeightsError
from softpatch_app import exports, review, services
from softpatch_app.guard import user_errors
from softpatch_app.keys import REVIEW
from softpatch_app.progress import StageProgress
from softpatch_app.state import SessionData, get_session, set_widget_value, widget_value
from softpatch_app.ui import need_model, offer_file, page_controls, page_header
from softpatch_app.views import geometry, outlier_heatmap, removed_overlay, score_range

TABLE_PAGE_SIZE = 50
INTRO = (
    "Walk through the training images SoftPatch finds most suspicious and say what each one is: "
    "**defective**, **good** or **unsure**. Keys: **D** defective, **G** good, **U** unsure, **←/→** "
    "previous/next."
)


def _queue_section(session: SessionData, vet: services.Vetting) -> list[int]:
    """How many images to walk and whether to skip labelled ones; returns the queue (image indices)."""
    n = len(vet.names)
    c1, c2 = st.columns([1, 1])
    with c1:
        remembered = widget_value(REVIEW.count, session.review_count)
        set_widget_value(REVIEW.count, review.review_count(vet, session.model.config.tau, remembered))
        session.review_count = st.slider(
            "How many of the most suspicious images to walk through",
            1,
            max(n, 2),
            key=REVIEW.count,
            help="Images are shown most suspicious first. The ones SoftPatch removed many patches from come first.",
        )
    with c2:
        only_open = st.toggle(
            "Skip images already labelled", key=REVIEW.only_open, help="Show only the images you have not labelled yet."
        )
    return review.review_queue(vet, session.review_count, session.labels, only_open=only_open)


def _current_image_section(session: SessionData, vet: services.Vetting, queue: list[int]) -> None:
    pos = review.clamp_position(session, len(queue))
    i = queue[pos]
    labels = session.labels
    done = review.reviewed_count(vet, queue, labels)
    st.progress(done / len(queue), text=f"{done} of {len(queue)} reviewed")
    with st.container(border=True):
        st.markdown(
            f"**Image {pos + 1} of {len(queue)}** · #{vet.rank_of(i)} most suspicious · `{vet.names[i]}` · "
            f"suspicion {vet.suspicion[i]:.2f} · {vet.removed_fraction[i]:.1%} of patches removed · "
            f"label: **{labels.get(vet.names[i], 'not labelled')}**"
        )
        b = st.columns([1, 1.2, 1, 1, 1])
        b[0].button(
            "Previous",
            on_click=review.step,
            args=(session, len(queue), -1),
            shortcut="Left",
            icon=":material/arrow_back:",
            disabled=pos == 0,
            help="Previous image (← key)",
        )
        for column, (label, key, icon, meaning) in zip(b[1:4], review.LABEL_BUTTONS, strict=True):
            column.button(
                label.capitalize(),
                on_click=review.mark,
                args=(session, vet.names[i], label, len(queue)),
                shortcut=key,
                type="primary" if label == "defective" else "secondary",
                icon=icon,
                help=f"{meaning} ({key} key). Moves to the next image.",
            )
        b[4].button(
            "Next",
            on_click=review.step,
            args=(session, len(queue), 1),
            shortcut="Right",
            icon=":material/arrow_forward:",
            disabled=pos >= len(queue) - 1,
            help="Next image (→ key)",
        )
        geom = geometry(session.model)
        left, right = st.columns(2)
        with left, user_errors("show the image"):
            st.image(
                removed_overlay(vet.paths[i], vet.removed_mask[i], geom),
                caption="Removed patches (red)",
                width="stretch",
            )
        with right, user_errors("show the heatmap"):
            st.image(
                outlier_heatmap(vet.paths[i], vet.outlier_scores[i], geom, score_range(vet.outlier_scores)),
                caption="Patch outlier score (blue low → red high)",
                width="stretch",
            )


def _labels_section(session: SessionData, vet: services.Vetting) -> None:
    st.subheader("Labels")
    counts = review.label_counts(session.labels)
    m = st.columns(4)
    m[0].metric("Defective", counts["defective"])
    m[1].metric("Good", counts["good"])
    m[2].metric("Unsure", counts["unsure"])
    m[3].metric("Not reviewed", len(vet.names) - len(session.labels))
    rows = vet.rows(session.labels)
    with st.expander("All labels", expanded=False):
        span = page_controls(REVIEW.table_page, len(rows), TABLE_PAGE_SIZE, noun="images")
        st.dataframe(pd.DataFrame(span.take(rows)), hide_index=True, width="stretch")
    d1, d2, _ = st.columns(3)
    d1.download_button(
        "Labels (CSV)",
        exports.labels_csv(rows),
        file_name=exports.download_name(session.dataset_name, "labels.csv"),
        mime="text/csv",
        icon=":material/download:",
        help="Every training image with its rank, suspicion score and your label.",
    )
    if d2.button("Clear all labels", icon=":material/delete_sweep:", help="Forget every label of this session."):
        session.labels.clear()
        st.rerun()


def _clean_section(session: SessionData) -> None:
    st.subheader("Clean the training set")
    defective = review.defective_names(session.labels)
    records = list(session.train.records)
    n_kept = review.kept_count(session)
    st.markdown(f"**{len(defective)}** images marked defective; the cleaned training set has **{n_kept}** images.")
    c1, c2, c3 = st.columns(3)
    with c1:
        if st.button(
            f"Drop the {len(defective)} images marked defective and refit",
            disabled=not defective or n_kept < 2,
            type="primary",
            icon=":material/cleaning_services:",
            help="Removes them from this session's training set (your files are not touched) and fits again.",
        ):
            bars = StageProgress(st.container())
            with user_errors("refit without the defective images"):
                try:
                    message = review.drop_defective_and_refit(session, progress=bars)
                    bars.finish()
                    session.notify("success", message)
                    st.rerun()
                except WeightsError as exc:
                    st.error(f"{exc} (change the weights on the Denoise page)")
    with c2:
        st.download_button(
            "Cleaned file list (CSV)",
            exports.cleaned_list_csv(records, session.labels),
            file_name=exports.download_name(session.dataset_name, "cleaned.csv"),
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
            with user_errors("pack the cleaned folder"):
                bars = StageProgress(st.container())
                review.prepare_cleaned_zip(session, progress=bars)
                bars.finish()
        if session.cleaned_zip:
            path, count = session.cleaned_zip
            offer_file(
                path,
                f"Download cleaned folder ({count} images, {{mb}} MB)",
                file_name=exports.download_name(session.dataset_name, "cleaned.zip"),
                mime="application/zip",
                help="A .zip of every training image not marked defective, with its folder names.",
            )


def main() -> None:
    session = get_session()
    page_header(session, "Review", INTRO)
    if not need_model(session):
        return
    vet = services.vetting(session)
    queue = _queue_section(session, vet)
    _current_image_section(session, vet, queue)
    _labels_section(session, vet)
    _clean_section(session)


main()
