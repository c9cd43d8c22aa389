"""Turning failures into clear messages: no traceback ever reaches the user."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from softpatch.config import ConfigError
from softpatch.errors import SoftPatchError

log = logging.getLogger("softpatch_app")


def message_for(exc: BaseException) -> str:
    """One plain sentence for a user; the traceback goes to the server log only."""
    if isinstance(exc, (SoftPatchError, ConfigError)):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Out of memory: use fewer or smaller images, a smaller crop, or a smaller coreset ratio."
    if isinstance(exc, OSError):
        return f"A file could not be read or written: {exc.strerror or exc}"
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"Something went wrong ({type(exc).__name__}{': ' + text if text else ''}). The app is still usable."


@contextmanager
def user_errors(what: str | None = None, *, container=None) -> Iterator[None]:
    """Run a block; any error becomes an ``st.error`` with a clear message and the script carries on.

    Streamlit's own control flow (``st.rerun``, ``st.stop``, page switches) passes through untouched.
    """
    try:
        yield
    except ScriptControlException:
        raise
    except Exception as exc:
        if not isinstance(exc, (SoftPatchError, ConfigError)):
            log.exception("unexpected error%s", f" while {what}" if what else "")
        prefix = f"Could not {what}: " if what else ""
        (container or st).error(prefix + message_for(exc), icon=":material/error:")
