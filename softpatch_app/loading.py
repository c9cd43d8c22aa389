"""Loading a training or test set four ways (browser folder, zip, server folder, demo) into a session.

IO glue only: uploads go through ``softpatch_app.uploads.save_uploads`` (zips through
``softpatch.io.safezip.extract_zip``) into the session's own workspace folder; folders are read with
``softpatch.io.datasets.scan_images`` / ``load_mvtec`` within a ``ReadScope`` (the session's workspace for uploads,
the server-path policy's roots minus the work folder for server folders: ``softpatch_app.server_paths``).
Every refusal is a ``DataError`` with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from softpatch.errors import DataError
from softpatch.io.datasets import (
    OUTSIDE_REASON,
    ImageFolder,
    ImageRecord,
    SkippedFile,
    find_mask,
    is_hidden_name,
    load_mvtec,
    mask_index,
    scan_images,
)
from softpatch.io.demo import DemoManifest, generate_demo_dataset, load_demo_manifest
from softpatch.io.images import IMAGE_EXTENSIONS
from softpatch.io.limits import LoadLimits
from softpatch.io.paths import ReadScope, is_within
from softpatch.io.safezip import extract_zip
from softpatch.runtime.progress import ProgressCallback
from softpatch_app.uploads import save_uploads
from softpatch_app.workspace import Workspace

SOURCES = ("demo", "browser folder", "zip", "server folder")


@dataclass
class LoadedSplit:
    """A loaded training or test set, with where it came from."""

    folder: ImageFolder
    source: str  # one of SOURCES (+ " + added images")
    description: str  # e.g. "battery_weld (server folder)"
    labelled: bool = False  # test sets: whether good/defective labels are known (from folder names)

    @property
    def records(self) -> list[ImageRecord]:
        return self.folder.records

    @property
    def skipped(self) -> list[SkippedFile]:
        return self.folder.skipped

    def __len__(self) -> int:
        return len(self.folder)

    @property
    def n_masks(self) -> int:
        return sum(r.mask_path is not None for r in self.folder.records)

    @property
    def n_defective(self) -> int:
        return sum(r.label == 1 for r in self.folder.records)


@dataclass
class LoadResult:
    """What one load produced: a training set and, for MVTec-style folders, a labelled test set."""

    name: str
    train: LoadedSplit | None = None
    test: LoadedSplit | None = None
    demo: DemoManifest | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- folder layouts


def is_mvtec_root(root: Path) -> bool:
    return (root / "train" / "good").is_dir()


def _dataset_name(root: Path) -> str:
    if root.name in ("good",) and root.parent.name == "train":
        return root.parent.parent.name or root.name
    return root.name or str(root)


def read_training_folder(
    root: Path,
    *,
    limits: LoadLimits,
    source: str,
    label: str,
    scope: ReadScope | None = None,
    progress: ProgressCallback | None = None,
) -> LoadResult:
    """A training set from ``root``: an MVTec category (train/good + test) or any folder of images.

    Nothing outside ``scope`` is read (see ``softpatch.io.paths.ReadScope``); ``progress`` hears every file
    checked (the core's ``loading`` stage)."""
    root = Path(root)
    if is_mvtec_root(root):
        ds = load_mvtec(root, limits=limits, scope=scope, progress=progress)
        result = LoadResult(name=ds.name)
        result.train = LoadedSplit(ds.train, source, f"{label} · train/good")
        if len(ds.test):
            result.test = LoadedSplit(ds.test, source, f"{label} · test", labelled=True)
            result.notes.append(
                f"Found an MVTec-style folder: {len(ds.train)} training images and {len(ds.test)} labelled test "
                "images were loaded together."
            )
        result.demo = load_demo_manifest(root)
        return result
    folder = scan_images(root, limits=limits, scope=scope, progress=progress)
    return LoadResult(name=_dataset_name(root), train=LoadedSplit(folder, source, label))


def _mask_base(root: Path, test_dir: Path, scope: ReadScope | None) -> Path | None:
    """The ``ground_truth`` folder of a test folder: inside it, or next to it when that is inside ``root`` or
    ``scope`` (a test folder typed at the edge of the allowed folders never takes masks from outside them)."""
    for candidate in (test_dir / "ground_truth", test_dir.parent / "ground_truth"):
        allowed = is_within(candidate, root) or (scope is not None and scope.allows(candidate))
        if allowed and candidate.is_dir():
            return candidate
    return None


def read_test_folder(
    root: Path,
    *,
    limits: LoadLimits,
    source: str,
    label: str,
    scope: ReadScope | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedSplit:
    """A test set from ``root``.

    Accepted layouts: an MVTec category (its ``test/`` and ``ground_truth/``); a folder with ``test/``;
    a folder of class subfolders (``good/`` = defect-free, any other name = defective) with masks in a
    ``ground_truth/<class>/`` folder inside it or next to it; or a flat folder of images (no labels).
    Nothing outside ``scope`` is read; class and mask folders that are symlinks out of the test folder
    are skipped (their target is not named). ``progress`` hears every file checked.
    """
    root = Path(root)
    if is_mvtec_root(root):
        ds = load_mvtec(root, limits=limits, scope=scope, progress=progress)
        if not len(ds.test):
            raise DataError(f"{root} has no test/ images")
        return LoadedSplit(ds.test, source, label, labelled=True)
    has_test = (root / "test").is_dir() and is_within(root / "test", root)
    test_dir = root / "test" if has_test else root
    if scope is not None and not scope.allows(test_dir):
        raise DataError(f"{test_dir} is outside the folders that may be read here")
    gt_base = _mask_base(root, test_dir, scope)
    subfolders = [
        p for p in test_dir.iterdir() if p.is_dir() and not is_hidden_name(p.name) and p.name != "ground_truth"
    ]
    classes = sorted(p for p in subfolders if is_within(p, test_dir))
    outside = sorted(p for p in subfolders if not is_within(p, test_dir))
    loose = [p for p in test_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not classes or loose:
        folder = scan_images(test_dir, limits=limits, scope=scope, progress=progress)
        labelled = False
        return LoadedSplit(folder, source, label, labelled=labelled)
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = [SkippedFile(f"{p.name}/", OUTSIDE_REASON) for p in outside]
    for class_dir in classes:
        try:
            part = scan_images(class_dir, limits=limits, scope=scope, progress=progress)
        except DataError as exc:
            skipped.append(SkippedFile(f"{class_dir.name}/", str(exc)))
            continue
        defect = class_dir.name
        is_good = defect.lower() in ("good", "ok", "normal", "nominal")
        masks = {} if is_good or gt_base is None else mask_index(gt_base / defect, within=gt_base, scope=scope)
        for r in part.records:
            rel = PurePosixPath(r.relpath or r.path.name)
            mask = find_mask(rel, masks) if masks else None
            records.append(
                ImageRecord(
                    path=r.path,
                    label=0 if is_good else 1,
                    defect="good" if is_good else defect,
                    mask_path=mask,
                    relpath=f"{defect}/{rel}",
                )
            )
        skipped.extend(SkippedFile(f"{defect}/{s.path}", s.reason) for s in part.skipped)
    if not records:
        raise DataError(f"no readable test images in {test_dir}")
    labelled = any(r.label == 1 for r in records) or any(r.defect == "good" for r in records)
    return LoadedSplit(ImageFolder(test_dir, records, skipped), source, label, labelled=labelled)


# ------------------------------------------------------------------------------------------- the four ways


def save_browser_files(files, workspace: Workspace, slot: str, limits: LoadLimits) -> tuple[Path, list[SkippedFile]]:
    """Save Streamlit ``UploadedFile`` objects (a folder upload, loose files or zips) into the workspace."""
    if not files:
        raise DataError("no files were uploaded")
    dest = workspace.subdir(slot)
    pairs = ((f.name, f.getvalue()) for f in files)
    root, skipped = save_uploads(pairs, dest, limits=limits)
    return root, skipped


def save_zip(uploaded, workspace: Workspace, slot: str, limits: LoadLimits) -> tuple[Path, list[SkippedFile]]:
    """Extract one uploaded .zip into the workspace (safely: see ``softpatch.io.safezip``)."""
    if uploaded is None:
        raise DataError("no zip file was uploaded")
    data = uploaded.getvalue()
    if len(data) > limits.max_upload_bytes:
        raise DataError(
            f"{uploaded.name} is {len(data) / 2**20:.1f} MB, over the upload limit of "
            f"{limits.max_upload_bytes / 2**20:.0f} MB"
        )
    result = extract_zip(data, workspace.subdir(slot), limits=limits)
    if not result.extracted:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in result.skipped[:3])
        raise DataError(f"{uploaded.name} contains no usable files" + (f" ({reasons})" if reasons else ""))
    from softpatch.io.safezip import single_folder_root

    return single_folder_root(result.root, list(result.extracted)), list(result.skipped)


def load_demo(workspace: Workspace, *, limits: LoadLimits, seed: int = 0) -> LoadResult:
    """The built-in demo data (generated into the session's workspace: ~1 s, nothing downloaded)."""
    root = generate_demo_dataset(workspace.subdir("demo") / f"softpatch-demo-{seed}", seed=seed)
    result = read_training_folder(root, limits=limits, source="demo", label="built-in demo (synthetic discs)")
    result.name = "softpatch demo"
    result.demo = load_demo_manifest(root)
    return result


def with_upload_skips(split: LoadedSplit, upload_skipped: list[SkippedFile]) -> LoadedSplit:
    """Add the files the upload step refused to the split's skipped list (so the user sees all of them)."""
    if upload_skipped:
        split.folder.skipped = list(upload_skipped) + list(split.folder.skipped)
    return split


def add_training_images(split: LoadedSplit, extra: ImageFolder, tag: str = "added") -> LoadedSplit:
    """Append images (e.g. a few suspected defects) to a training set; their names start with ``tag/``."""
    existing = {r.name for r in split.records}
    records = list(split.records)
    for r in extra.records:
        name = f"{tag}/{r.relpath or r.path.name}"
        i = 1
        while name in existing:
            i += 1
            name = f"{tag}-{i}/{r.relpath or r.path.name}"
        existing.add(name)
        records.append(ImageRecord(path=r.path, label=r.label, defect=r.defect, mask_path=r.mask_path, relpath=name))
    skipped = list(split.skipped) + [SkippedFile(f"{tag}/{s.path}", s.reason) for s in extra.skipped]
    folder = ImageFolder(split.folder.root, records, skipped)
    source = split.source if split.source.endswith("+ added images") else f"{split.source} + added images"
    return LoadedSplit(folder, source, split.description, split.labelled)


def without(split: LoadedSplit, names: set[str]) -> LoadedSplit:
    """The split minus the images whose display names are in ``names`` (e.g. those marked defective)."""
    records = [r for r in split.records if r.name not in names]
    folder = ImageFolder(split.folder.root, records, list(split.skipped))
    return LoadedSplit(folder, split.source, split.description, split.labelled)
