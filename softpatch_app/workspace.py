"""Per-session working folders (uploads, extracted archives) with cleanup by age.

Each workspace is a fresh private folder (mode 0o700) under a base folder, holding a marker file
whose modification time is the last activity. ``cleanup_stale`` only ever deletes folders that carry
that marker, so pointing it at a wrong base cannot delete anyone's data.

A workspace is either temporary (``Workspace.create``: removed with its owner, on garbage collection or
at interpreter exit) or persistent and named (``Workspace.create_named`` / ``Workspace.open_named``: it
outlives the process and goes only by ``remove()`` or ``cleanup_stale``). Names are checked against
``NAME_PATTERN`` before they ever become part of a path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
import weakref
from pathlib import Path
from typing import Self

from softpatch.errors import DataError
from softpatch.io.paths import is_within

__all__ = [
    "ENV_WORK_DIR",
    "MARKER_NAME",
    "NAME_PATTERN",
    "Workspace",
    "cleanup_stale",
    "default_base",
    "register_cleanup",
]

ENV_WORK_DIR = "SOFTPATCH_WORK_DIR"
MARKER_NAME = ".softpatch-workspace"
_PREFIX = "ws-"
# Names of persistent workspaces: letters, digits, "_" and "-" only (no dots, no separators), so a name
# can never climb out of its base folder, name its parent or a hidden file.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def default_base(base: str | os.PathLike | None = None) -> Path:
    """``base``, else ``$SOFTPATCH_WORK_DIR``, else ``<tempdir>/softpatch-sessions``."""
    if base is not None:
        return Path(base)
    env = os.environ.get(ENV_WORK_DIR)
    return Path(env) if env else Path(tempfile.gettempdir()) / "softpatch-sessions"


def _prepare_base(base: Path) -> Path:
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(base)
    except OSError as exc:
        raise DataError(f"cannot create the work folder {base}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DataError(f"the work folder {base} is not a plain folder; set {ENV_WORK_DIR} to another place")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        # Another user's folder in a shared temp dir could be used to read or plant our uploads.
        raise DataError(f"the work folder {base} belongs to another user; set {ENV_WORK_DIR} to another place")
    return base


def _remove_tree(path: Path) -> None:
    """Delete a workspace folder; tolerate it being gone or partly undeletable (never raises)."""
    shutil.rmtree(path, ignore_errors=True)


def _is_workspace(path: Path) -> bool:
    """Whether ``path`` is a real folder (not a symlink) holding our marker file."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return stat.S_ISREG(os.lstat(path / MARKER_NAME).st_mode)
    except OSError:
        return False


def _write_marker(path: Path) -> None:
    marker = {"created": time.time(), "pid": os.getpid()}
    (path / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DataError("invalid workspace name (letters, digits, '_' and '-' only)")
    return name


class Workspace:
    """A private working folder. Temporary ones (``Workspace.create()``) are removed by ``remove()``, on
    garbage collection, or at interpreter exit, whichever comes first; persistent ones
    (``create_named`` / ``open_named``) only by ``remove()`` or ``cleanup_stale``."""

    def __init__(self, path: Path, *, persistent: bool = False) -> None:
        if not _is_workspace(path):
            raise DataError(f"{path} is not a softpatch workspace folder")
        self._path = path
        self._persistent = persistent
        self._removed = False
        # A persistent folder must survive this object and the process: no finalizer at all.
        self._finalizer = None if persistent else weakref.finalize(self, _remove_tree, path)
        self._owner_finalizers: list[weakref.finalize] = []

    @classmethod
    def create(cls, base: str | os.PathLike | None = None) -> Workspace:
        """A fresh, unique folder (mode 0o700) under ``default_base(base)``."""
        root = _prepare_base(default_base(base))
        try:
            path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=root))  # mkdtemp creates it with mode 0o700
            _write_marker(path)
        except OSError as exc:
            raise DataError(f"cannot create a workspace in {root}: {exc.strerror or exc}") from None
        return cls(path)

    @classmethod
    def create_named(cls, base: str | os.PathLike, name: str) -> Workspace:
        """A new persistent folder ``<base>/<name>`` (mode 0o700); ``DataError`` if the name is invalid or taken.

        The caller chooses ``name`` (e.g. a random project id); it is never derived from user input here.
        """
        _check_name(name)
        root = _prepare_base(Path(base))
        path = root / name
        try:
            path.mkdir(mode=0o700)  # fails if it exists: an existing folder is never adopted
            _write_marker(path)
        except FileExistsError:
            raise DataError(f"a workspace named {name!r} already exists") from None
        except OSError as exc:
            raise DataError(f"cannot create a workspace in {root}: {exc.strerror or exc}") from None
        return cls(path, persistent=True)

    @classmethod
    def open_named(cls, base: str | os.PathLike, name: str) -> Workspace:
        """The existing persistent folder ``<base>/<name>``; ``DataError`` if the name is invalid or no such
        workspace exists (a symlink, a folder without the marker or of another user is not one)."""
        _check_name(name)
        root = _prepare_base(Path(base))
        path = root / name
        try:
            st_ = os.lstat(path)
        except OSError:
            raise DataError(f"no workspace named {name!r}") from None
        real_root = os.path.realpath(root)
        if (
            not _is_workspace(path)
            or os.path.dirname(os.path.realpath(path)) != real_root
            or (hasattr(os, "getuid") and st_.st_uid != os.getuid())
        ):
            raise DataError(f"no workspace named {name!r}")
        return cls(path, persistent=True)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def persistent(self) -> bool:
        return self._persistent

    @property
    def alive(self) -> bool:
        """False once removed (by ``remove()``, or by someone else, e.g. ``cleanup_stale``)."""
        return not self._removed and (self._finalizer is None or self._finalizer.alive) and _is_workspace(self._path)

    def __repr__(self) -> str:
        return f"Workspace({str(self._path)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def subdir(self, name: str) -> Path:
        """``<workspace>/<name>`` (created); ``name`` may hold "/" but must stay inside the workspace."""
        parts = [p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts or Path(str(name)).is_absolute():
            raise DataError(f"invalid workspace folder name {name!r}")
        path = self._path.joinpath(*parts)

        def check() -> None:
            # A folder already in the workspace could be a symlink pointing elsewhere; the workspace is no subdir.
            if not is_within(path, self._path) or is_within(self._path, path):
                raise DataError(f"invalid workspace folder name {name!r}")

        check()  # before anything is created: the part that does not exist yet resolves below any link
        path.mkdir(parents=True, exist_ok=True)
        check()  # and after, in case a link appeared meanwhile
        self.touch()
        return path

    def touch(self) -> None:
        """Record activity now (cleanup_stale measures age from the last touch)."""
        try:
            os.utime(self._path / MARKER_NAME)
        except OSError:
            pass  # removed meanwhile: nothing left to keep alive

    def last_activity(self) -> float:
        """Epoch seconds of the last ``touch`` (or creation)."""
        return os.stat(self._path / MARKER_NAME).st_mtime

    def register_cleanup(self, owner: object) -> None:
        """Also remove the folder when ``owner`` (e.g. a session object) is garbage collected.

        ``owner`` must support weak references (plain dicts do not: TypeError).
        """
        self._owner_finalizers.append(weakref.finalize(owner, _remove_tree, self._path))

    def remove(self) -> None:
        """Delete the folder and everything in it (idempotent)."""
        self._removed = True
        if self._finalizer is not None:
            self._finalizer()
        else:
            _remove_tree(self._path)
        for fin in self._owner_finalizers:
            fin.detach()


def register_cleanup(workspace: Workspace, owner: object) -> None:
    """Remove ``workspace``'s folder when ``owner`` is garbage collected (module-level form)."""
    workspace.register_cleanup(owner)


def cleanup_stale(base: str | os.PathLike | None = None, max_age_s: float = 6 * 3600) -> list[Path]:
    """Remove workspaces under ``default_base(base)`` idle for more than ``max_age_s``; returns what was removed.

    Only folders carrying our marker file are considered; anything else in ``base`` is left alone.
    """
    root = default_base(base)
    if not root.is_dir():
        return []
    now = time.time()
    removed: list[Path] = []
    for child in sorted(root.iterdir()):
        if not _is_workspace(child):
            continue
        try:
            age = now - os.lstat(child / MARKER_NAME).st_mtime
        except OSError:
            continue
        if age > max_age_s:
            _remove_tree(child)
            if not os.path.lexists(child):
                removed.append(child)
    return removed
