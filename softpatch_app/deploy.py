"""The Deploy page's work: the threshold rules that apply, the rule remembered, the files prepared for download.

Runs without a Streamlit runtime; the page gathers the rule's widget values and draws the outcome.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from softpatch.deployment.bundle import save_bundle
from softpatch.deployment.export import export_model
from softpatch_app import services
from softpatch_app.exports import download_name
from softpatch_app.state import SessionData

# The reference inference script for line PCs, offered next to the ONNX model.
INFER_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "softpatch_infer.py"
RULE_ORDER = ("good", "f1", "percentile", "manual")


def available_rules(scores: np.ndarray | None, labels: np.ndarray | None) -> list[str]:
    """The threshold rules (keys of ``services.THRESHOLD_RULES``) that the test evidence allows: best F1
    needs good and defective labels, a percentile needs scores."""
    has_both = services.has_both_classes(labels)
    return [
        kind
        for kind in RULE_ORDER
        if not (kind == "f1" and not has_both) and not (kind == "percentile" and scores is None)
    ]


def remembered_rule(session: SessionData) -> services.ThresholdRule | None:
    """The rule chosen before (kept when the user comes back to the page, restored after a refresh)."""
    if isinstance(session.threshold_rule, services.ThresholdRule):
        return session.threshold_rule
    if session.threshold_mode in services.THRESHOLD_RULES:
        return services.ThresholdRule(
            kind=session.threshold_mode, percentile=session.threshold_pct, value=float(session.threshold or 0.0)
        )
    return None


def apply_rule(
    session: SessionData, rule: services.ThresholdRule, detection=None, progress=None
) -> services.ChosenThreshold:
    """Make ``rule``'s threshold the session's and remember the rule for after a refresh."""
    chosen = services.choose_threshold(session, rule, detection, progress=progress)
    session.threshold_mode = rule.kind
    if rule.kind == "percentile":
        session.threshold_pct = float(rule.percentile)
    return chosen


def describe_good_threshold(good) -> str:
    """What a threshold from good images alone (``GoodImageThreshold``) rests on, in one caption."""
    return (
        f"Rests on {good.n_images} training images scored out of sample ({good.folds}-fold); "
        f"{good.n_flagged} of them score at or above it ({good.fpr_estimate:.1%}). With "
        f"{good.confidence:.0%} confidence, the false-alarm rate on new good parts is at most "
        f"{good.fpr_upper_bound:.1%} (exact binomial bound). Left out: {len(good.excluded)} images"
        + (f" ({', '.join(n.rsplit('/', 1)[-1] for n in good.excluded[:8])})" if good.excluded else "")
        + "."
    )


def _export_path(session: SessionData, extension: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return session.workspace.subdir("exports") / download_name(session.dataset_name, f"{stamp}.{extension}")


def bundle_file_name(session: SessionData) -> str:
    """The bundle's file name for the command line shown: the prepared one's, else the dataset's."""
    if session.bundle_file:
        return Path(session.bundle_file).name
    return f"{session.dataset_name or 'softpatch'}.softpatch".replace(" ", "_")


def prepare_bundle(session: SessionData) -> str:
    """Write the fitted model and the session's threshold into one .softpatch file; its path."""
    path = _export_path(session, "softpatch")
    save_bundle(session.model, path, threshold=session.threshold)
    session.bundle_file = str(path)
    return session.bundle_file


def prepare_onnx(session: SessionData) -> tuple[str, str]:
    """Export the fitted model with the session's threshold to ONNX (checked against these scores);
    (model file, summary)."""
    exported = export_model(session.model, _export_path(session, "onnx"), threshold=session.threshold)
    session.onnx_export = (str(exported.model_file), exported.summary())
    return session.onnx_export
