"""The Review page's work: the queue of suspicious images, moving through it, labels, and the cleaned set.

Runs without a Streamlit runtime; the page draws the queue and wires these functions to its buttons.
"""

from __future__ import annotations

import time
from pathlib import Path

from softpatch_app import exports, loading, services
from softpatch_app.state import LABELS, SessionData

# (label, keyboard key, icon, meaning): one button per label, each moving on to the next image.
LABEL_BUTTONS = (
    ("defective", "D", ":material/report:", "This image shows a defect: it should not be in the training set"),
    ("good", "G", ":material/check_circle:", "This image is fine"),
    ("unsure", "U", ":material/help:", "Cannot tell; decide later"),
)


def review_count(vet: services.Vetting, tau: float, remembered: object) -> int:
    """How many of the most suspicious images to walk: ``remembered`` (from the browser or the session)
    clamped to 1..N; without one, the images that lost more than ``tau`` of their patches (at least 10)."""
    n = len(vet.names)
    default = int(min(n, max(10, int((vet.removed_fraction > tau).sum()))))
    try:
        wanted = int(remembered) if remembered is not None and not isinstance(remembered, bool) else default
    except (TypeError, ValueError, OverflowError):
        wanted = default
    return int(min(max(1, wanted), n))


def review_queue(vet: services.Vetting, count: int, labels: dict[str, str], *, only_open: bool) -> list[int]:
    """Image indices to walk, most suspicious first; with ``only_open`` the unlabelled ones (all when none is)."""
    queue = [int(i) for i in vet.ranking[:count]]
    if only_open:
        queue = [i for i in queue if vet.names[i] not in labels] or queue
    return queue


def clamp_position(session: SessionData, queue_length: int) -> int:
    """Keep the session's place in the queue inside it; returns the place."""
    session.review_pos = min(max(0, session.review_pos), max(0, queue_length - 1))
    return session.review_pos


def step(session: SessionData, queue_length: int, by: int) -> None:
    """Move ``by`` images through the queue (stops at either end)."""
    session.review_pos = min(max(0, session.review_pos + by), max(0, queue_length - 1))


def mark(session: SessionData, name: str, label: str, queue_length: int) -> None:
    """Label the training image ``name`` (one of ``LABELS``) and move on to the next image."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    session.labels[name] = label
    if session.review_pos < queue_length - 1:
        session.review_pos += 1


def reviewed_count(vet: services.Vetting, queue: list[int], labels: dict[str, str]) -> int:
    """How many images of the queue have a label."""
    return sum(vet.names[j] in labels for j in queue)


def kept_count(session: SessionData) -> int:
    """How many training images the cleaned set keeps (those not marked defective)."""
    defective = defective_names(session.labels)
    return sum(r.name not in defective for r in session.train.records)


def label_counts(labels: dict[str, str]) -> dict[str, int]:
    return {lab: sum(v == lab for v in labels.values()) for lab in LABELS}


def defective_names(labels: dict[str, str]) -> set[str]:
    return {name for name, lab in labels.items() if lab == "defective"}


def drop_defective_and_refit(session: SessionData, progress=None) -> str:
    """Remove the images marked defective from the training set and fit again; returns what was done."""
    defective = defective_names(session.labels)
    services.fit(session, session.settings, progress=progress, split=loading.without(session.train, defective))
    session.review_pos = 0
    return f"Dropped {len(defective)} images and fitted again on {len(session.train)}."


def prepare_cleaned_zip(session: SessionData, progress=None) -> tuple[str, int]:
    """Pack every training image not marked defective into a .zip in the session's exports; (path, count)."""
    dest = session.workspace.subdir("exports") / f"cleaned-{int(time.time())}.zip"
    path, count = exports.cleaned_zip(list(session.train.records), session.labels, dest, progress)
    session.cleaned_zip = (str(Path(path)), count)
    return session.cleaned_zip
