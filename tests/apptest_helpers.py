"""Small helpers shared by the AppTest suites: find widgets, read the session's state."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def session(at: AppTest):
    """The app's per-session state object."""
    from softpatch_app.state import KEY

    return at.session_state[KEY]


def button(at: AppTest, label: str):
    """The first button whose label starts with ``label``."""
    for b in at.button:
        if b.label.startswith(label):
            return b
    raise AssertionError(f"no button {label!r}: {[b.label for b in at.button]}")
