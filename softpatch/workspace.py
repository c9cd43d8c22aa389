"""Per-session working folders (uploads, extracted archives) with cleanup by age.

Each workspace is a fresh private folder (mode 0o700) under a base folder, holding a marker file
whose modification time is the last activity. ``cleanup_stale`` only ever deletes folders that carry
that marker, so pointing it at a wrong base cannot delete anyone's data.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
import weakref
from pathlib import Path
from typing import Self

from softpatch.errors import DataError
from softpatch.paths import is_within

__all__ = ["ENV_WORK_DIR", "MARKER_NAME", "Workspace", "cleanup_stale", "default_base", "register_cleanup"]

ENV_WORK_DIR = "SOFTPATCH_WORK_DIR"
MARKER_NAME = ".softpatch-workspace"
_PREFIX = "ws-"


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


class Workspace:
    """A private working folder for one browser session; removed by ``remove()``, on garbage collection,
    or at interpreter exit, whichever comes first. Create with ``Workspace.create()``."""

    def __init__(self, path: Path) -> None:
        if not _is_workspace(path):
            raise DataError(f"{path} is not a softpatch workspace folder")
        self._path = path
        self._finalizer = weakref.finalize(self, _remove_tree, path)
        self._owner_finalizers: list[weakref.finalize] = []

    @classmethod
    def create(cls, base: str | os.PathLike | None = None) -> Workspace:
        """A fresh, unique folder (mode 0o700) under ``default_base(base)``."""
        root = _prepare_base(default_base(base))
        try:
            path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=root))  # mkdtemp creates it with mode 0o700
            marker = {"created": time.time(), "pid": os.getpid()}
            (path / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot create a workspace in {root}: {exc.strerror or exc}") from None
        return cls(path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def alive(self) -> bool:
        """False once removed."""
        return self._finalizer.alive and self._path.is_dir()

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
        self._finalizer()
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
