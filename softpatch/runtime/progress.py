"""Progress reporting for long steps: an optional ``(fraction, message)`` callback."""

from __future__ import annotations

from collections.abc import Callable

# fraction: 0..1 done of the current stage; message: "<stage>: <detail>", stage one of
# loading, features, discriminator, coreset, scoring, maps, metrics, threshold, duplicates.
ProgressCallback = Callable[[float, str], None]


def report(progress: ProgressCallback | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)
