"""Path containment: the one place that decides whether a path lies inside a folder.

Every check resolves both sides first (``os.path.realpath``: symlinks, ``..`` and relative parts), so a
symlink or a ``../`` cannot make a path look inside a folder it is not in. Used by folder scans, uploads,
zip extraction, workspaces and the app's server-folder policy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ReadScope", "is_within", "resolve_path", "unreadable_reason"]


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute with ``~`` expanded and every symlink and ``..`` resolved (need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _real(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.realpath(os.path.expanduser(os.fspath(path))))


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, resolved, is ``root`` (resolved) or lies inside it.

    Component-wise, so ``/data2`` is not inside ``/data``; resolving both sides means a symlink inside
    ``root`` that points elsewhere is outside, and a symlinked ``root`` still contains its own files.
    """
    real, root_real = _real(path), _real(root)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def unreadable_reason(what: str, path: str | os.PathLike, error: OSError) -> str:
    """One sentence for an ``OSError`` met opening ``path``, a ``what`` ("folder", "archive"):
    "folder not found: /x", "cannot read archive /y: permission denied"."""
    if isinstance(error, FileNotFoundError):
        return f"{what} not found: {os.fspath(path)}"
    reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
    return f"cannot read {what} {os.fspath(path)}: {reason}"


@dataclass(frozen=True)
class ReadScope:
    """Where a folder read may go: inside one of ``roots`` (``None`` = anywhere), never inside ``excluded``.

    Both are resolved when the scope is made. A scan given a scope refuses a root outside it and skips
    every folder inside ``excluded`` (e.g. the app's work folder, which holds other sessions' uploads).
    """

    roots: tuple[Path, ...] | None = None
    excluded: tuple[Path, ...] = ()

    @classmethod
    def of(cls, roots: Sequence[str | os.PathLike] | None, excluded: Sequence[str | os.PathLike] = ()) -> ReadScope:
        """A scope with every folder resolved now (later symlink changes of a root do not widen it)."""
        return cls(
            None if roots is None else tuple(resolve_path(r) for r in roots),
            tuple(resolve_path(e) for e in excluded),
        )

    def is_excluded(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (resolved) lies in an excluded folder."""
        return any(is_within(path, e) for e in self.excluded)

    def allows(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (resolved) is inside a root and outside every excluded folder."""
        if self.is_excluded(path):
            return False
        return self.roots is None or any(is_within(path, r) for r in self.roots)


def name_clash_reason(target: str | os.PathLike, *, done: str, other: str) -> str:
    """Why a file could not be written at ``target``: a file of that name was already ``done``, or a file and a
    folder share the name (``other``: what the second one was, e.g. "entry", "upload")."""
    if os.path.isfile(target) and not os.path.islink(target):
        return f"duplicate{' entry' if other == 'entry' else ''}: a file of the same name was already {done}"
    return f"name clashes with another {other} (a file and a folder of one name)"
