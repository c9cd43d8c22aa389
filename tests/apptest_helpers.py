"""Small helpers shared by the AppTest suites: find widgets, read the session's state."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

# The app's entry point, for AppTest.from_file.
APP = str(Path(__file__).resolve().parent.parent / "app.py")


def png(seed: int) -> bytes:
    """A small seeded noise PNG (56 x 40), e.g. an upload of a browser folder."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((100 + 30 * rng.random((40, 56, 3))).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


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
