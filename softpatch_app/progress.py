"""The core's ``progress(fraction, message)`` callback drawn as one Streamlit progress bar per stage."""

from __future__ import annotations

import time

import streamlit as st

STAGE_TITLES = {
    "loading": "Reading and checking every image",
    "features": "Extracting patch features",
    "discriminator": "Scoring patches for noise",
    "coreset": "Building the memory bank (coreset)",
    "scoring": "Scoring images",
    "maps": "Drawing anomaly maps",
    "metrics": "Computing metrics",
    "threshold": "Setting the threshold from good images",
    "duplicates": "Looking for duplicates",
    "export": "Packing the cleaned folder",
}


class StageProgress:
    """Callable passed as ``progress=`` to the core.

    The message is ``"<stage>: <detail>"``; the first message of each new stage opens a new bar
    under ``container``, so a fit shows features, discriminator and coreset bars one below the other.
    Updates are throttled (the browser does not need 1000 updates per second).
    """

    def __init__(self, container=None, *, min_interval: float = 0.1) -> None:
        self._holder = (container if container is not None else st).empty()
        self.container = self._holder.container()
        self.bars: dict[str, object] = {}
        self.min_interval = min_interval
        self._last: dict[str, float] = {}
        self.stages: list[str] = []

    def __call__(self, fraction: float, message: str) -> None:
        stage, _, detail = str(message).partition(":")
        stage = stage.strip() or "working"
        detail = detail.strip()
        fraction = min(1.0, max(0.0, float(fraction)))
        now = time.monotonic()
        if stage not in self.bars:
            self.stages.append(stage)
            self.bars[stage] = self.container.progress(fraction, text=self._text(stage, detail, fraction))
            self._last[stage] = now
            return
        if fraction < 1.0 and now - self._last.get(stage, 0.0) < self.min_interval:
            return
        self._last[stage] = now
        self.bars[stage].progress(fraction, text=self._text(stage, detail, fraction))

    @staticmethod
    def _text(stage: str, detail: str, fraction: float) -> str:
        title = STAGE_TITLES.get(stage, stage.capitalize())
        return f"{title} — {detail} ({fraction:.0%})" if detail else f"{title} ({fraction:.0%})"

    def finish(self, *, clear: bool = True) -> None:
        """The work is done: remove the bars (default) or mark every bar complete."""
        if clear:
            self._holder.empty()
            return
        for stage, bar in self.bars.items():
            bar.progress(1.0, text=f"{STAGE_TITLES.get(stage, stage.capitalize())} — done")
