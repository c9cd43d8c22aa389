"""The Data page's work: read a training or test set one of four ways, add images, apply what was read.

Everything here runs without a Streamlit runtime (the page gathers the widget values into a ``LoadRequest``
and draws the outcome); a bad input raises a ``SoftPatchError`` with one clear sentence.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from softpatch.errors import DataError, SoftPatchError
from softpatch.io.datasets import ImageFolder, ImageRecord, SkippedFile, scan_images
from softpatch.io.images import load_image
from softpatch.io.paths import ReadScope, is_within
from softpatch.runtime.progress import ProgressCallback
from softpatch_app import loading
from softpatch_app.cache import image_sizes
from softpatch_app.server_paths import ServerPaths
from softpatch_app.settings import Environment
from softpatch_app.state import SessionData, load_shared_demo

# The four ways to load a set (the Data page's radio), in the order they are offered.
LOAD_WAYS = {
    "demo": "Built-in demo data",
    "browser folder": "A folder from this computer",
    "zip": "A .zip file",
    "server folder": "A folder on the server",
}
KINDS = ("train", "test")


@dataclass(frozen=True)
class LoadRequest:
    """What the user asked to load: the set (``kind``), the way (a key of ``LOAD_WAYS``) and that way's input."""

    kind: str
    method: str
    server_path: str = ""
    browser_files: Sequence = field(default_factory=tuple)  # Streamlit UploadedFile objects
    zip_file: object | None = None  # one Streamlit UploadedFile

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown set {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.method not in LOAD_WAYS:
            raise DataError(f"unknown way to load {self.method!r}: expected one of {', '.join(LOAD_WAYS)}")

    @property
    def ready(self) -> bool:
        """Whether the chosen way has its input (the load button is enabled only then)."""
        if self.method == "browser folder":
            return bool(self.browser_files)
        if self.method == "zip":
            return self.zip_file is not None
        if self.method == "server folder":
            return bool(self.server_path.strip())
        return True

    @property
    def what(self) -> str:
        return "training folder" if self.kind == "train" else "test folder"


def remove_upload(session: SessionData, path: Path | None) -> None:
    """Delete an earlier upload folder of this session (only inside its own workspace)."""
    if path is None:
        return
    ws = session.workspace.path
    if is_within(path, ws) and not is_within(ws, path) and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def read_request(
    session: SessionData,
    env: Environment,
    paths: ServerPaths,
    request: LoadRequest,
    progress: ProgressCallback | None = None,
) -> tuple[loading.LoadResult | loading.LoadedSplit, Path | None]:
    """Run one load: (a LoadResult for a training folder or a LoadedSplit for a test folder, the upload folder
    or None). Raises ``SoftPatchError`` with a clear message; a failed upload leaves nothing behind.
    ``progress`` hears every file checked (the ``loading`` stage)."""
    limits, kind, method = env.limits, request.kind, request.method
    if method == "demo":
        result = load_shared_demo(env)
        if kind == "test":
            if result.test is None:
                raise DataError("the demo test set is missing")
            return result.test, None
        return result, None
    if method == "server folder":
        root = paths.folder(request.server_path)
        label = f"{root} (server folder)"
        read = loading.read_test_folder if kind == "test" else loading.read_training_folder
        return read(root, limits=limits, source=method, label=label, scope=paths.scope, progress=progress), None
    slot = session.slot(kind)
    if method == "browser folder":
        files = list(request.browser_files)
        root, upload_skipped = loading.save_browser_files(files, session.workspace, slot, limits)
        label = f"{root.name} (uploaded folder, {len(files)} files)"
    else:
        root, upload_skipped = loading.save_zip(request.zip_file, session.workspace, slot, limits)
        label = f"{request.zip_file.name} (uploaded zip)"
    upload_dir = session.workspace.path / slot
    own = ReadScope.of([session.workspace.path])  # an upload is read from this session's folder only
    try:
        if kind == "test":
            split = loading.read_test_folder(
                root, limits=limits, source=method, label=label, scope=own, progress=progress
            )
            return loading.with_upload_skips(split, upload_skipped), upload_dir
        result = loading.read_training_folder(
            root, limits=limits, source=method, label=label, scope=own, progress=progress
        )
        loading.with_upload_skips(result.train, upload_skipped)
        return result, upload_dir
    except Exception:
        remove_upload(session, upload_dir)
        raise


def apply_load(
    session: SessionData, kind: str, loaded: loading.LoadResult | loading.LoadedSplit, upload_dir: Path | None
) -> str:
    """Make what ``read_request`` read the session's set (the previous upload folder is deleted); returns the
    sentence saying what was loaded."""
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
    remove_upload(session, Path(previous) if previous else None)
    if upload_dir:
        session.upload_dirs[kind] = str(upload_dir)
    else:
        session.upload_dirs.pop(kind, None)
    return msg + "."


def read_extra_images(
    session: SessionData,
    env: Environment,
    paths: ServerPaths,
    files: Sequence,
    paths_text: str,
    progress: ProgressCallback | None = None,
) -> ImageFolder:
    """Images to add to the training set: uploaded ``files`` and the server files or folders typed one per line
    in ``paths_text``. Each bad file or line is listed as skipped; the others still load. ``progress`` hears
    every file of a folder checked."""
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    if files:
        root, up_skipped = loading.save_browser_files(list(files), session.workspace, session.slot("added"), env.limits)
        skipped.extend(up_skipped)
        try:
            folder = scan_images(
                root, limits=env.limits, scope=ReadScope.of([session.workspace.path]), progress=progress
            )
            records.extend(folder.records)
            skipped.extend(folder.skipped)
        except DataError as exc:
            skipped.append(SkippedFile("uploaded files", str(exc)))
    for line in (paths_text if paths.enabled else "").splitlines():
        typed = line.strip()
        if not typed:
            continue
        try:
            # Checked (resolved, inside the allowed folders) before anything about the path is looked at.
            path = paths.check(typed)
            if os.path.isdir(path):  # never raises (a name too long for the system is simply no folder)
                root = paths.folder(typed)
                folder = scan_images(root, limits=env.limits, scope=paths.scope, progress=progress)
                records.extend(ImageRecord(r.path, relpath=f"{root.name}/{r.relpath}") for r in folder.records)
                skipped.extend(SkippedFile(f"{root.name}/{s.path}", s.reason) for s in folder.skipped)
            else:
                path = paths.file(typed)
                load_image(path, env.limits)
                records.append(ImageRecord(path, relpath=path.name))
        except SoftPatchError as exc:  # each bad line is listed, the other lines still load
            skipped.append(SkippedFile(typed, str(exc)))
    return ImageFolder(Path("."), records, skipped)


def add_to_training(session: SessionData, extra: ImageFolder) -> str:
    """Append ``extra`` to the training set (the test set stays as it was); returns what was done.

    Raises ``DataError`` when none of the given files is a readable image.
    """
    if session.train is None:
        raise DataError("load a training folder first")
    if not len(extra):
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in extra.skipped[:3])
        raise DataError("none of the given files is a readable image" + (f" ({reasons})" if reasons else ""))
    new_train = loading.add_training_images(session.train, extra)
    result = loading.LoadResult(name=session.dataset_name, train=new_train, demo=session.demo)
    test, with_train = session.test, session.test_with_train
    session.set_training(result)
    session.test, session.test_with_train = test, with_train
    return f"Added {len(extra)} images to the training set ({len(new_train)} in all)."


def size_counts(split: loading.LoadedSplit) -> Counter:
    """(width, height) -> number of images of the split of that size, from the file headers."""
    return Counter(image_sizes([r.path for r in split.records]))
