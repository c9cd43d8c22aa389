"""Image folders, the MVTec AD layout and the paper's noisy training split.

Every image a scan returns has been decoded once already, so unreadable files are known up front and
listed in ``skipped`` with a reason a user can act on, instead of failing half-way through a fit.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from softpatch.errors import DataError, ImageLoadError
from softpatch.io.images import IMAGE_EXTENSIONS, failure_reason, load_image, load_mask
from softpatch.io.limits import DEFAULT_LIMITS, LoadLimits
from softpatch.io.paths import ReadScope, is_within, unreadable_reason
from softpatch.runtime.progress import ProgressCallback, report

__all__ = [
    "Dataset",
    "ImageFolder",
    "ImageRecord",
    "NoisySplit",
    "SkippedFile",
    "is_hidden_name",
    "load_mvtec",
    "make_noisy_split",
    "scan_images",
]

# Names that operating systems and archivers leave behind; never data.
SYSTEM_NAMES = frozenset(
    {"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin", "system volume information", "icon\r"}
)
HIDDEN_REASON = "hidden or system file"
HIDDEN_FOLDER_REASON = "hidden or system folder"
NOT_IMAGE_REASON = "not an image file type"
OUTSIDE_REASON = "symlink points outside the folder"
EXCLUDED_REASON = "excluded folder (not readable through this path)"
GOOD = "good"
# A scan reports progress after this many decoded files: often enough for a bar, rarely enough to cost nothing.
PROGRESS_EVERY = 64


def is_hidden_name(name: str) -> bool:
    """Whether one path component is a hidden (dot) or operating-system file or folder."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


@dataclass(frozen=True)
class SkippedFile:
    """A file (or folder, path ending in "/") left out, with a one-line reason for the user.

    ``path`` is relative to the scanned folder (or the archive) where possible, in "/" form.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. ``label`` 1 = anomalous; ``mask_path`` None = no ground-truth mask known.

    ``relpath`` is the path relative to the scanned root ("/" separated), "" when unknown.
    """

    path: Path
    label: int = 0
    defect: str = GOOD
    mask_path: Path | None = None
    relpath: str = ""

    @property
    def name(self) -> str:
        """A display name: the path relative to the scanned root when known, else the file name."""
        return self.relpath or self.path.name


@dataclass
class ImageFolder:
    """The usable images of a folder, in a deterministic order, and what was left out and why."""

    root: Path
    records: list[ImageRecord]
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The image files, in record order."""
        return [r.path for r in self.records]

    @property
    def names(self) -> list[str]:
        """Each record's ``name``, in record order."""
        return [r.name for r in self.records]

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64, 1 = anomalous."""
        return np.asarray([r.label for r in self.records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)


@dataclass
class Dataset:
    """A category in MVTec AD layout: clean training images and labelled test images."""

    root: Path
    name: str
    train: ImageFolder
    test: ImageFolder


@dataclass
class NoisySplit:
    """The paper's noisy benchmark: ``train`` = clean train + ``injected`` anomalous test images (label 1)."""

    train: list[ImageRecord]
    test: list[ImageRecord]
    injected: list[ImageRecord]


# ---------------------------------------------------------------- folder scanning


@dataclass
class _Candidate:
    path: Path
    rel: PurePosixPath
    via_symlink: bool
    real: str


def _check_root(root: str | os.PathLike) -> Path:
    """The folder as an absolute path, or a DataError saying why it cannot be scanned."""
    path = Path(root).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(unreadable_reason("folder", path, exc)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path} is a file, not a folder; give the folder that contains the images")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"cannot read folder {path}: permission denied")
    return path.absolute()


def _out_of_scope(path: str | os.PathLike, scope: ReadScope | None) -> DataError | None:
    """The refusal for a folder outside ``scope``, else None. Names only the path as given, never its target."""
    if scope is None or scope.allows(path):
        return None
    return DataError(f"{path} is outside the folders that may be read here")


def _walk(root: Path, skipped: list[SkippedFile], scope: ReadScope | None = None) -> list[_Candidate]:
    """Candidate image files under ``root`` (recursive); everything else goes to ``skipped``.

    Symlinks are followed only while they stay inside ``root`` (their target is never named in the
    reason). Folders inside ``scope.excluded`` are skipped. Real folders are walked first and symlinked
    folders afterwards, each real folder once, so a link never shadows its target and symlink loops end.
    A plain (non-link) entry of a folder that resolved inside ``root`` is inside it too, so only links and
    folders need resolving.
    """
    refusal = _out_of_scope(root, scope)
    if refusal is not None:
        raise refusal
    excluded = scope is not None and bool(scope.excluded)
    root_real = os.path.realpath(root)
    visited = {root_real}
    candidates: list[_Candidate] = []
    stack: list[tuple[Path, PurePosixPath]] = [(root, PurePosixPath())]
    linked_folders: list[tuple[Path, PurePosixPath, str]] = []
    while stack or linked_folders:
        if not stack:
            path, rel, real = linked_folders.pop(0)
            if real in visited:
                skipped.append(SkippedFile(f"{rel}/", "symlink to a folder that is already scanned"))
            else:
                visited.add(real)
                stack.append((path, rel))
            continue
        folder, rel_folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
            if not rel_folder.parts:
                raise DataError(f"cannot read folder {root}: {why}") from None
            skipped.append(SkippedFile(f"{rel_folder}/", f"folder cannot be read ({why})"))
            continue
        subfolders: list[tuple[Path, PurePosixPath]] = []
        for entry in entries:
            rel = rel_folder / entry.name
            path = Path(entry.path)
            is_link = entry.is_symlink()
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError:
                skipped.append(SkippedFile(str(rel), "broken symlink" if is_link else "file cannot be read"))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            shown = f"{rel}/" if is_dir else str(rel)
            if is_hidden_name(entry.name):
                skipped.append(SkippedFile(shown, HIDDEN_FOLDER_REASON if is_dir else HIDDEN_REASON))
                continue
            real = os.path.realpath(entry.path) if is_link else ""
            if is_link and not is_within(real, root_real):
                skipped.append(SkippedFile(shown, OUTSIDE_REASON))
            elif excluded and (is_link or is_dir) and scope.is_excluded(real or entry.path):
                skipped.append(SkippedFile(shown, EXCLUDED_REASON))
            elif is_dir and is_link:
                linked_folders.append((path, rel, real))
            elif is_dir:
                visited.add(os.path.realpath(entry.path))
                subfolders.append((path, rel))
            elif not stat.S_ISREG(st.st_mode):
                skipped.append(SkippedFile(shown, "not a regular file"))
            elif "." not in entry.name or path.suffix.lower() in IMAGE_EXTENSIONS:
                # No extension: let the content decide.
                candidates.append(_Candidate(path, rel, is_link, real))
            else:
                skipped.append(SkippedFile(shown, NOT_IMAGE_REASON))
        stack.extend(reversed(subfolders))
    if any(c.via_symlink for c in candidates):
        # A symlink to a file that is in the folder anyway would count the same image twice.
        own = {os.path.realpath(c.path) for c in candidates if not c.via_symlink}
        kept = []
        for c in candidates:
            if c.via_symlink and c.real in own:
                skipped.append(SkippedFile(str(c.rel), "symlink to a file already in the folder"))
            else:
                kept.append(c)
        candidates = kept
    candidates.sort(key=lambda c: c.rel.parts)
    return candidates


def _decode_all(
    paths: Sequence[Path],
    limits: LoadLimits,
    decode: Callable[[Path, LoadLimits], object] = load_image,
    *,
    progress: ProgressCallback | None = None,
    what: str = "files",
) -> list[str | None]:
    """Decode every file once with ``decode``: per file None when it decodes, else the reason it does not.

    Pillow releases the GIL while decoding, so a small thread pool helps; it stays small because each
    worker may hold one full-size decoded image. ``progress`` hears ``"loading: <i> of <n> <what> checked"``
    every ``PROGRESS_EVERY`` files and at the end (a 10,000-image folder takes minutes).
    """

    def check(path: Path) -> str | None:
        try:
            decode(path, limits)
        except ImageLoadError as exc:
            return failure_reason(exc)
        return None

    total = len(paths)
    reasons: list[str | None] = []

    def collect(results: Iterator[str | None]) -> None:
        for reason in results:
            reasons.append(reason)
            done = len(reasons)
            if done % PROGRESS_EVERY == 0 or done == total:
                report(progress, done / total, f"loading: {done:,} of {total:,} {what} checked")

    workers = min(4, os.cpu_count() or 1, max(1, total))
    if workers == 1:
        collect(map(check, paths))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            collect(pool.map(check, paths))
    return reasons


def _scan_folder(
    folder: Path,
    limits: LoadLimits,
    *,
    prefix: PurePosixPath | None = None,
    scope: ReadScope | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Decoded-and-usable records plus skipped files; relpaths get ``prefix`` prepended. Never empty-checks."""
    prefix = prefix or PurePosixPath()
    skipped: list[SkippedFile] = []
    candidates = _walk(folder, skipped, scope)
    if len(candidates) > limits.max_files:
        reason = f"over the file limit (LoadLimits.max_files={limits.max_files})"
        skipped.extend(SkippedFile(str(c.rel), reason) for c in candidates[limits.max_files :])
        candidates = candidates[: limits.max_files]
    what = f"files of {prefix}/" if prefix.parts else "files"
    reasons = _decode_all([c.path for c in candidates], limits, progress=progress, what=what)
    records = []
    for c, reason in zip(candidates, reasons, strict=True):
        if reason is None:
            records.append(ImageRecord(path=c.path, relpath=str(prefix / c.rel)))
        else:
            skipped.append(SkippedFile(str(c.rel), reason))
    if prefix.parts:
        skipped = [SkippedFile(str(prefix / s.path) + ("/" if s.path.endswith("/") else ""), s.reason) for s in skipped]
    skipped.sort(key=lambda s: PurePosixPath(s.path).parts)
    return records, skipped


def _summarize_skipped(skipped: Sequence[SkippedFile], *, top: int = 4) -> str:
    """ "3 not an image file type, 2 truncated or corrupt image data": the most common reasons, counted."""
    counts = Counter(s.reason for s in skipped).most_common()
    parts = [f"{n} {reason}" for reason, n in counts[:top]]
    rest = sum(n for _, n in counts[top:])
    if rest:
        parts.append(f"{rest} for other reasons")
    return ", ".join(parts)


def _no_images_error(root: Path, skipped: Sequence[SkippedFile]) -> DataError:
    if not skipped:
        return DataError(f"no images in {root}: the folder is empty")
    n = len(skipped)
    noun = "file" if n == 1 else "files"
    return DataError(f"no readable images in {root}: {n} {noun} skipped ({_summarize_skipped(skipped)})")


def scan_images(
    root: str | os.PathLike,
    *,
    limits: LoadLimits | None = None,
    scope: ReadScope | None = None,
    progress: ProgressCallback | None = None,
) -> ImageFolder:
    """All decodable images under ``root`` (recursive), sorted by relative path.

    Every candidate is decoded once; unreadable, hidden, non-image, outside-pointing-symlink and
    over-the-limit files, and folders excluded by ``scope``, are listed in ``skipped`` with a reason.
    Files without an extension are tried by content. Raises ``DataError`` when ``root`` is outside
    ``scope`` (checked first, so nothing outside is even looked at), missing, a file, unreadable, or has
    no usable image. ``progress`` hears the ``loading`` stage as files are decoded.
    """
    limits = limits or DEFAULT_LIMITS
    refusal = _out_of_scope(root, scope)
    if refusal is not None:
        raise refusal
    folder = _check_root(root)
    records, skipped = _scan_folder(folder, limits, scope=scope, progress=progress)
    if not records:
        raise _no_images_error(folder, skipped)
    return ImageFolder(root=folder, records=records, skipped=skipped)


# ---------------------------------------------------------------- MVTec AD layout


def mask_index(
    gt_folder: Path, *, within: str | os.PathLike | None = None, scope: ReadScope | None = None
) -> dict[str, Path]:
    """Mask files of one ground_truth/<defect>/ folder by relative "/" path (not decoded here; hidden files,
    outside-pointing symlinks skipped). Empty when the folder does not exist, resolves outside ``within``
    (e.g. a symlinked mask folder pointing out of the dataset) or outside ``scope``."""
    index: dict[str, Path] = {}
    if within is not None and not is_within(gt_folder, within):
        return index
    if _out_of_scope(gt_folder, scope) is not None or not gt_folder.is_dir():
        return index
    ignored: list[SkippedFile] = []
    for c in _walk(gt_folder, ignored, scope):
        index[str(c.rel)] = c.path
    return index


def find_mask(rel_in_defect: PurePosixPath, masks: dict[str, Path]) -> Path | None:
    """``<stem>_mask.<ext>`` (MVTec), the exact same name, or the same stem with any image extension."""
    parent, stem = rel_in_defect.parent, rel_in_defect.stem
    options = [str(parent / f"{stem}_mask{ext}") for ext in (".png", *sorted(IMAGE_EXTENSIONS))]
    options.append(str(rel_in_defect))
    options.extend(str(parent / f"{stem}{ext}") for ext in (".png", *sorted(IMAGE_EXTENSIONS)))
    for key in options:
        if key in masks:
            return masks[key]
    # Extensions in another letter case (".PNG").
    lowered = {k.lower(): v for k, v in masks.items()}
    for key in options:
        if key.lower() in lowered:
            return lowered[key.lower()]
    return None


def load_mvtec(
    root: str | os.PathLike,
    *,
    limits: LoadLimits | None = None,
    scope: ReadScope | None = None,
    progress: ProgressCallback | None = None,
) -> Dataset:
    """A category in MVTec AD layout: ``train/good/``, ``test/<defect>/``, ``ground_truth/<defect>/``.

    Train records are label 0. Test records are label 0 in ``test/good`` and label 1 (``defect`` = the
    folder name) elsewhere. A defective test image gets ``mask_path`` from ``ground_truth/<defect>/``
    (``<stem>_mask.png``, the same file name, or the same stem); without a mask it is kept with
    ``mask_path=None`` and pixel metrics leave it out. Good images have no mask (all zero). Masks with no
    test image are ignored; masks that do not decode are listed in ``test.skipped`` and not used.
    Record names are relative to ``root`` ("test/crack/000.png"). A missing ``test/`` gives an empty
    test set. Every part (``train/good``, ``test``, each defect folder, each mask folder) must resolve
    inside ``root``: a symlinked part pointing out of it is refused or skipped, never read. Raises
    ``DataError`` when ``root`` is outside ``scope``, ``train/good`` is missing, points outside ``root``
    or holds no usable image. ``progress`` hears the ``loading`` stage, one part (folder) after another.
    """
    limits = limits or DEFAULT_LIMITS
    refusal = _out_of_scope(root, scope)
    if refusal is not None:
        raise refusal
    base = _check_root(root)
    train_dir = base / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"{base} is not in MVTec AD layout: the folder train/good/ is missing")
    if not is_within(train_dir, base):
        raise DataError(f"{base}: train/good/ is a symlink that points outside the folder; it is not read")
    train_records, train_skipped = _scan_folder(
        _check_root(train_dir), limits, prefix=PurePosixPath("train/good"), scope=scope, progress=progress
    )
    if not train_records:
        raise _no_images_error(train_dir, train_skipped)

    test_dir = base / "test"
    test_records: list[ImageRecord] = []
    test_skipped: list[SkippedFile] = []
    if test_dir.is_dir() and not is_within(test_dir, base):
        test_skipped.append(SkippedFile("test/", OUTSIDE_REASON))
    elif test_dir.is_dir():
        defect_dirs: list[Path] = []
        with os.scandir(test_dir) as it:
            for entry in sorted(it, key=lambda e: e.name):
                rel = f"test/{entry.name}"
                if is_hidden_name(entry.name):
                    test_skipped.append(SkippedFile(rel + ("/" if entry.is_dir() else ""), HIDDEN_REASON))
                elif entry.is_symlink() and not is_within(entry.path, base):
                    test_skipped.append(SkippedFile(rel, OUTSIDE_REASON))
                elif entry.is_dir() and scope is not None and scope.is_excluded(entry.path):
                    test_skipped.append(SkippedFile(rel + "/", EXCLUDED_REASON))
                elif entry.is_dir():
                    defect_dirs.append(Path(entry.path))
                else:
                    test_skipped.append(SkippedFile(rel, "not inside a test/<defect>/ folder"))
        masks_to_check: list[tuple[int, Path]] = []
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            records, skipped = _scan_folder(
                defect_dir, limits, prefix=PurePosixPath("test", defect), scope=scope, progress=progress
            )
            test_skipped.extend(skipped)
            label = 0 if defect == GOOD else 1
            masks = {} if label == 0 else mask_index(base / "ground_truth" / defect, within=base, scope=scope)
            prefix_len = len(("test", defect))
            for record in records:
                rel_in_defect = PurePosixPath(*PurePosixPath(record.relpath).parts[prefix_len:])
                mask = find_mask(rel_in_defect, masks) if label else None
                if mask is not None:
                    masks_to_check.append((len(test_records), mask))
                test_records.append(
                    ImageRecord(path=record.path, label=label, defect=defect, mask_path=mask, relpath=record.relpath)
                )
        # Masks are decoded up front too, so that pixel metrics never meet an unreadable one.
        reasons = _decode_all([m for _, m in masks_to_check], limits, decode=load_mask, progress=progress, what="masks")
        for (i, mask), reason in zip(masks_to_check, reasons, strict=True):
            if reason is not None:
                test_skipped.append(SkippedFile(str(mask.relative_to(base).as_posix()), f"mask not used: {reason}"))
                r = test_records[i]
                test_records[i] = ImageRecord(r.path, r.label, r.defect, None, r.relpath)
    train = ImageFolder(root=train_dir, records=train_records, skipped=train_skipped)
    test = ImageFolder(root=test_dir, records=test_records, skipped=test_skipped)
    return Dataset(root=base, name=base.name, train=train, test=test)


# ---------------------------------------------------------------- the paper's noisy split


def make_noisy_split(dataset: Dataset, *, noise: float, overlap: bool, seed: int) -> NoisySplit:
    """Add ``int(noise * n_train)`` anomalous test images, drawn with ``np.random.default_rng(seed)``, to train.

    Injected records keep label 1 so a benchmark knows which training images are noise. No-overlap
    (``overlap=False``): they leave the test set. Overlap: they stay in it too. ``noise=0`` leaves train
    unchanged. Raises ``DataError`` when the test set has too few anomalous images.
    """
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise DataError(f"noise must be a fraction >= 0, got {noise}")
    train = list(dataset.train.records)
    test = list(dataset.test.records)
    # The epsilon keeps 0.29 * 100 from flooring to 28 through float rounding.
    n_inject = int(noise * len(train) + 1e-9)
    anomalous = [i for i, r in enumerate(test) if r.label == 1]
    if n_inject > len(anomalous):
        raise DataError(
            f"noise {noise:g} needs {n_inject} anomalous test images to inject into {len(train)} training images, "
            f"but {dataset.name} has only {len(anomalous)}"
        )
    if n_inject == 0:
        return NoisySplit(train=train, test=test, injected=[])
    rng = np.random.default_rng(seed)
    chosen = sorted(anomalous[int(j)] for j in rng.choice(len(anomalous), size=n_inject, replace=False))
    injected = [test[i] for i in chosen]
    if not overlap:
        drop = set(chosen)
        test = [r for i, r in enumerate(test) if i not in drop]
    return NoisySplit(train=train + injected, test=test, injected=injected)
