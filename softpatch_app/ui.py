"""Small shared widgets: the sidebar, notices, 'what to do next' hints, page controls and downloads."""

from __future__ import annotations

import streamlit as st

from softpatch.runtime.device import describe_device, resolve_device
from softpatch_app.guard import message_for, user_errors
from softpatch_app.paging import PAGE_SIZES, PageSpan, page_size_of, page_span
from softpatch_app.state import SessionData, set_widget_value, widget_value

PAGES = {
    "data": "pages/1_data.py",
    "denoise": "pages/2_denoise.py",
    "review": "pages/3_review.py",
    "coreset": "pages/4_coreset.py",
    "detect": "pages/5_detect.py",
    "deploy": "pages/6_deploy.py",
}


def device_label(device: str) -> str:
    try:
        return describe_device(resolve_device(device))
    except Exception as exc:  # noqa: BLE001 - e.g. "cuda" asked for on a machine without a GPU
        return f"unavailable ({message_for(exc)})"


def sidebar(session: SessionData) -> None:
    """Always visible: device, backbone + where its weights come from, and the dataset in use."""
    s = session.settings
    model = session.model
    with st.container():
        st.markdown("### SoftPatch")
        st.caption("Find defective images hiding in a 'good' training folder, then detect defects.")
        st.markdown(f"**Device:** {device_label(s.device)}")
        backbone = model.config.backbone if model is not None else s.backbone
        st.markdown(f"**Backbone:** `{backbone}`")
        kind, text = weights_status(session)
        if kind == "markdown":
            st.markdown(text)
        else:
            getattr(st, kind)(text, icon=":material/warning:" if kind == "warning" else ":material/error:")
        if session.train is not None:
            n_test = len(session.test) if session.test is not None else 0
            st.markdown(
                f"**Dataset:** {session.dataset_name}  \n{len(session.train)} training images"
                + (f", {n_test} test images" if n_test else "")
            )
        else:
            st.markdown("**Dataset:** none loaded")
        if model is not None:
            status = "fitted" if session.model_is_current else "fitted on earlier data: fit again"
            st.markdown(f"**Model:** {status} · tau {model.config.tau:.2f}")
            if session.threshold is not None:  # the one threshold Detect, Deploy, the bundle and the report use
                st.markdown(f"**Threshold:** {session.threshold:.4f}  \n{session.threshold_method}")
        else:
            st.markdown("**Model:** not fitted yet")
        st.caption(
            f"Project `{session.project_id[:6]}…` is saved on the server: this page's address brings it back "
            "(bookmark it). Anyone with the address can open it; share it only with people who may."
        )


def weights_status(session: SessionData) -> tuple[str, str]:
    """What the sidebar says about the backbone's weights, as (how to show it, text): the true state, never a
    hope. Pretrained weights count as loaded only once a fit has loaded them."""
    s, model = session.settings, session.model
    mode = model.config.weights_source if model is not None else s.weights_mode
    if mode == "pretrained" and model is None and session.weights_problem:
        return "error", "**Weights:** pretrained ImageNet weights could not be had at the last fit (see Denoise)."
    if mode == "pretrained":
        loaded = "loaded" if model is not None else "not loaded yet: downloaded or read from the cache at the first fit"
        return "markdown", f"**Weights:** pretrained (ImageNet), {loaded}"
    if mode == "file":
        path = model.config.weights if model is not None else s.weights_path
        return "markdown", f"**Weights:** local file `{_short(path)}`"
    return "warning", (
        "**Weights: random.** Results only show how the workflow runs; they do not find real defects. "
        "Set a weights file on the Denoise page."
    )


def _short(path: str | None, keep: int = 38) -> str:
    text = str(path or "")
    return text if len(text) <= keep else "…" + text[-keep:]


def show_notices(session: SessionData) -> None:
    """Messages queued by an action on the previous run (shown once)."""
    while session.notices:
        kind, text = session.notices.pop(0)
        getattr(st, kind if kind in ("error", "warning", "info", "success") else "info")(text)


def need_data(session: SessionData) -> bool:
    if session.train is None:
        st.info("No training images yet: load a folder on the **Data** page.", icon=":material/folder_open:")
        st.page_link(PAGES["data"], label="Go to Data", icon=":material/arrow_forward:")
        return False
    return True


def need_model(session: SessionData) -> bool:
    """True when a model fitted on the current data exists; otherwise say what to do."""
    if not need_data(session):
        return False
    if session.model is None:
        st.info("Fit SoftPatch first: it takes a few seconds on the **Denoise** page.", icon=":material/tune:")
        st.page_link(PAGES["denoise"], label="Go to Denoise", icon=":material/arrow_forward:")
        return False
    if not session.model_is_current:
        st.warning("The training data changed since the last fit: fit again on the **Denoise** page.")
        st.page_link(PAGES["denoise"], label="Go to Denoise", icon=":material/arrow_forward:")
        return False
    return True


def offer_file(path: str, label: str, *, file_name: str, mime: str, key: str | None = None, help: str) -> int:
    """A primary download button for a file this session prepared, its size in the label; returns the size.

    ``label`` may hold ``{mb}``, replaced by the size in MB. A file that vanished becomes a clear error.
    """
    with user_errors("offer the download"):
        with open(path, "rb") as fh:
            data = fh.read()
        st.download_button(
            label.format(mb=f"{len(data) / 2**20:.1f}"),
            data,
            file_name=file_name,
            mime=mime,
            icon=":material/download:",
            type="primary",
            key=key,
            help=help,
        )
        return len(data)
    return 0


def page_size_picker(key: str, label: str, *, default: int, help: str) -> int:
    """How many items one page of a list shows (one of ``PAGE_SIZES``)."""
    options = list(PAGE_SIZES)
    current = page_size_of(widget_value(key, default), default=default)
    if current not in options:  # a value from the browser that is not offered: the nearest offered one below
        current = max([o for o in options if o <= current] or [options[0]])
    set_widget_value(key, current)
    return int(st.select_slider(label, options=options, key=key, help=help))


def page_controls(key: str, n_items: int, page_size: int, *, noun: str) -> PageSpan:
    """The page of a long list to show: a page number (only when there is more than one page) and a caption.

    The remembered page is clamped first (the list may have shrunk, the value may come from anywhere), so the
    number input never holds a page that does not exist.
    """
    span = page_span(n_items, page_size, widget_value(key, 1))
    if widget_value(key) != span.page:
        set_widget_value(key, span.page)
    if span.pages > 1:
        st.number_input(
            f"Page (of {span.pages:,})",
            min_value=1,
            max_value=span.pages,
            step=1,
            key=key,
            help=f"{span.page_size} {noun} per page.",
        )
    st.caption(f"Showing {span.describe(noun)}.")
    return span


def page_header(session: SessionData, title: str, intro: str) -> None:
    """A page's title, the notices queued for it and its introduction (markdown)."""
    st.title(title)
    show_notices(session)
    st.markdown(intro)


def score_button(session: SessionData, records: list, *, labelled: bool, compare: bool, label: str, help: str):
    """A button that scores ``records`` (progress bars while it runs); the ``services.Detection`` when it was
    pressed and scoring worked, else None."""
    from softpatch_app import services
    from softpatch_app.progress import StageProgress

    if not st.button(label, type="primary", icon=":material/play_arrow:", help=help):
        return None
    bars = StageProgress(st.container())
    with user_errors("score the images"):
        detection = services.score_test(session, records, labelled=labelled, progress=bars, compare=compare)
        bars.finish()
        return detection
    return None
