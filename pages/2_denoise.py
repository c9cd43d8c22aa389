"""Denoise: fit SoftPatch, tune tau / LOF-k / coreset live, see the removed patches and the suspicion ranking."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from softpatch.config import DEVICES
from softpatch.errors import WeightsError
from softpatch.method.contamination import AUTO
from softpatch.method.discriminators import DISCRIMINATORS, NEIGHBOUR_CACHE_K
from softpatch_app import plots, services
from softpatch_app.guard import user_errors
from softpatch_app.progress import StageProgress
from softpatch_app.settings import (
    BACKBONE_CHOICES,
    SIZE_CHOICES,
    WEIGHT_MODE_LABELS,
    WEIGHT_MODES,
    settings_from_widgets,
)
from softpatch_app.state import SessionData, get_session, server_paths
from softpatch_app.ui import PAGES, need_data, show_notices
from softpatch_app.views import geometry, outlier_with_removed, removed_overlay, score_range

session: SessionData = get_session()

st.title("Denoise")
show_notices(session)
st.markdown(
    "SoftPatch cuts every training image into small **patches** and compares each patch with the patches at the "
    "same spot in all other images. Patches that look unlike the rest are probably **defects hiding in the "
    "'good' folder**: they are removed (or down-weighted) before the model learns what 'good' looks like."
)
if not need_data(session):
    st.stop()

s = session.settings


def seed(key: str, value) -> None:
    """Give a widget its remembered value (widget state is dropped when the user visits another page)."""
    if key not in st.session_state:
        st.session_state[key] = value


# ----------------------------------------------------------------------------------------------- controls
DISCRIMINATOR_NAMES = {
    "lof": "LOF (the paper's)",
    "nearest": "Nearest neighbour",
    "gaussian": "Gaussian",
    "fusion": "Fusion (SoftPatch+)",
    "none": "None: plain PatchCore",
    "auto": "Auto (default): LOF, k raised when many images look defective",
}
seed("dn_backbone", s.backbone)
seed("dn_weights_mode", s.weights_mode)
seed("dn_weights_path", s.weights_path)
seed("dn_kwargs", json.dumps(s.backbone_kwargs) if s.backbone_kwargs else "")
seed("dn_size", f"{s.resize}/{s.crop}")
seed("dn_device", s.device)
seed("dn_disc", s.discriminator)
seed("dn_tau", float(s.tau))
seed("dn_k", int(s.lof_k))
seed("dn_ratio", float(s.coreset_ratio))
seed("dn_soft", bool(s.soft_weight))


def use_random_weights() -> None:
    st.session_state["dn_weights_mode"] = "random"


ADVICE_WIDGETS = {"discriminator": "dn_disc", "tau": "dn_tau", "lof_k": "dn_k"}


def apply_advice(changes: dict) -> None:
    for name, value in changes.items():
        st.session_state[ADVICE_WIDGETS[name]] = value


weights_problem = session.weights_problem
with st.expander(
    "Backbone and weights — what turns images into features (a change here needs a new fit)",
    expanded=bool(weights_problem) or session.model is None,
):
    c1, c2 = st.columns(2)
    with c1:
        backbone_options = list(dict.fromkeys([st.session_state["dn_backbone"], *BACKBONE_CHOICES]))
        st.selectbox(
            "Backbone network",
            backbone_options,
            key="dn_backbone",
            accept_new_options=True,
            help="The ImageNet network that describes each patch. wide_resnet50_2 is the paper's choice; "
            "smaller ones (resnet18, mobilenetv1_100) are faster on a CPU. You can type any timm model name.",
        )
        st.radio(
            "Weights",
            WEIGHT_MODES,
            format_func=WEIGHT_MODE_LABELS.get,
            key="dn_weights_mode",
            help="Pretrained weights are downloaded once and cached. Without network, point to a local weights "
            "file (also settable with the SOFTPATCH_WEIGHTS environment variable). Random weights only let you "
            "try the workflow: they do not find real defects.",
        )
        if st.session_state["dn_weights_mode"] == "file":
            st.text_input(
                "Weights file on the server",
                key="dn_weights_path",
                placeholder="/models/wide_resnet50_2.safetensors",
                help="A .safetensors file or a plain PyTorch state dict for the chosen backbone.",
            )
        if st.session_state["dn_weights_mode"] == "random":
            st.warning("Random weights: results only demonstrate the workflow.", icon=":material/warning:")
    with c2:
        st.text_input(
            "Extra backbone settings (JSON, optional)",
            key="dn_kwargs",
            placeholder='{"bn_eps": 0.001, "pad_type": "same"}',
            help="Advanced: extra arguments for timm.create_model, e.g. for a converted weights file. "
            "Also settable with SOFTPATCH_BACKBONE_KWARGS.",
        )
        st.selectbox(
            "Image size (resize / centre crop, pixels)",
            SIZE_CHOICES,
            key="dn_size",
            accept_new_options=True,
            help="Images are squashed to the first size and the centre is cropped to the second. "
            "256/224 is the paper's setting; smaller is faster, larger sees smaller defects.",
        )
        st.selectbox(
            "Device",
            DEVICES,
            key="dn_device",
            help="auto uses the GPU when there is one, else the CPU.",
        )

st.markdown("##### Denoising")
c1, c2, c3, c4, c5 = st.columns([1.3, 1.2, 1, 1, 0.8])
with c1:
    st.selectbox(
        "Noise discriminator",
        [*DISCRIMINATORS, AUTO],
        key="dn_disc",
        format_func=lambda d: DISCRIMINATOR_NAMES.get(d, d),
        help="How a patch is judged against the same spot in the other images. "
        + " ".join(f"{DISCRIMINATOR_NAMES.get(k, k)}: {d.description}." for k, d in DISCRIMINATORS.items()),
    )
with c2:
    st.slider(
        "tau (share of patches removed)",
        0.0,
        0.5,
        key="dn_tau",
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
        key="dn_k",
        disabled=st.session_state["dn_disc"] not in ("lof", "fusion", AUTO),
        help="How many similar patches LOF compares each patch with. Changing it re-scores the patches "
        "(a second or two) without looking at the images again.",
    )
with c4:
    st.select_slider(
        "Coreset ratio",
        options=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        key="dn_ratio",
        help="Share of the kept patches stored in the memory bank used for detection. 0.1 is the paper's; "
        "1.0 keeps every patch (slower detection, slightly more accurate).",
    )
with c5:
    st.toggle(
        "Soft weights",
        key="dn_soft",
        help="Also down-weight kept patches that look a little unusual (the paper's soft re-weighting).",
    )

# Read the widgets into one settings object (a refused value becomes a clear warning, not a crash).
wanted, problems = settings_from_widgets(
    s,
    {
        "backbone": st.session_state["dn_backbone"] or s.backbone,
        "weights_mode": st.session_state["dn_weights_mode"],
        "weights_path": st.session_state.get("dn_weights_path", s.weights_path),
        "backbone_kwargs": st.session_state["dn_kwargs"],
        "size": st.session_state["dn_size"],
        "device": st.session_state["dn_device"],
        "discriminator": st.session_state["dn_disc"],
        "tau": float(st.session_state["dn_tau"]),
        "lof_k": int(st.session_state["dn_k"]),
        "coreset_ratio": float(st.session_state["dn_ratio"]),
        "soft_weight": bool(st.session_state["dn_soft"]),
    },
    server_file=server_paths().file,
)
for problem in problems:
    st.warning(problem, icon=":material/warning:")
session.settings = wanted

# ----------------------------------------------------------------------------------------------- fit
n_train = len(session.train)
refit_needed = services.needs_refit(session, wanted) or not session.model_is_current
label = f"Fit SoftPatch on {n_train} training images" if session.model is None else f"Fit again ({n_train} images)"
fit_clicked = st.button(
    label,
    type="primary" if refit_needed else "secondary",
    icon=":material/play_arrow:",
    help="Extracts patch features, scores every patch for noise and builds the memory bank. "
    "Each stage shows its own progress bar.",
)
if fit_clicked:
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
        "1. **Use a local weights file**: choose *Local weights file* under *Backbone and weights* above and give "
        "its path (or start the app with `SOFTPATCH_WEIGHTS=/path/to/file`, see the README).\n"
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
    st.stop()
if not session.model_is_current:
    st.warning("The training set changed since this fit: press **Fit again** to use the new images.")
    st.stop()
if services.needs_refit(session, wanted):
    st.warning(
        "Backbone, weights, image size or device changed: press **Fit again** to apply them. "
        "Below are the results of the last fit."
    )

# Apply denoising changes to the fitted model: tau is instant, k / discriminator re-score only.
with user_errors("apply the new settings"):
    changes = services.pending_changes(session.model, wanted)
    if changes:
        rescoring = any(k in services.RESCORING for k in changes)
        bars = StageProgress(st.container()) if rescoring else None
        services.retune(session, wanted, progress=bars)
        if bars is not None:
            bars.finish()

# ----------------------------------------------------------------------------------------------- results
model = session.model
vet = services.vetting(session)
removed = vet.removed_mask
n_images, total = removed.shape[0], removed.size
affected = int((removed.reshape(n_images, -1).any(axis=1)).sum())
st.divider()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Patches removed", f"{int(removed.sum()):,}", help=f"of {total:,} patches ({model.config.tau:.0%})")
m2.metric("Images affected", f"{affected} of {n_images}", help="Images that lost at least one patch.")
top = vet.ranking[0]
m3.metric("Most suspicious", vet.names[top], help="The training image most likely to be defective.")
m4.metric("Fit time", f"{session.fit_seconds:.1f} s", help=f"{model.config.backbone}, {model.grid_shape_} patch grid")
hint = services.noise_advice(session)
if hint.share is not None:
    st.caption(f"Estimated share of suspect images: **{hint.share:.0%}** ({hint.n_suspect} of {n_images}). {hint.note}")
if hint.warning:
    st.warning(hint.warning, icon=":material/warning:")
    st.button(hint.button, on_click=apply_advice, args=(hint.better,), icon=":material/auto_fix_high:")

if session.demo is not None:
    planted = session.demo.contaminant_names
    k = len(planted)
    top_names = {vet.names[i].rsplit("/", 1)[-1] for i in vet.ranking[:k]}
    found = len(planted & top_names)
    (st.success if found == k else st.info)(
        f"Demo check: SoftPatch put **{found} of the {k} planted defective images** in its top {k}.",
        icon=":material/verified:" if found == k else ":material/info:",
    )

st.markdown("##### Patch outlier scores")
st.plotly_chart(plots.outlier_histogram(vet.outlier_scores, removed, tau=model.config.tau), key="dn_hist")
st.caption("Grey: kept patches. Red: removed as noise (the top tau). The dashed line is where tau cuts.")

st.markdown("##### Training images ranked by suspicion")
st.caption(
    "Red squares are the patches removed as noise. Open an image to see the removed patches and the outlier "
    "scores side by side. Review them one by one on the **Review** page."
)
n_show = st.select_slider(
    "Images to show",
    options=[6, 12, 24, 48, n_images] if n_images > 48 else [6, 12, 24, 48],
    value=12,
    key="dn_n_show",
    help="The most suspicious images first.",
)
geom = geometry(model)
vrange = score_range(vet.outlier_scores)


@st.dialog("Training image", width="large")
def enlarge(i: int) -> None:
    st.markdown(
        f"**#{int(np.where(vet.ranking == i)[0][0]) + 1} · {vet.names[i]}** · suspicion {vet.suspicion[i]:.2f} · "
        f"{vet.removed_fraction[i]:.1%} of its patches removed"
    )
    a, b = st.columns(2)
    with a:
        st.image(
            outlier_with_removed(vet.paths[i], vet.outlier_scores[i], removed[i], geom, vrange),
            caption="Patch outlier score (blue low → red high); removed patches outlined",
            width="stretch",
        )
    with b:
        st.image(removed_overlay(vet.paths[i], removed[i], geom), caption="Removed patches (red)", width="stretch")
    st.caption(services.removed_explanation(vet, i, model.config.tau, model.config.tau_scope))


order = vet.ranking[: min(int(n_show), n_images)]
per_row = 6
for start in range(0, len(order), per_row):
    cols = st.columns(per_row)
    for col, i in zip(cols, order[start : start + per_row], strict=False):
        i = int(i)
        rank = start + list(order[start : start + per_row]).index(i) + 1
        with col, user_errors(f"show {vet.names[i]}"):
            st.image(removed_overlay(vet.paths[i], removed[i], geom, px=220), width="stretch")
            st.caption(
                f"#{rank} · {vet.names[i]}  \nsuspicion {vet.suspicion[i]:.2f} · {vet.removed_fraction[i]:.0%} removed"
            )
            if st.button("Open", key=f"dn_open_{i}", icon=":material/zoom_in:", help="Large view"):
                enlarge(i)

with st.expander("Full ranking as a table"):
    st.dataframe(
        pd.DataFrame(
            {
                "rank": np.arange(1, n_images + 1),
                "image": [vet.names[i] for i in vet.ranking],
                "suspicion": vet.suspicion[vet.ranking].round(3),
                "removed patches": [f"{vet.removed_fraction[i]:.1%}" for i in vet.ranking],
            }
        ),
        hide_index=True,
        width="stretch",
    )
st.page_link(PAGES["review"], label="Next: review the suspicious images", icon=":material/arrow_forward:")
