"""Data: load a training folder (and optionally a test folder with masks) four ways; show what was loaded."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from softpatch_app import keys, services
from softpatch_app.cache import thumbnail_png
from softpatch_app.data_sources import (
    LOAD_WAYS,
    LoadRequest,
    add_to_training,
    apply_load,
    read_extra_images,
    read_request,
    size_counts,
)
from softpatch_app.guard import user_errors
from softpatch_app.loading import LoadedSplit
from softpatch_app.progress import StageProgress
from softpatch_app.state import SessionData, environment, get_session, server_paths, widget_value
from softpatch_app.ui import PAGES, page_controls, page_header, page_size_picker

METHOD_HELP = (
    "Demo: synthetic machined discs, 30 good + 4 defective hidden in the training folder. "
    "Folder: pick a whole folder in your browser (all subfolders are included). "
    ".zip: one archive of the folder. Server folder: type a path on the machine running this app "
    "(best for large sets: nothing is uploaded)."
)
THUMBNAILS_PER_ROW = 8
INTRO = (
    "Load the **training folder** you want to vet: the images that are supposed to be all good. "
    "SoftPatch will look for the ones that are not. A **test folder** with defect labels and masks is "
    "optional: with it, the Detect and Deploy pages can measure how well defects are found."
)


def _in_use_section(session: SessionData) -> None:
    with st.container(border=True):
        if session.train is None:
            st.markdown("**In use:** nothing loaded yet.")
            return
        st.markdown(
            f"**In use:** {session.dataset_name} · {len(session.train)} training images"
            + (f" · {len(session.test)} test images" if session.test is not None else " · no test set")
        )
        if session.demo is not None:
            st.info(
                f"This is the built-in demo: its training folder hides **{len(session.demo.contaminants)} "
                "defective parts** among the good ones. Fit on the **Denoise** page and see whether SoftPatch "
                "puts them at the top of its ranking.",
                icon=":material/lightbulb:",
            )
            st.page_link(PAGES["denoise"], label="Next: Denoise", icon=":material/arrow_forward:")


def _loader_section(session: SessionData, kind: str) -> None:
    """The four ways to load, for the training (kind="train") or the test set (kind="test")."""
    env, paths = environment(), server_paths()
    k = keys.LOADERS[kind]
    what = "training folder" if kind == "train" else "test folder"
    method = st.radio(
        f"How do you want to load the {what}?",
        list(LOAD_WAYS),
        format_func=LOAD_WAYS.get,
        horizontal=True,
        key=k.method,
        help=METHOD_HELP,
    )
    if method == "demo":
        st.caption("Synthetic parts generated on this machine (nothing is downloaded).")
    elif method == "browser folder":
        st.file_uploader(
            f"Choose the {what} on your computer",
            accept_multiple_files="directory",
            key=k.browser_files,
            help="Your browser asks for a folder and uploads every file in it, subfolders included. "
            "Files that are not images are listed below as skipped, with the reason.",
        )
    elif method == "zip":
        st.file_uploader(
            f"Choose a .zip of the {what}",
            type=["zip"],
            key=k.zip_file,
            help="The archive is unpacked safely on the server (unsafe or oversized entries are refused).",
        )
    elif not paths.enabled:
        st.info(paths.off_reason, icon=":material/lock:")
    else:
        st.text_input(
            "Folder path on the server",
            key=k.server_path,
            placeholder="/data/line3/train/good   or   ../shared/data/battery_weld",
            help="A folder on the machine running this app. An MVTec-style folder (with train/good, test/ and "
            "ground_truth/) loads its training and test images together.",
        )
        st.caption(f"Allowed folders: {paths.describe()}. The app's work folder and hidden folders are never read.")
    request = LoadRequest(
        kind=kind,
        method=method,
        server_path=str(widget_value(k.server_path, "") or "") if paths.enabled else "",
        browser_files=tuple(widget_value(k.browser_files) or ()),
        zip_file=widget_value(k.zip_file),
    )
    label = "Load the demo data" if method == "demo" else f"Load this {what}"
    if st.button(
        label,
        key=k.go,
        type="primary",
        disabled=not request.ready,
        icon=":material/download:",
        help="Reads every file once and lists the ones it cannot use. What is loaded now stays until this succeeds.",
    ):
        with user_errors(f"load the {what}"):
            bars = StageProgress(st.container())
            loaded, upload_dir = read_request(session, env, paths, request, progress=bars)
            bars.finish()
            session.notify("success", apply_load(session, kind, loaded, upload_dir))
            st.rerun()


def _add_images_section(session: SessionData) -> None:
    env, paths = environment(), server_paths()
    st.markdown(
        "Add a few more images to the training set, for example images you suspect are defective, "
        "to check that SoftPatch ranks them at the top. They are listed as `added/<name>`."
    )
    files = st.file_uploader(
        "Images to add",
        accept_multiple_files=True,
        key=keys.DATA.add_files,
        help="Any number of image files; they join the current training set (the model must be fitted again).",
    )
    st.text_area(
        "…or paths on the server (one image file or folder per line)",
        key=keys.DATA.add_paths,
        height=80,
        disabled=not paths.enabled,
        help="Files or folders on the machine running this app"
        + (f", inside {paths.describe()}." if paths.enabled else "."),
    )
    if not paths.enabled:
        st.caption(paths.off_reason)
    paths_text = str(widget_value(keys.DATA.add_paths, "") or "") if paths.enabled else ""
    if st.button(
        "Add to the training set",
        disabled=not (files or paths_text.strip()) or session.train is None,
        icon=":material/add:",
        help="Appends the images to the current training set; fit again on the Denoise page afterwards.",
    ):
        with user_errors("add the images"):
            bars = StageProgress(st.container())
            extra = read_extra_images(session, env, paths, files or (), paths_text, progress=bars)
            bars.finish()
            session.notify("success", add_to_training(session, extra))
            st.rerun()


def _tabs_section(session: SessionData) -> None:
    tab_train, tab_add, tab_test = st.tabs(
        ["Training folder", "Add training images", "Test folder (optional)"], key=keys.DATA.tabs
    )
    with tab_train:
        _loader_section(session, "train")
    with tab_add:
        _add_images_section(session)
    with tab_test:
        _loader_section(session, "test")
        if session.test is not None and st.button(
            "Remove the test set", icon=":material/delete:", help="Forget the test images (your files are not touched)."
        ):
            session.set_test(None)
            st.rerun()


def _duplicates_section(session: SessionData) -> None:
    st.subheader("Duplicates and leakage")
    found = None
    with user_errors("check for duplicates"):
        bars = StageProgress(st.container())
        found = services.duplicates(session, progress=bars)
        bars.finish()
    if found is None:
        return
    if found.leaking:
        st.warning(
            f"**Leakage: {len(found.leaked_test)} test images are also in the training folder.** Metrics on them "
            "are meaningless (their own patches are in the memory bank), so Detect leaves them out by default: "
            + ", ".join(name.rsplit("/", 1)[-1] for name in found.leaked_test[:12])
            + (" …" if len(found.leaked_test) > 12 else ""),
            icon=":material/warning:",
        )
    if found.within_train:
        st.warning(
            f"**{len(found.within_train)} groups of repeated training images.** A repeated defective image makes "
            "its own patches look dense and can escape the noise discriminator.",
            icon=":material/content_copy:",
        )
    if found.groups:
        st.dataframe(pd.DataFrame(found.rows()), hide_index=True, width="stretch", key=keys.DATA.duplicates_table)
    else:
        st.caption("No duplicate found.")
    st.caption(
        found.summary()
        + (
            "."
            if found.complete
            else ". Near copies are compared by features once a model is fitted (Denoise) and, for the test "
            "set, once it is scored (Detect)."
        )
    )


def _thumbnails(split: LoadedSplit, kind: str) -> None:
    """One page of the split's thumbnails (only the shown page's are made)."""
    k = keys.LOADERS[kind]
    per_page = page_size_picker(
        k.thumbnails_per_page,
        "Thumbnails per page",
        default=24 if kind == "train" else 12,
        help="How many images one page previews (in folder order).",
    )
    span = page_controls(k.thumbnails_page, len(split), per_page, noun="images")
    shown = span.take(split.records)
    limits = environment().limits
    for start in range(0, len(shown), THUMBNAILS_PER_ROW):
        row = st.columns(THUMBNAILS_PER_ROW)
        for col, rec in zip(row, shown[start : start + THUMBNAILS_PER_ROW], strict=False):
            with col:
                try:
                    st.image(thumbnail_png(rec.path, 160, limits), caption=rec.name, width="stretch")
                except Exception:  # noqa: BLE001 - e.g. a file removed after loading
                    st.caption(f"{rec.name}: cannot show")


def _split_section(split: LoadedSplit, kind: str) -> None:
    cols = st.columns(4)
    cols[0].metric(f"{kind.capitalize()} images", len(split))
    cols[1].metric("Skipped files", len(split.skipped), help="Files that were not used; the reasons are listed below.")
    counts = size_counts(split)
    cols[2].metric("Image sizes", len(counts), help="How many different width x height sizes the images have.")
    if kind == "test" and split.labelled:
        cols[3].metric("Defective / with mask", f"{split.n_defective} / {split.n_masks}")
    elif kind == "test":
        cols[3].metric("Labels", "none", help="Put good and defective images in subfolders to get labels.")
    else:
        cols[3].metric("Source", split.source)
    st.caption(f"From: {split.description}")
    _thumbnails(split, kind)
    with st.expander(f"Image sizes ({len(counts)} different)"):
        table = pd.DataFrame([{"width": w, "height": h, "images": n} for (w, h), n in counts.most_common()])
        st.dataframe(table, hide_index=True, width="content")
    with st.expander(f"Skipped files ({len(split.skipped)})", expanded=0 < len(split.skipped) <= 20):
        if split.skipped:
            st.dataframe(
                pd.DataFrame([{"file": s.path, "reason": s.reason} for s in split.skipped]),
                hide_index=True,
                width="stretch",
            )
        else:
            st.caption("Every file was used.")


def main() -> None:
    session = get_session()
    page_header(session, "Data", INTRO)
    _in_use_section(session)
    _tabs_section(session)
    if session.train is not None:
        _duplicates_section(session)
        st.subheader("Training set")
        with user_errors("show the training set"):
            _split_section(session.train, "train")
    if session.test is not None:
        st.subheader("Test set")
        with user_errors("show the test set"):
            _split_section(session.test, "test")


main()
