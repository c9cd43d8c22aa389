"""Extracting untrusted zip uploads without writing outside the destination folder.

Policy, entry by entry (each skipped entry is listed with its reason; the rest is extracted):
- unsafe paths (``..``, absolute, drive letters, backslash tricks), symlinks and other special files,
  encrypted entries, nested archives, hidden and OS files (``__MACOSX``, ``.DS_Store``) are skipped;
- a member whose declared compression ratio is over ``LoadLimits.max_zip_ratio`` is skipped (the
  rest of the archive stays usable); members declaring at most 1 MiB are exempt, since they cannot
  write more than that (below) and tiny uniform files legitimately compress very well;
- bytes actually written are counted while streaming: a member may not exceed its declared size and
  the archive may not exceed ``max_zip_uncompressed_bytes``, whatever its headers claim.
Whole-archive refusals (``DataError``, nothing extracted): not a zip, larger than
``max_upload_bytes``, more than ``max_zip_members`` entries, declared total over
``max_zip_uncompressed_bytes``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from softpatch.errors import DataError
from softpatch.io.datasets import HIDDEN_REASON, SkippedFile, is_hidden_name
from softpatch.io.limits import DEFAULT_LIMITS, LoadLimits, format_bytes
from softpatch.io.paths import is_within, name_clash_reason, unreadable_reason

__all__ = ["ARCHIVE_EXTENSIONS", "ExtractResult", "extract_zip", "safe_relative_parts", "single_folder_root"]

ARCHIVE_EXTENSIONS = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst", ".jar", ".cab"}
)
_RATIO_CHECK_MIN_BYTES = 1 << 20
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError)


@dataclass
class ExtractResult:
    """What an archive gave: ``root`` is the folder to scan (``dest``, or the one folder everything lies in)."""

    root: Path
    extracted: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def safe_relative_parts(name: str) -> tuple[list[str], str]:
    """Split an untrusted relative path into safe components: ``(parts, "")`` or ``([], reason)``.

    Backslashes count as separators (Windows archivers); absolute paths, drive letters and ``..``
    are refused rather than repaired, since an entry that tries to escape is not data we want.
    Control characters are removed from each component.
    """
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or _DRIVE.match(cleaned):
        return [], "unsafe path: absolute path not extracted"
    raw_parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if any(p == ".." for p in raw_parts):
        return [], "unsafe path: '..' would write outside the folder"
    parts = [_CONTROL.sub("", p).strip() for p in raw_parts]
    if any(p in ("", ".", "..") for p in parts):
        return [], "unsafe path: a name is empty after removing control characters"
    if not parts:
        return [], "empty file name"
    return parts, ""


def single_folder_root(dest: Path, files: list[Path]) -> Path:
    """``dest``, or the deepest folder under it that contains every file (zips often wrap one folder)."""
    root = dest
    rels = [f.relative_to(dest).parts for f in files]
    depth = 0
    while rels and all(len(r) > depth + 1 for r in rels) and len({r[depth] for r in rels}) == 1:
        root = root / rels[0][depth]
        depth += 1
    return root


def _member_name(info: zipfile.ZipInfo) -> str:
    """The entry's name; without the UTF-8 flag (0x800), names zipfile read as cp437 that are valid UTF-8
    are taken as UTF-8, since many archivers write UTF-8 without setting the flag."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


@contextlib.contextmanager
def _open_source(source: str | os.PathLike | bytes | BinaryIO, limits: LoadLimits) -> Iterator[BinaryIO]:
    too_big = f"the archive is over the upload limit of {format_bytes(limits.max_upload_bytes)}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > limits.max_upload_bytes:
            raise DataError(f"{too_big} ({format_bytes(len(source))}; LoadLimits.max_upload_bytes)")
        yield io.BytesIO(bytes(source))
        return
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise DataError(f"{path} is not a file")
            if size > limits.max_upload_bytes:
                raise DataError(f"{too_big} ({format_bytes(size)}; LoadLimits.max_upload_bytes)")
            fh = open(path, "rb")
        except OSError as exc:
            raise DataError(unreadable_reason("archive", path, exc)) from None
        with fh:
            yield fh
        return
    seekable = getattr(source, "seekable", lambda: False)()
    if seekable:
        start = source.tell()
        size = source.seek(0, os.SEEK_END) - start
        source.seek(start)
        if size > limits.max_upload_bytes:
            raise DataError(f"{too_big} ({format_bytes(size)}; LoadLimits.max_upload_bytes)")
        yield source
        return
    data = source.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise DataError(f"{too_big} (LoadLimits.max_upload_bytes)")
    yield io.BytesIO(data)


def _entry_problem(info: zipfile.ZipInfo, parts: list[str], limits: LoadLimits) -> str:
    """Why an entry is not extracted, or "" when it is."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symbolic link not extracted"
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        return "not a regular file (device, pipe or socket entry)"
    if any(is_hidden_name(p) for p in parts):
        return HIDDEN_REASON
    if info.flag_bits & 0x1:
        return "encrypted (password-protected) entry not extracted"
    if PurePosixPath(parts[-1]).suffix.lower() in ARCHIVE_EXTENSIONS:
        return "nested archive not extracted"
    if info.file_size > limits.max_upload_bytes:
        return f"entry is {format_bytes(info.file_size)}, over the file size limit (LoadLimits.max_upload_bytes)"
    if info.file_size > _RATIO_CHECK_MIN_BYTES:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_zip_ratio:
            return (
                f"compression ratio {ratio:,.0f}:1 is over the limit of {limits.max_zip_ratio:g}:1 "
                "(possible zip bomb; LoadLimits.max_zip_ratio)"
            )
    return ""


class _SizeExceeded(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _write_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Stream one member to a new file; returns bytes written. Raises ``_SizeExceeded`` or a zip/OS error."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                # Declared sizes can lie: count what is really produced.
                if written > info.file_size:
                    raise _SizeExceeded("entry holds more data than its header declares (corrupt or malicious)")
                if written > budget:
                    raise _SizeExceeded("archive expands past LoadLimits.max_zip_uncompressed_bytes")
                out.write(chunk)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return written


def extract_zip(
    source: str | os.PathLike | bytes | BinaryIO, dest: str | os.PathLike, *, limits: LoadLimits | None = None
) -> ExtractResult:
    """Safely extract an untrusted zip (path, bytes or binary file) into ``dest`` (created).

    Nothing is ever written outside ``dest``. Entries that are unsafe or unwanted are listed in
    ``skipped`` (path = the entry name) with a reason; see the module docstring for the policy.
    Entries are processed in archive order; the extracted list is sorted. Raises ``DataError`` for an
    archive that is not a zip or breaks a whole-archive limit.
    """
    limits = limits or DEFAULT_LIMITS
    dest = Path(dest)
    with _open_source(source, limits) as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except _ZIP_ERRORS:
            raise DataError("not a valid zip archive (the file is damaged or of another type)") from None
        with zf:
            infos = zf.infolist()
            if len(infos) > limits.max_zip_members:
                raise DataError(
                    f"the archive has {len(infos):,} entries, over the limit of {limits.max_zip_members:,} "
                    "(LoadLimits.max_zip_members)"
                )
            declared = sum(i.file_size for i in infos if not i.is_dir())
            if declared > limits.max_zip_uncompressed_bytes:
                raise DataError(
                    f"the archive would expand to {format_bytes(declared)}, over the limit of "
                    f"{format_bytes(limits.max_zip_uncompressed_bytes)} (LoadLimits.max_zip_uncompressed_bytes)"
                )
            dest.mkdir(parents=True, exist_ok=True)
            return _extract_members(zf, infos, dest, limits)


def _extract_members(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, limits: LoadLimits
) -> ExtractResult:
    dest_abs = Path(os.path.abspath(dest))
    extracted: list[Path] = []
    skipped: list[SkippedFile] = []
    budget = limits.max_zip_uncompressed_bytes
    for info in infos:
        name = _member_name(info)
        parts, reason = safe_relative_parts(name)
        if info.is_dir() and not reason:
            continue  # folders are created as their files need them
        if not reason:
            reason = _entry_problem(info, parts, limits)
        if reason:
            skipped.append(SkippedFile(name, reason))
            continue
        target = dest_abs.joinpath(*parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Belt and braces: a folder already in dest could be a symlink pointing elsewhere.
            if not is_within(target.parent, dest_abs):
                reason = "unsafe path: would write outside the folder"
            else:
                budget -= _write_member(zf, info, target, budget)
        except _SizeExceeded as exc:
            reason = exc.reason
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            reason = name_clash_reason(target, done="extracted", other="entry")
        except NotImplementedError:
            reason = "unsupported compression method"
        except RuntimeError:  # zipfile's "password required"; flag bit 0x1 is caught earlier
            reason = "encrypted (password-protected) entry not extracted"
        except (zipfile.BadZipFile, EOFError, ValueError, zlib.error):
            reason = "corrupt data in the archive (checksum or decompression error)"
        except OSError as exc:
            reason = f"cannot be written ({exc.strerror or exc})"
        if reason:
            skipped.append(SkippedFile(name, reason))
            continue
        extracted.append(target)
    extracted.sort(key=lambda p: p.parts)
    root = single_folder_root(dest_abs, extracted)
    return ExtractResult(root=root, extracted=extracted, skipped=skipped)
