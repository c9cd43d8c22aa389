"""Saving browser uploads (single files, folder uploads, zips) into a working folder safely."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from softpatch.errors import DataError
from softpatch.io.datasets import HIDDEN_REASON, SkippedFile, is_hidden_name
from softpatch.io.limits import DEFAULT_LIMITS, LoadLimits, format_bytes
from softpatch.io.paths import is_within, name_clash_reason
from softpatch.io.safezip import ARCHIVE_EXTENSIONS, extract_zip, single_folder_root

__all__ = ["sanitize_upload_name", "save_uploads"]


def sanitize_upload_name(name: str) -> list[str]:
    """Safe path components of a browser-supplied name ("good/part 01.png" -> ["good", "part 01.png"]).

    Unlike zip entries, uploads are repaired rather than refused: the browser (not an archive) chose the
    name, so dropping ``..``, empty and ``.`` components, a leading drive letter and control characters
    keeps the file and its subfolders. Returns [] when nothing usable is left.
    """
    cleaned = "".join(ch for ch in name.replace("\\", "/") if ch >= " " and ch != "\x7f")
    parts = []
    for i, part in enumerate(cleaned.split("/")):
        part = part.strip()
        if i == 0 and len(part) >= 2 and part[1] == ":" and part[0].isalpha():
            part = part[2:].strip()  # "C:" or "C:name"
        if part in ("", ".", ".."):
            continue
        parts.append(part)
    return parts


def save_uploads(
    files: Iterable[tuple[str, bytes]], dest: str | os.PathLike, *, limits: LoadLimits | None = None
) -> tuple[Path, list[SkippedFile]]:
    """Write uploaded ``(name, data)`` pairs under ``dest`` (created) and return ``(root_to_scan, skipped)``.

    Names may carry relative folders (folder uploads); subfolders are kept, so the same file name in two
    folders gives two files. Zip files are extracted (via ``extract_zip``) into a folder named after the
    zip; their skipped entries are reported as "<zip name>/<entry>". Hidden/OS files, files over
    ``max_upload_bytes``, uploads past ``max_files``, other archive types and repeated names are
    skipped with a reason. The root is ``dest``, or the one folder that holds everything (e.g. the
    category folder of an uploaded MVTec zip). Nothing is written outside ``dest``.
    """
    limits = limits or DEFAULT_LIMITS
    dest_abs = Path(os.path.abspath(dest))
    dest_abs.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[SkippedFile] = []
    count = 0
    for raw_name, data in files:
        display = str(raw_name)
        parts = sanitize_upload_name(display)
        if not parts:
            skipped.append(SkippedFile(display, "file name is empty after removing unsafe characters"))
            continue
        shown = "/".join(parts)
        if any(is_hidden_name(p) for p in parts):
            skipped.append(SkippedFile(shown, HIDDEN_REASON))
            continue
        size = len(data)
        if size > limits.max_upload_bytes:
            skipped.append(
                SkippedFile(
                    shown,
                    f"file is {format_bytes(size)}, over the upload limit of "
                    f"{format_bytes(limits.max_upload_bytes)} (LoadLimits.max_upload_bytes)",
                )
            )
            continue
        count += 1
        if count > limits.max_files:
            skipped.append(SkippedFile(shown, f"over the file limit (LoadLimits.max_files={limits.max_files})"))
            continue
        suffix = PurePosixPath(parts[-1]).suffix.lower()
        is_zip = suffix == ".zip"
        if not is_zip and suffix in ARCHIVE_EXTENSIONS:
            skipped.append(SkippedFile(shown, "archive type not supported (upload a .zip)"))
            continue
        target = dest_abs.joinpath(*parts)
        if is_zip:
            target = target.with_name(target.stem or "archive")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # A folder already under dest could be a symlink pointing elsewhere.
            if not is_within(target.parent, dest_abs):
                skipped.append(SkippedFile(shown, "unsafe path: would write outside the folder"))
                continue
            if os.path.lexists(target):
                skipped.append(SkippedFile(shown, "duplicate: a file of the same name was already uploaded"))
                continue
            if is_zip:
                try:
                    result = extract_zip(bytes(data), target, limits=limits)
                except DataError as exc:
                    skipped.append(SkippedFile(shown, str(exc)))
                    continue
                skipped.extend(SkippedFile(f"{shown}/{s.path}", s.reason) for s in result.skipped)
                written.extend(result.extracted)
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            written.append(target)
        except (NotADirectoryError, FileExistsError, IsADirectoryError):
            reason = name_clash_reason(target, done="uploaded", other="upload")
            skipped.append(SkippedFile(shown, reason))
        except OSError as exc:
            skipped.append(SkippedFile(shown, f"cannot be saved ({exc.strerror or exc})"))
    written.sort(key=lambda p: p.parts)
    return single_folder_root(dest_abs, written), skipped
