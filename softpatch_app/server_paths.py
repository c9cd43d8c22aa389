"""Which folders and files on the server a browser session may open by typing a path.

The policy (see SECURITY.md):

- ``SOFTPATCH_SERVER_ROOTS`` set: paths must resolve inside one of those folders, whatever address the
  app listens on.
- Not set, and the app listens on a loopback address only (``server.address`` 127.0.0.1, ::1 or
  localhost; ``./scripts/app.sh`` passes 127.0.0.1 unless told otherwise): the default roots, i.e. the
  user's home folder, the app's own folder and the ``shared`` folder beside it (the README walk-through's
  ``../shared/data``). A default root that is a filesystem root ("/" as a service account's home) is dropped.
- Not set, and the app listens on any other address (or on every one: ``server.address`` unset): server
  paths are off; the page says why and how to turn them on.

Under every setting the work folder (``SOFTPATCH_WORK_DIR``), which holds every session's uploads, is
never readable through a server path, even when a root contains it; every path is resolved (``~``,
``..``, symlinks) before it is checked; hidden folders and files below a root (``~/.ssh``) are refused;
and a path outside the roots is refused before anything about it (whether it exists, what it holds) is
looked at, so refusals reveal nothing about the rest of the machine.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from softpatch.errors import DataError
from softpatch.io.datasets import is_hidden_name
from softpatch.io.paths import ReadScope, is_within, resolve_path

__all__ = ["APP_ROOT", "ServerPaths", "default_roots", "is_loopback", "server_path_policy"]

APP_ROOT = Path(__file__).resolve().parent.parent
ENV_ROOTS = "SOFTPATCH_SERVER_ROOTS"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(address: str | None) -> bool:
    """Whether a Streamlit ``server.address`` accepts connections from this machine only.

    Unset or empty means every interface (Streamlit's default), so it is not loopback; neither is a
    name other than localhost's, since it may resolve to a public interface.
    """
    text = (address or "").strip().strip("[]")
    if not text:
        return False
    if text.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def default_roots(app_root: Path = APP_ROOT, home: Path | None = None) -> tuple[Path, ...]:
    """The roots used on localhost when ``SOFTPATCH_SERVER_ROOTS`` is not set (resolved, no duplicates).

    The user's home folder, the app's folder and ``<app>/../shared`` (the data folder beside the app that
    the README's walk-through reads). A filesystem root is never a default root.
    """
    if home is None:
        try:
            home = Path.home()
        except (RuntimeError, KeyError):  # no home folder known for this account
            home = None
    candidates = [p for p in (home, app_root, app_root.parent / "shared") if p is not None]
    roots: list[Path] = []
    for candidate in candidates:
        path = resolve_path(candidate)
        if path != Path(path.anchor) and path not in roots:
            roots.append(path)
    return tuple(roots)


@dataclass(frozen=True)
class ServerPaths:
    """The server-path policy of one app process: where typed paths may point, and why not when they may not.

    ``roots`` are resolved; empty means server paths are off and ``off_reason`` says why. ``workdir`` (resolved)
    is never readable. ``origin`` says where the roots came from, for messages.
    """

    roots: tuple[Path, ...]
    workdir: Path
    origin: str = ""
    off_reason: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.roots)

    @property
    def scope(self) -> ReadScope:
        """What folder scans started from a server path may reach: the roots, minus the work folder."""
        return ReadScope(self.roots, (self.workdir,))

    def describe(self) -> str:
        """ "/home/qa, /srv/data (SOFTPATCH_SERVER_ROOTS)": the allowed folders, for messages and the page."""
        return ", ".join(str(r) for r in self.roots) + (f" ({self.origin})" if self.origin else "")

    def check(self, raw: str) -> Path:
        """The typed path resolved and checked against the policy (it need not exist); ``DataError`` otherwise.

        Messages name the path as typed, never what a symlink points to.
        """
        text = (raw or "").strip().strip('"').strip("'").strip()
        if not text:
            raise DataError("type the path of a folder or file on the server first")
        if not self.enabled:
            raise DataError(self.off_reason)
        if "\x00" in text:
            raise DataError(f"{_shown(text)} is not a valid path")
        try:
            path = resolve_path(text)
        except OSError as exc:  # e.g. a name too long for the file system
            raise DataError(f"{_shown(text)} is not a usable path ({exc.strerror or exc})") from None
        text = _shown(text)
        if is_within(path, self.workdir):
            raise DataError(
                f"{text} is inside the app's work folder, which holds the sessions' uploads; it cannot be opened "
                "as a server path (upload the files instead)"
            )
        containing = [r for r in self.roots if is_within(path, r)]
        if not containing:
            raise DataError(f"{text} is outside the folders this server allows: {self.describe()}")
        # Hidden parts count below the innermost root only: a root may itself lie in a hidden folder.
        root = max(containing, key=lambda r: len(r.parts))
        if any(is_hidden_name(part) for part in path.relative_to(root).parts):
            raise DataError(f"{text} is a hidden or system file or folder; it cannot be opened as a server path")
        return path

    def folder(self, raw: str) -> Path:
        """A typed folder path, checked: allowed (``check``), exists, is a folder. Returns the resolved path."""
        path = self.check(raw)
        shown = _shown(raw.strip())
        if not _exists(path, os.path.exists):
            raise DataError(f"folder not found on the server: {shown}")
        if not _exists(path, os.path.isdir):
            raise DataError(f"{shown} is a file, not a folder; give the folder that contains the images")
        return path

    def file(self, raw: str) -> Path:
        """A typed file path, checked: allowed (``check``, so a symlink out of a root is refused), a regular file."""
        path = self.check(raw)
        if not _exists(path, os.path.isfile):
            raise DataError(f"file not found on the server: {_shown(raw.strip())}")
        return path


def _shown(text: str, limit: int = 200) -> str:
    """A typed path for a message: as typed, control characters as "?", shortened when very long (a message
    stays one readable line)."""
    text = "".join(ch if ch >= " " and ch != "\x7f" else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exists(path: Path, test) -> bool:
    """``test(path)`` (os.path.exists/isdir/isfile), False where the system refuses the name (too long, ...)."""
    try:
        return bool(test(path))
    except (OSError, ValueError):
        return False


def _off_reason(address: str | None) -> str:
    where = f"address {address}" if (address or "").strip() else "every network address (server.address is not set)"
    return (
        f"Server folders are off: this app listens on {where}, so anyone who can open it could read this "
        f"machine's files. Upload a folder or a .zip instead; or whoever runs the app sets {ENV_ROOTS} to the "
        "folders to share, or starts it on this machine only (./scripts/app.sh listens on 127.0.0.1 by default)."
    )


def server_path_policy(
    configured: tuple[Path, ...], workdir: str | os.PathLike, address: str | None, *, app_root: Path = APP_ROOT
) -> ServerPaths:
    """The policy for roots from ``SOFTPATCH_SERVER_ROOTS`` (``configured``; empty = not set), the work folder
    and the ``server.address`` the app listens on (``st.get_option("server.address")``)."""
    work = resolve_path(workdir)
    if configured:
        roots = tuple(dict.fromkeys(resolve_path(r) for r in configured))
        return ServerPaths(roots, work, origin=ENV_ROOTS)
    if is_loopback(address):
        return ServerPaths(default_roots(app_root), work, origin="default folders on localhost")
    return ServerPaths((), work, off_reason=_off_reason(address))
