"""Deploy: choose the image threshold, see what it costs in false alarms and misses, download bundle + report."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import streamlit as st

from softpatch.evaluation import metrics
from softpatch_app import deploy, plots, services
from softpatch_app.exports import download_name
from softpatch_app.guard import user_errors
from softpatch_app.keys import DEPLOY
from softpatch_app.progress import StageProgress
from softpatch_app.report_content import build_session_report
from softpatch_app.state import SessionData, get_session
from softpatch_app.ui import device_label, need_model, offer_file, page_header, score_button

RULE_HELP = (
    "Good images alone: every training image is scored by a model fitted on the others (no leakage), and the "
    "threshold flags at most the target share of them; needs no labelled defect. Best F1 and percentiles are "
    "fitted on the test images, so their figures there are in-sample. By hand: any value."
)
INTRO = (
    "Pick the **threshold**: images scoring at or above it are called defective on the line. A lower threshold "
    "catches more defects but raises more false alarms. Then download the **model bundle** (with its "
    "threshold) or the **ONNX model** for the line, and a **report** for stakeholders."
)


def _test_scores_section(session: SessionData) -> services.Detection | None:
    """The scored test set (scored here on request), or None."""
    if session.test is None:
        st.info(
            "No test set is loaded: the threshold comes from the good training images alone (or by hand). Load a "
            "labelled test folder on the Data page to see its false alarms and misses there."
        )
        return None
    detection = services.scored_test_set(session)
    if detection is not None:
        return detection
    st.info("Score the test set first: its scores are what the threshold is chosen on.")
    records = list(session.test.records)
    return score_button(
        session,
        records,
        labelled=session.test.labelled,
        compare=True,
        label=f"Score the {len(records)} test images",
        help="Scores the test set once; the threshold is then chosen on these scores.",
    )


def _evidence(session: SessionData, detection) -> tuple[np.ndarray | None, np.ndarray | None]:
    """SoftPatch's test scores and labels without the leaked copies of training images (said in a caption)."""
    scores = labels = None
    if detection is None:
        return scores, labels
    with user_errors("check the test images for leakage"):
        bars = StageProgress(st.container())
        scores, labels = services.evidence_on_test(session, detection, "softpatch", progress=bars)
        bars.finish()
        n_leaked = len(detection.names) - len(scores)
        if n_leaked:
            st.caption(
                f"{n_leaked} test images that are also in the training folder are left out of every figure here "
                "(see the Data page)."
            )
    return scores, labels


def _rule_section(session: SessionData, scores, labels) -> services.ThresholdRule:
    """The rule's widgets; returns the rule they describe."""
    model = session.model
    rules = deploy.available_rules(scores, labels)
    previous = deploy.remembered_rule(session)
    kind = st.radio(
        "How to choose the threshold",
        rules,
        # Coming back to this page keeps the rule chosen before (the widget forgets its value between pages).
        index=rules.index(previous.kind) if previous is not None and previous.kind in rules else 0,
        format_func=services.THRESHOLD_RULES.get,
        horizontal=True,
        key=DEPLOY.method,
        help=RULE_HELP,
    )
    if kind == "good":
        most_left_out = max(0, len(model.train_names_) - 2)
        g1, g2 = st.columns(2)
        target = g1.number_input(
            "Target false-alarm rate (%)",
            0.0,
            50.0,
            (previous.target_fpr if previous is not None else services.DEFAULT_TARGET_FPR) * 100,
            0.5,
            key=DEPLOY.target,
            help="Share of good parts you accept being flagged.",
        )
        top = g2.number_input(
            "Also leave out the most suspicious training images",
            0,
            most_left_out,
            min(previous.exclude_top, most_left_out) if previous is not None else 0,
            key=DEPLOY.exclude_top,
            help="Images marked defective on the Review page, and copies of defective test images, are always "
            "left out; this leaves out more, by suspicion.",
        )
        return services.ThresholdRule(kind="good", target_fpr=target / 100, exclude_top=int(top))
    if kind == "percentile":
        pct = st.slider(
            "Percentile of good images' scores",
            80.0,
            100.0,
            previous.percentile if previous is not None else 99.0,
            0.5,
            key=DEPLOY.percentile,
            help="The threshold is set so that this share of the known-good test images passes.",
        )
        return services.ThresholdRule(kind="percentile", percentile=pct)
    if kind == "manual":
        lo = float(scores.min()) if scores is not None else 0.0
        hi = float(scores.max()) if scores is not None else 50.0
        value = st.number_input(
            "Threshold",
            value=float(session.threshold) if session.threshold is not None else (lo + hi) / 2,
            min_value=0.0,  # image scores are never negative; bundles refuse a negative threshold
            step=max((hi - lo) / 100, 1e-3),
            format="%.4f",
            key=DEPLOY.manual,
            help="Images with an anomaly score at or above this are called defective.",
        )
        return services.ThresholdRule(kind="manual", value=float(value))
    return services.ThresholdRule(kind=kind)


def _threshold_section(session: SessionData, rule, detection) -> services.ChosenThreshold | None:
    chosen = None
    with user_errors("choose the threshold"):
        bars = StageProgress(st.container())
        chosen = deploy.apply_rule(session, rule, detection, progress=bars)
        bars.finish()
    if chosen is None:
        return None
    st.markdown(f"Threshold **{chosen.threshold:.4f}** — {chosen.method}.")
    if chosen.good is not None:
        st.caption(deploy.describe_good_threshold(chosen.good))
    elif chosen.chosen_on_test:
        st.warning(
            "This threshold was fitted on the test images below, so the rates on them are in-sample and "
            "optimistic. The rule 'From good training images alone' gives figures you can defend.",
            icon=":material/info:",
        )
    return chosen


def _costs_section(session: SessionData, chosen, scores, labels) -> None:
    threshold = session.threshold
    if threshold is None or scores is None:
        return
    if not services.has_both_classes(labels):
        st.metric("Images flagged", f"{int((scores >= threshold).sum())} of {len(scores)}")
        return
    point = metrics.operating_point(labels, scores, threshold, chosen_here=bool(chosen and chosen.chosen_on_test))
    conf = point.confusion
    fpr_lo, fpr_hi = conf.fpr_interval()
    fnr_lo, fnr_hi = conf.fnr_interval()
    c1, c2 = st.columns([1, 1])
    with c1:
        st.plotly_chart(plots.confusion_figure(conf.tp, conf.fp, conf.tn, conf.fn), key=DEPLOY.confusion)
    with c2:
        m1, m2 = st.columns(2)
        m1.metric(
            "False-alarm rate",
            f"{conf.fpr:.1%}",
            help=f"Good images flagged defective. 95% interval {fpr_lo:.1%} to {fpr_hi:.1%} (exact).",
        )
        m2.metric(
            "Miss rate",
            f"{conf.fnr:.1%}",
            help=f"Defective images that pass. 95% interval {fnr_lo:.1%} to {fnr_hi:.1%} (exact).",
        )
        m1.metric("Precision", f"{conf.precision:.1%}", help="Of the flagged images, the share truly defective.")
        m2.metric("Recall", f"{conf.recall:.1%}", help="Of the defective images, the share flagged.")
        st.caption(
            f"On {len(labels)} labelled test images: {conf.fp} false alarms (95% interval {fpr_lo:.1%}–{fpr_hi:.1%}) "
            f"and {conf.fn} missed defects (95% interval {fnr_lo:.1%}–{fnr_hi:.1%})"
            + (" — in-sample: these images chose the threshold." if point.chosen_here else ".")
        )
    st.plotly_chart(
        plots.score_histogram(scores, labels, threshold=threshold, title="SoftPatch scores on the test set"),
        key=DEPLOY.histogram,
    )


def _prepare(label: str, *, key: str, icon: str, help: str, what: str, spinner: str, action: Callable[[], object]):
    """A button that prepares a download (a clear error if that fails)."""
    if st.button(label, icon=icon, key=key, help=help):
        with user_errors(what), st.spinner(spinner):
            action()


def _bundle_column(session: SessionData) -> None:
    st.markdown(
        "**Model bundle** — one file with the backbone, the memory bank, the settings and the threshold; "
        "load it with `softpatch.load_bundle` or score with the command line (below)."
    )
    _prepare(
        "Prepare the model bundle",
        key=DEPLOY.bundle,
        icon=":material/inventory_2:",
        help="Writes the fitted model and the threshold above into one file, then offers it for download.",
        what="save the model bundle",
        spinner="Writing the bundle…",
        action=lambda: deploy.prepare_bundle(session),
    )
    if session.bundle_file:
        offer_file(
            session.bundle_file,
            "Download bundle ({mb} MB)",
            file_name=session.bundle_file.rsplit("/", 1)[-1],
            mime="application/octet-stream",
            key=DEPLOY.bundle_download,
            help="The .softpatch file: load it with softpatch.load_bundle or the softpatch CLI.",
        )
    st.code(" ".join(services.cli_score_command(deploy.bundle_file_name(session))), language="bash")
    st.caption("Prints each image's score and, with the bundle's threshold, whether it is anomalous.")


def _onnx_column(session: SessionData) -> None:
    st.markdown(
        "**ONNX model** — for the line PC: backbone, memory bank, map and the threshold's decision in one file "
        "that ONNX Runtime or OpenVINO runs without torch; score folders with the inference script next to it."
    )
    _prepare(
        "Prepare the ONNX model",
        key=DEPLOY.onnx,
        icon=":material/memory:",
        help="Exports the fitted model with the threshold above to ONNX and checks that it reproduces these scores.",
        what="export the ONNX model",
        spinner="Exporting and checking the ONNX model…",
        action=lambda: deploy.prepare_onnx(session),
    )
    if not session.onnx_export:
        return
    onnx_path, summary = session.onnx_export
    if offer_file(
        onnx_path,
        "Download ONNX model ({mb} MB)",
        file_name=onnx_path.rsplit("/", 1)[-1],
        mime="application/octet-stream",
        key=DEPLOY.onnx_download,
        help="Run it with onnxruntime or OpenVINO; its metadata holds the threshold and the resize/crop.",
    ):
        st.caption(summary)
    st.download_button(
        "Download the inference script",
        deploy.INFER_SCRIPT.read_bytes(),
        file_name=deploy.INFER_SCRIPT.name,
        mime="text/x-python",
        icon=":material/code:",
        key=DEPLOY.script_download,
        help="python softpatch_infer.py MODEL.onnx FOLDER --csv scores.csv: needs numpy, Pillow and onnxruntime.",
    )


def _report_column(session: SessionData, detection) -> None:
    st.markdown(
        "**HTML report** — settings, removed-patch examples, the coreset map, heatmaps and metrics in one "
        "file that opens offline in any browser."
    )
    if st.button(
        "Prepare the report",
        icon=":material/summarize:",
        key=DEPLOY.report,
        help="Builds one HTML file with the settings, examples, the coreset map, heatmaps and metrics.",
    ):
        bars = StageProgress(st.container())
        with user_errors("build the report"), st.spinner("Building the report (a t-SNE map takes a few seconds)…"):
            device = device_label(session.model.config.device)
            session.report_html = build_session_report(session, detection, device=device, progress=bars)
            bars.finish()
    if session.report_html:
        data = session.report_html.encode("utf-8")
        st.download_button(
            f"Download report ({len(data) / 2**20:.1f} MB)",
            data,
            file_name=download_name(session.dataset_name, "softpatch-report.html"),
            mime="text/html",
            icon=":material/download:",
            type="primary",
            key=DEPLOY.report_download,
            help="Opens in any browser, also offline.",
        )


def _downloads_section(session: SessionData, detection) -> None:
    st.subheader("Downloads")
    c1, c_onnx, c2 = st.columns(3)
    with c1:
        _bundle_column(session)
    with c_onnx:
        _onnx_column(session)
    with c2:
        _report_column(session, detection)


def main() -> None:
    session = get_session()
    page_header(session, "Deploy", INTRO)
    if not need_model(session):
        return
    detection = _test_scores_section(session)
    scores, labels = _evidence(session, detection)
    rule = _rule_section(session, scores, labels)
    chosen = _threshold_section(session, rule, detection)
    _costs_section(session, chosen, scores, labels)
    _downloads_section(session, detection)


main()
