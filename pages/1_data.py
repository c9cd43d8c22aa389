"""Data: load a training folder (and optionally a test folder with masks) four ways; show what was loaded."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import streamlit as st

from softpatch.errors import DataError, SoftPatchError
from softpatch.io.datasets import ImageFolder, ImageRecord, SkippedFile, scan_images
from softpatch.io.images import load_image
from softpatch.io.paths import ReadScope, is_within
from softpatch_app import loading, services
from softpatch_app.cache import image_sizes, thumbnail_png
from softpatch_app.guard import user_errors
from softpatch_app.state import SessionData, environment, get_session, load_shared_demo, server_paths
from softpatch_app.ui import PAGES, show_notices

METHODS = {
    "demo": "Built-in demo data",
    "browser folder": "A folder from this computer",
    "zip": "A .zip file",
    "server folder": "A folder on the server",
}
METHOD_HELP = (
    "Demo: synthetic machined discs, 30 good + 4 defective hidden in the training folder. "
    "Folder: pick a whole folder in your browser (all subfolders are included). "
    ".zip: one archive of the folder. Server folder: type a path on the machine running this app "
    "(best for large sets: nothing is uploaded)."
)

session: SessionData = get_session()
env = environment()
paths = server_paths(env)

st.title("Data")
show_notices(session)
st.markdown(
    "Load the **training folder** you want to vet: the images that are supposed to be all good. "
    "SoftPatch will look for the ones that are not. A **test folder** with defect labels and masks is optional: "
    "with it, the Detect and Deploy pages can measure how well defects are found."
)


def _upload_slot(kind: str) -> str:
    return session.slot(kind)


def _remove_old(path: Path | None) -> None:
    """Delete an earlier upload folder of this session (only inside its own workspace)."""
    if path is None:
        return
    ws = session.workspace.path
    if is_within(path, ws) and not is_within(ws, path) and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _read(kind: str, method: str, slot_key: str):
    """Run one load; returns (LoadResult or LoadedSplit, upload folder or None). Raises with a clear message."""
    limits = env.limits
    if method == "demo":
        result = load_shared_demo(env)
        if kind == "test":
            if result.test is None:
                raise DataError("the demo test set is missing")
            return result.test, None
        return result, None
    if method == "server folder":
        root = paths.folder(st.session_state.get(f"{slot_key}_path", ""))
        label = f"{root} (server folder)"
        if kind == "test":
            return loading.read_test_folder(root, limits=limits, source=method, label=label, scope=paths.scope), None
        return loading.read_training_folder(root, limits=limits, source=method, label=label, scope=paths.scope), None
    slot = _upload_slot(kind)
    if method == "browser folder":
        files = st.session_state.get(f"{slot_key}_dir") or []
        root, upload_skipped = loading.save_browser_files(files, session.workspace, slot, limits)
        label = f"{root.name} (uploaded folder, {len(files)} files)"
    else:
        uploaded = st.session_state.get(f"{slot_key}_zip")
        root, upload_skipped = loading.save_zip(uploaded, session.workspace, slot, limits)
        label = f"{uploaded.name} (uploaded zip)"
    upload_dir = session.workspace.path / slot
    own = ReadScope.of([session.workspace.path])  # an upload is read from this session's folder only
    try:
        if kind == "test":
            split = loading.read_test_folder(root, limits=limits, source=method, label=label, scope=own)
            return loading.with_upload_skips(split, upload_skipped), upload_dir
        result = loading.read_training_folder(root, limits=limits, source=method, label=label, scope=own)
        loading.with_upload_skips(result.train, upload_skipped)
        return result, upload_dir
    except Exception:
        _remove_old(upload_dir)  # a failed load leaves nothing behind
        raise


def loader(kind: str) -> None:
    """The four ways to load, for the training (kind="train") or the test set (kind="test")."""
    slot_key = f"load_{kind}"
    what = "training folder" if kind == "train" else "test folder"
    method = st.radio(
        f"How do you want to load the {what}?",
        list(METHODS),
        format_func=METHODS.get,
        horizontal=True,
        key=f"{slot_key}_method",
        help=METHOD_HELP,
    )
    ready = True
    if method == "demo":
        st.caption("Synthetic parts generated on this machine (nothing is downloaded).")
    elif method == "browser folder":
        files = st.file_uploader(
            f"Choose the {what} on your computer",
            accept_multiple_files="directory",
            key=f"{slot_key}_dir",
            help="Your browser asks for a folder and uploads every file in it, subfolders included. "
            "Files that are not images are listed below as skipped, with the reason.",
        )
        ready = bool(files)
    elif method == "zip":
        up = st.file_uploader(
            f"Choose a .zip of the {what}",
            type=["zip"],
            key=f"{slot_key}_zip",
            help="The archive is unpacked safely on the server (unsafe or oversized entries are refused).",
        )
        ready = up is not None
    elif not paths.enabled:
        st.info(paths.off_reason, icon=":material/lock:")
        ready = False
    else:
        st.text_input(
            "Folder path on the server",
            key=f"{slot_key}_path",
            placeholder="/data/line3/train/good   or   ../shared/data/battery_weld",
            help="A folder on the machine running this app. An MVTec-style folder (with train/good, test/ and "
            "ground_truth/) loads its training and test images together.",
        )
        st.caption(f"Allowed folders: {paths.describe()}. The app's work folder and hidden folders are never read.")
        ready = bool(st.session_state.get(f"{slot_key}_path", "").strip())
    label = "Load the demo data" if method == "demo" else f"Load this {what}"
    if st.button(
        label,
        key=f"{slot_key}_go",
        type="primary",
        disabled=not ready,
        icon=":material/download:",
        help="Reads every file once and lists the ones it cannot use. What is loaded now stays until this succeeds.",
    ):
        with user_errors(f"load the {what}"):
            with st.spinner(f"Reading and checking every image of the {what}…"):
                loaded, upload_dir = _read(kind, method, slot_key)
            previous = session.upload_dirs.get(kind)
            if kind == "train":
                session.set_training(loaded)
                n, skipped = len(loaded.train), len(loaded.train.skipped)
                msg = f"Loaded {n} training images" + (f" ({skipped} files skipped, see below)" if skipped else "")
                if loaded.test is not None:
                    msg += f" and {len(loaded.test)} test images"
            else:
                session.set_test(loaded)
                msg = f"Loaded {len(loaded)} test images" + (
                    f" ({loaded.n_defective} defective, {loaded.n_masks} with masks)" if loaded.labelled else ""
                )
            _remove_old(Path(previous) if previous else None)
            if upload_dir:
                session.upload_dirs[kind] = str(upload_dir)
            else:
                session.upload_dirs.pop(kind, None)
            session.notify("success", msg + ".")
            st.rerun()


def add_images() -> None:
    st.markdown(
        "Add a few more images to the training set, for example images you suspect are defective, "
        "to check that SoftPatch ranks them at the top. They are listed as `added/<name>`."
    )
    files = st.file_uploader(
        "Images to add",
        accept_multiple_files=True,
        key="add_files",
        help="Any number of image files; they join the current training set (the model must be fitted again).",
    )
    st.text_area(
        "…or paths on the server (one image file or folder per line)",
        key="add_paths",
        height=80,
        disabled=not paths.enabled,
        help="Files or folders on the machine running this app"
        + (f", inside {paths.describe()}." if paths.enabled else "."),
    )
    if not paths.enabled:
        st.caption(paths.off_reason)
    paths_text = st.session_state.get("add_paths", "") if paths.enabled else ""
    ready = bool(files) or bool(paths_text.strip())
    if st.button(
        "Add to the training set",
        disabled=not ready or session.train is None,
        icon=":material/add:",
        help="Appends the images to the current training set; fit again on the Denoise page afterwards.",
    ):
        with user_errors("add the images"):
            extra = _read_extra(files, paths_text)
            if not len(extra):
                reasons = "; ".join(f"{s.path}: {s.reason}" for s in extra.skipped[:3])
                raise DataError("none of the given files is a readable image" + (f" ({reasons})" if reasons else ""))
            new_train = loading.add_training_images(session.train, extra)
            result = loading.LoadResult(name=session.dataset_name, train=new_train, demo=session.demo)
            test, with_train = session.test, session.test_with_train
            session.set_training(result)
            session.test, session.test_with_train = test, with_train  # the test set stays as it was
            session.notify("success", f"Added {len(extra)} images to the training set ({len(new_train)} in all).")
            st.rerun()


def _read_extra(files, paths_text: str) -> ImageFolder:
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    if files:
        root, up_skipped = loading.save_browser_files(files, session.workspace, _upload_slot("added"), env.limits)
        skipped.extend(up_skipped)
        try:
            folder = scan_images(root, limits=env.limits, scope=ReadScope.of([session.workspace.path]))
            records.extend(folder.records)
            skipped.extend(folder.skipped)
        except DataError as exc:
            skipped.append(SkippedFile("uploaded files", str(exc)))
    for line in paths_text.splitlines():
        typed = line.strip()
        if not typed:
            continue
        try:
            # Checked (resolved, inside the allowed folders) before anything about the path is looked at.
            path = paths.check(typed)
            if os.path.isdir(path):  # never raises (a name too long for the system is simply no folder)
                root = paths.folder(typed)
                folder = scan_images(root, limits=env.limits, scope=paths.scope)
                records.extend(ImageRecord(r.path, relpath=f"{root.name}/{r.relpath}") for r in folder.records)
                skipped.extend(SkippedFile(f"{root.name}/{s.path}", s.reason) for s in folder.skipped)
            else:
                path = paths.file(typed)
                load_image(path, env.limits)
                records.append(ImageRecord(path, relpath=path.name))
        except SoftPatchError as exc:  # each bad line is listed, the other lines still load
            skipped.append(SkippedFile(typed, str(exc)))
    return ImageFolder(Path("."), records, skipped)


def show_split(split: loading.LoadedSplit, kind: str) -> None:
    records = split.records
    cols = st.columns(4)
    cols[0].metric(f"{kind.capitalize()} images", len(records))
    cols[1].metric("Skipped files", len(split.skipped), help="Files that were not used; the reasons are listed below.")
    sizes = image_sizes([r.path for r in records])
    counts = Counter(sizes)
    cols[2].metric("Image sizes", len(counts), help="How many different width x height sizes the images have.")
    if kind == "test":
        if split.labelled:
            cols[3].metric("Defective / with mask", f"{split.n_defective} / {split.n_masks}")
        else:
            cols[3].metric("Labels", "none", help="Put good and defective images in subfolders to get labels.")
    else:
        cols[3].metric("Source", split.source)
    st.caption(f"From: {split.description}")

    n_show = st.select_slider(
        "Thumbnails to show",
        options=[0, 12, 24, 48, 96, len(records)] if len(records) > 96 else [0, 12, 24, 48, 96],
        value=min(24 if kind == "train" else 12, 96),
        key=f"{kind}_thumbs",
        help="How many images to preview (the first ones, in folder order).",
    )
    shown = records[: int(n_show)]
    if shown:
        per_row = 8
        for start in range(0, len(shown), per_row):
            row = st.columns(per_row)
            for col, rec in zip(row, shown[start : start + per_row], strict=False):
                with col:
                    try:
                        st.image(thumbnail_png(rec.path, 160, env.limits), caption=rec.name, width="stretch")
                    except Exception:  # noqa: BLE001 - e.g. a file removed after loading
                        st.caption(f"{rec.name}: cannot show")
    with st.expander(f"Image sizes ({len(counts)} different)"):
        table = pd.DataFrame(
            [{"width": w, "height": h, "images": n} for (w, h), n in counts.most_common()],
        )
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


with st.container(border=True):
    if session.train is not None:
        st.markdown(
            f"**In use:** {session.dataset_name} · {len(session.train)} training images"
            + (f" · {len(session.test)} test images" if session.test is not None else " · no test set")
        )
        if session.demo is not None:
            st.info(
                f"This is the built-in demo: its training folder hides **{len(session.demo.contaminants)} defective "
                "parts** among the good ones. Fit on the **Denoise** page and see whether SoftPatch puts them at "
                "the top of its ranking.",
                icon=":material/lightbulb:",
            )
            st.page_link(PAGES["denoise"], label="Next: Denoise", icon=":material/arrow_forward:")
    else:
        st.markdown("**In use:** nothing loaded yet.")

tab_train, tab_add, tab_test = st.tabs(
    ["Training folder", "Add training images", "Test folder (optional)"], key="data_tabs"
)
with tab_train:
    loader("train")
with tab_add:
    add_images()
with tab_test:
    loader("test")
    if session.test is not None and st.button(
        "Remove the test set", icon=":material/delete:", help="Forget the test images (your files are not touched)."
    ):
        session.set_test(None)
        st.rerun()

if session.train is not None:
    st.subheader("Duplicates and leakage")
    with user_errors("check for duplicates"), st.spinner("Comparing images…"):
        found = services.duplicates(session)
    if found is not None:
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
            st.dataframe(pd.DataFrame(found.rows()), hide_index=True, width="stretch", key="data_duplicates")
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
    st.subheader("Training set")
    with user_errors("show the training set"):
        show_split(session.train, "train")
if session.test is not None:
    st.subheader("Test set")
    with user_errors("show the test set"):
        show_split(session.test, "test")
