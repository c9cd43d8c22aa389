"""Denoise: fit SoftPatch, tune tau / LOF-k / coreset live, see the removed patches and the suspicion ranking."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from softpatch.config import DEVICES
from softpatch.errors import WeightsError
from softpatch.method.contamination import AUTO
from softpatch.method.discriminators import DISCRIMINATORS, NEIGHBOUR_CACHE_K
from softpatch_app import plots, services
from softpatch_app.denoise_form import (
    DISCRIMINATOR_NAMES,
    apply_advice,
    restore_denoise_widgets,
    use_random_weights,
    wanted_settings,
)
from softpatch_app.guard import user_errors
from softpatch_app.keys import DENOISE
from softpatch_app.progress import StageProgress
from softpatch_app.settings import BACKBONE_CHOICES, SIZE_CHOICES, WEIGHT_MODE_LABELS, WEIGHT_MODES, AppSettings
from softpatch_app.state import SessionData, get_session, server_paths, widget_value
from softpatch_app.ui import PAGES, need_data, page_controls, page_header, page_size_picker
from softpatch_app.views import geometry, outlier_with_removed, removed_overlay, score_range

IMAGES_PER_ROW = 6
TABLE_PAGE_SIZE = 50
INTRO = (
    "SoftPatch cuts every training image into small **patches** and compares each patch with the patches at "
    "the same spot in all other images. Patches that look unlike the rest are probably **defects hiding in the "
    "'good' folder**: they are removed (or down-weighted) before the model learns what 'good' looks like."
)


def _backbone_section(session: SessionData) -> None:
    with st.expander(
        "Backbone and weights — what turns images into features (a change here needs a new fit)",
        expanded=bool(session.weights_problem) or session.model is None,
    ):
        c1, c2 = st.columns(2)
        with c1:
            st.selectbox(
                "Backbone network",
                list(dict.fromkeys([widget_value(DENOISE.backbone), *BACKBONE_CHOICES])),
                key=DENOISE.backbone,
                accept_new_options=True,
                help="The ImageNet network that describes each patch. wide_resnet50_2 is the paper's choice; "
                "smaller ones (resnet18, mobilenetv1_100) are faster on a CPU. You can type any timm model name.",
            )
            mode = st.radio(
                "Weights",
                WEIGHT_MODES,
                format_func=WEIGHT_MODE_LABELS.get,
                key=DENOISE.weights_mode,
                help="Pretrained weights are downloaded once and cached. Without network, point to a local weights "
                "file (also settable with the SOFTPATCH_WEIGHTS environment variable). Random weights only let "
                "you try the workflow: they do not find real defects.",
            )
            if mode == "file":
                st.text_input(
                    "Weights file on the server",
                    key=DENOISE.weights_path,
                    placeholder="/models/wide_resnet50_2.safetensors",
                    help="A .safetensors file or a plain PyTorch state dict for the chosen backbone.",
                )
            if mode == "random":
                st.warning("Random weights: results only demonstrate the workflow.", icon=":material/warning:")
        with c2:
            st.text_input(
                "Extra backbone settings (JSON, optional)",
                key=DENOISE.backbone_kwargs,
                placeholder='{"bn_eps": 0.001, "pad_type": "same"}',
                help="Advanced: extra arguments for timm.create_model, e.g. for a converted weights file. "
                "Also settable with SOFTPATCH_BACKBONE_KWARGS.",
            )
            st.selectbox(
                "Image size (resize / centre crop, pixels)",
                SIZE_CHOICES,
                key=DENOISE.size,
                accept_new_options=True,
                help="Images are squashed to the first size and the centre is cropped to the second. "
                "256/224 is the paper's setting; smaller is faster, larger sees smaller defects.",
            )
            st.selectbox(
                "Device", DEVICES, key=DENOISE.device, help="auto uses the GPU when there is one, else the CPU."
            )


def _denoising_section() -> None:
    st.markdown("##### Denoising")
    c1, c2, c3, c4, c5 = st.columns([1.3, 1.2, 1, 1, 0.8])
    with c1:
        discriminator = st.selectbox(
            "Noise discriminator",
            [*DISCRIMINATORS, AUTO],
            key=DENOISE.discriminator,
            format_func=lambda d: DISCRIMINATOR_NAMES.get(d, d),
            help="How a patch is judged against the same spot in the other images. "
            + " ".join(f"{DISCRIMINATOR_NAMES.get(k, k)}: {d.description}." for k, d in DISCRIMINATORS.items()),
        )
    with c2:
        st.slider(
            "tau (share of patches removed)",
            0.0,
            0.5,
            key=DENOISE.tau,
            step=0.01,
            format="%.2f",
            help="The most outlying tau of all patches are removed from the memory bank. Start near your guess of "
            "the defective share. Moving it is instant: nothing is recomputed.",
        )
    with c3:
        st.slider(
            "LOF neighbours (k)",
            1,
            NEIGHBOUR_CACHE_K,
            key=DENOISE.lof_k,
            disabled=discriminator not in ("lof", "fusion", AUTO),
            help="How many similar patches LOF compares each patch with. Changing it re-scores the patches "
            "(a second or two) without looking at the images again.",
        )
    with c4:
        st.select_slider(
            "Coreset ratio",
            options=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
            key=DENOISE.coreset_ratio,
            help="Share of the kept patches stored in the memory bank used for detection. 0.1 is the paper's; "
            "1.0 keeps every patch (slower detection, slightly more accurate).",
        )
    with c5:
        st.toggle(
            "Soft weights",
            key=DENOISE.soft_weight,
            help="Also down-weight kept patches that look a little unusual (the paper's soft re-weighting).",
        )


def _fit_section(session: SessionData, wanted: AppSettings) -> bool:
    """The fit button and what stands in the way of results; True when the results can be shown."""
    n_train = len(session.train)
    refit_needed = services.needs_refit(session, wanted) or not session.model_is_current
    label = f"Fit SoftPatch on {n_train} training images" if session.model is None else f"Fit again ({n_train} images)"
    if st.button(
        label,
        type="primary" if refit_needed else "secondary",
        icon=":material/play_arrow:",
        help="Extracts patch features, scores every patch for noise and builds the memory bank. "
        "Each stage shows its own progress bar.",
    ):
        session.weights_problem = ""
        bars = StageProgress(st.container())
        with user_errors("fit the model"):
            try:
                services.fit(session, wanted, progress=bars)
                bars.finish()
                st.success(f"Fitted in {session.fit_seconds:.1f} s.")
            except WeightsError as exc:
                session.weights_problem = str(exc)
    if session.weights_problem:
        st.error(session.weights_problem, icon=":material/error:")
        st.markdown(
            "**Two ways out:**\n"
            "1. **Use a local weights file**: choose *Local weights file* under *Backbone and weights* above and "
            "give its path (or start the app with `SOFTPATCH_WEIGHTS=/path/to/file`, see the README).\n"
            "2. **Try the workflow with random weights**: everything runs, but the results do not find real defects."
        )
        st.button(
            "Use random weights (workflow only)",
            on_click=use_random_weights,
            icon=":material/casino:",
            help="Switches the weights to random so you can try every page; the results do not find real defects.",
        )
    if session.model is None:
        st.info("Press **Fit** to start. On a CPU this takes seconds for the demo, minutes for a few hundred images.")
        return False
    if not session.model_is_current:
        st.warning("The training set changed since this fit: press **Fit again** to use the new images.")
        return False
    if services.needs_refit(session, wanted):
        st.warning(
            "Backbone, weights, image size or device changed: press **Fit again** to apply them. "
            "Below are the results of the last fit."
        )
    return True


def _retune_section(session: SessionData, wanted: AppSettings) -> None:
    """Apply denoising changes to the fitted model: tau is instant, k / discriminator re-score only."""
    with user_errors("apply the new settings"):
        changes = services.pending_changes(session.model, wanted)
        if changes:
            bars = StageProgress(st.container()) if any(k in services.RESCORING for k in changes) else None
            services.retune(session, wanted, progress=bars)
            if bars is not None:
                bars.finish()


def _summary_section(session: SessionData, vet: services.Vetting) -> None:
    model = session.model
    n_images, total = len(vet.names), vet.removed_mask.size
    st.divider()
    m1, m2, m3, m4 = st.columns(4)
    m1.metric(
        "Patches removed", f"{int(vet.removed_mask.sum()):,}", help=f"of {total:,} patches ({model.config.tau:.0%})"
    )
    m2.metric("Images affected", f"{vet.n_affected} of {n_images}", help="Images that lost at least one patch.")
    m3.metric("Most suspicious", vet.names[vet.ranking[0]], help="The training image most likely to be defective.")
    m4.metric(
        "Fit time", f"{session.fit_seconds:.1f} s", help=f"{model.config.backbone}, {model.grid_shape_} patch grid"
    )
    hint = services.noise_advice(session)
    if hint.share is not None:
        st.caption(
            f"Estimated share of suspect images: **{hint.share:.0%}** ({hint.n_suspect} of {n_images}). {hint.note}"
        )
    if hint.warning:
        st.warning(hint.warning, icon=":material/warning:")
        st.button(hint.button, on_click=apply_advice, args=(hint.better,), icon=":material/auto_fix_high:")
    if session.demo is not None:
        found, k = services.demo_check(vet, session.demo)
        (st.success if found == k else st.info)(
            f"Demo check: SoftPatch put **{found} of the {k} planted defective images** in its top {k}.",
            icon=":material/verified:" if found == k else ":material/info:",
        )
    st.markdown("##### Patch outlier scores")
    st.plotly_chart(
        plots.outlier_histogram(vet.outlier_scores, vet.removed_mask, tau=model.config.tau), key=DENOISE.histogram
    )
    st.caption("Grey: kept patches. Red: removed as noise (the top tau). The dashed line is where tau cuts.")


@st.dialog("Training image", width="large")
def _enlarge(session: SessionData, vet: services.Vetting, i: int) -> None:
    config = session.model.config
    geom = geometry(session.model)
    st.markdown(
        f"**#{vet.rank_of(i)} · {vet.names[i]}** · suspicion {vet.suspicion[i]:.2f} · "
        f"{vet.removed_fraction[i]:.1%} of its patches removed"
    )
    a, b = st.columns(2)
    with a:
        st.image(
            outlier_with_removed(
                vet.paths[i], vet.outlier_scores[i], vet.removed_mask[i], geom, score_range(vet.outlier_scores)
            ),
            caption="Patch outlier score (blue low → red high); removed patches outlined",
            width="stretch",
        )
    with b:
        st.image(
            removed_overlay(vet.paths[i], vet.removed_mask[i], geom), caption="Removed patches (red)", width="stretch"
        )
    st.caption(services.removed_explanation(vet, i, config.tau, config.tau_scope))


def _ranking_section(session: SessionData, vet: services.Vetting) -> None:
    st.markdown("##### Training images ranked by suspicion")
    st.caption(
        "Red squares are the patches removed as noise. Open an image to see the removed patches and the outlier "
        "scores side by side. Review them one by one on the **Review** page."
    )
    per_page = page_size_picker(DENOISE.per_page, "Images per page", default=12, help="The most suspicious first.")
    span = page_controls(DENOISE.page, len(vet.names), per_page, noun="images")
    geom = geometry(session.model)
    order = [int(i) for i in span.take(vet.ranking)]
    for row_start in range(0, len(order), IMAGES_PER_ROW):
        cols = st.columns(IMAGES_PER_ROW)
        for offset, (col, i) in enumerate(zip(cols, order[row_start : row_start + IMAGES_PER_ROW], strict=False)):
            rank = span.start + row_start + offset + 1
            with col, user_errors(f"show {vet.names[i]}"):
                st.image(removed_overlay(vet.paths[i], vet.removed_mask[i], geom, px=220), width="stretch")
                st.caption(
                    f"#{rank} · {vet.names[i]}  \nsuspicion {vet.suspicion[i]:.2f} · "
                    f"{vet.removed_fraction[i]:.0%} removed"
                )
                if st.button("Open", key=DENOISE.open_button(i), icon=":material/zoom_in:", help="Large view"):
                    _enlarge(session, vet, i)
    with st.expander("Full ranking as a table"):
        table_span = page_controls(DENOISE.table_page, len(vet.names), TABLE_PAGE_SIZE, noun="images")
        rows = table_span.take(vet.rows())
        st.dataframe(
            pd.DataFrame(
                {
                    "rank": [r["rank"] for r in rows],
                    "image": [r["image"] for r in rows],
                    "suspicion": [round(r["suspicion"], 3) for r in rows],
                    "removed patches": [f"{r['removed_share']:.1%}" for r in rows],
                }
            ),
            hide_index=True,
            width="stretch",
        )
    st.page_link(PAGES["review"], label="Next: review the suspicious images", icon=":material/arrow_forward:")


def main() -> None:
    session = get_session()
    page_header(session, "Denoise", INTRO)
    if not need_data(session):
        return
    restore_denoise_widgets(session.settings)
    _backbone_section(session)
    _denoising_section()
    wanted, problems = wanted_settings(session.settings, server_file=server_paths().file)
    for problem in problems:
        st.warning(problem, icon=":material/warning:")
    session.settings = wanted
    if not _fit_section(session, wanted):
        return
    _retune_section(session, wanted)
    vet = services.vetting(session)
    _summary_section(session, vet)
    _ranking_section(session, vet)


main()
