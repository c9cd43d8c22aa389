"""Deploy: choose the image threshold, see what it costs in false alarms and misses, download bundle + report."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import streamlit as st

from softpatch.deployment.bundle import save_bundle
from softpatch.deployment.export import export_model
from softpatch.evaluation import metrics
from softpatch_app import plots, services
from softpatch_app.guard import user_errors
from softpatch_app.progress import StageProgress
from softpatch_app.reporting import build_session_report
from softpatch_app.state import SessionData, get_session
from softpatch_app.ui import device_label, need_model, offer_file, show_notices

# The reference inference script for line PCs, offered next to the ONNX model.
INFER_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "softpatch_infer.py"

session: SessionData = get_session()

st.title("Deploy")
show_notices(session)
st.markdown(
    "Pick the **threshold**: images scoring at or above it are called defective on the line. A lower threshold "
    "catches more defects but raises more false alarms. Then download the **model bundle** (with its threshold) "
    "or the **ONNX model** for the line, and a **report** for stakeholders."
)
if not need_model(session):
    st.stop()
model = session.model

detection = None
if session.test is not None:
    records = list(session.test.records)
    detection = services.cached_detection(session, records, True) or services.cached_detection(session, records, False)
    if detection is None:
        st.info("Score the test set first: its scores are what the threshold is chosen on.")
        if st.button(
            f"Score the {len(records)} test images",
            type="primary",
            icon=":material/play_arrow:",
            help="Scores the test set once; the threshold is then chosen on these scores.",
        ):
            bars = StageProgress(st.container())
            with user_errors("score the test set"):
                detection = services.score_test(
                    session, records, labelled=session.test.labelled, progress=bars, compare=True
                )
                bars.finish()
else:
    st.info(
        "No test set is loaded: the threshold comes from the good training images alone (or by hand). Load a "
        "labelled test folder on the Data page to see its false alarms and misses there."
    )

scores = detection.softpatch.image_scores if detection is not None else None
labels = detection.labels if detection is not None else None
if detection is not None:
    with user_errors("check the test images for leakage"):
        leaked = services.leaked_mask(session, detection)
        if leaked.any():  # copies of training images score like good ones: they would flatter every figure
            scores = scores[~leaked]
            labels = labels[~leaked] if labels is not None else None
            st.caption(
                f"{int(leaked.sum())} test images that are also in the training folder are left out of every figure "
                "here (see the Data page)."
            )
has_both = labels is not None and 0 < int(labels.sum()) < len(labels)

methods = ["good", "f1", "percentile", "manual"]
if not has_both:
    methods.remove("f1")
if scores is None:
    methods.remove("percentile")
previous = session.threshold_rule if isinstance(session.threshold_rule, services.ThresholdRule) else None
if previous is None and session.threshold_mode in services.THRESHOLD_METHODS:  # after a refresh: the saved rule
    previous = services.ThresholdRule(
        kind=session.threshold_mode, percentile=session.threshold_pct, value=float(session.threshold or 0.0)
    )
method = st.radio(
    "How to choose the threshold",
    methods,
    # Coming back to this page keeps the rule chosen before (the widget forgets its value between pages).
    index=methods.index(previous.kind) if previous is not None and previous.kind in methods else 0,
    format_func=services.THRESHOLD_METHODS.get,
    horizontal=True,
    key="dp_method",
    help="Good images alone: every training image is scored by a model fitted on the others (no leakage), and "
    "the threshold flags at most the target share of them; needs no labelled defect. Best F1 and percentiles are "
    "fitted on the test images, so their figures there are in-sample. By hand: any value.",
)

rule = services.ThresholdRule(kind=method)
if method == "good":
    g1, g2 = st.columns(2)
    target = g1.number_input(
        "Target false-alarm rate (%)",
        0.0,
        50.0,
        (previous.target_fpr if previous is not None else services.DEFAULT_TARGET_FPR) * 100,
        0.5,
        key="dp_target",
        help="Share of good parts you accept being flagged.",
    )
    top = g2.number_input(
        "Also leave out the most suspicious training images",
        0,
        max(0, len(model.train_names_) - 2),
        min(previous.exclude_top, max(0, len(model.train_names_) - 2)) if previous is not None else 0,
        key="dp_exclude_top",
        help="Images marked defective on the Review page, and copies of defective test images, are always left "
        "out; this leaves out more, by suspicion.",
    )
    rule = services.ThresholdRule(kind="good", target_fpr=target / 100, exclude_top=int(top))
elif method == "percentile":
    pct = st.slider(
        "Percentile of good images' scores",
        80.0,
        100.0,
        previous.percentile if previous is not None else 99.0,
        0.5,
        key="dp_pct",
        help="The threshold is set so that this share of the known-good test images passes.",
    )
    rule = services.ThresholdRule(kind="percentile", percentile=pct)
elif method == "manual":
    lo = float(scores.min()) if scores is not None else 0.0
    hi = float(scores.max()) if scores is not None else 50.0
    start = float(session.threshold) if session.threshold is not None else (lo + hi) / 2
    value = st.number_input(
        "Threshold",
        value=start,
        min_value=0.0,  # image scores are never negative; bundles refuse a negative threshold
        step=max((hi - lo) / 100, 1e-3),
        format="%.4f",
        key="dp_manual",
        help="Images with an anomaly score at or above this are called defective.",
    )
    rule = services.ThresholdRule(kind="manual", value=float(value))

chosen = None
with user_errors("choose the threshold"):
    bars = StageProgress(st.container())
    chosen = services.choose_threshold(session, rule, detection, progress=bars)
    bars.finish()
    session.threshold_mode = method  # restored after a refresh, with the percentile
    if method == "percentile":
        session.threshold_pct = float(rule.percentile)
threshold = session.threshold
if chosen is not None:
    st.markdown(f"Threshold **{chosen.threshold:.4f}** — {chosen.method}.")
    if chosen.good is not None:
        good = chosen.good
        st.caption(
            f"Rests on {good.n_images} training images scored out of sample ({good.folds}-fold); "
            f"{good.n_flagged} of them score at or above it ({good.fpr_estimate:.1%}). With "
            f"{good.confidence:.0%} confidence, the false-alarm rate on new good parts is at most "
            f"{good.fpr_upper_bound:.1%} (exact binomial bound). Left out: {len(good.excluded)} images"
            + (f" ({', '.join(n.rsplit('/', 1)[-1] for n in good.excluded[:8])})" if good.excluded else "")
            + "."
        )
    elif chosen.chosen_on_test:
        st.warning(
            "This threshold was fitted on the test images below, so the rates on them are in-sample and "
            "optimistic. The rule 'From good training images alone' gives figures you can defend.",
            icon=":material/info:",
        )

if threshold is not None and has_both:
    point = metrics.operating_point(labels, scores, threshold, chosen_here=bool(chosen and chosen.chosen_on_test))
    conf = point.confusion
    fpr_lo, fpr_hi = conf.fpr_interval()
    fnr_lo, fnr_hi = conf.fnr_interval()
    c1, c2 = st.columns([1, 1])
    with c1:
        st.plotly_chart(plots.confusion_figure(conf.tp, conf.fp, conf.tn, conf.fn), key="dp_conf")
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
        key="dp_hist",
    )
elif threshold is not None and scores is not None:
    flagged = int((scores >= threshold).sum())
    st.metric("Images flagged", f"{flagged} of {len(scores)}")

# ----------------------------------------------------------------------------------------------- downloads
st.subheader("Downloads")
name = (session.dataset_name or "softpatch").replace(" ", "_")
c1, c_onnx, c2 = st.columns(3)
with c1:
    st.markdown(
        "**Model bundle** — one file with the backbone, the memory bank, the settings and the threshold; "
        "load it with `softpatch.load_bundle` or score with the command line (below)."
    )
    if st.button(
        "Prepare the model bundle",
        icon=":material/inventory_2:",
        key="dp_bundle",
        help="Writes the fitted model and the threshold above into one file, then offers it for download.",
    ):
        with user_errors("save the model bundle"), st.spinner("Writing the bundle…"):
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = session.workspace.subdir("exports") / f"{name}-{stamp}.softpatch"
            save_bundle(model, path, threshold=session.threshold)
            session.bundle_file = str(path)
    bundle_path = session.bundle_file
    if bundle_path:
        offer_file(
            bundle_path,
            "Download bundle ({mb} MB)",
            file_name=bundle_path.rsplit("/", 1)[-1],
            mime="application/octet-stream",
            key="dp_bundle_dl",
            help="The .softpatch file: load it with softpatch.load_bundle or the softpatch CLI.",
        )
    bundle_file = (bundle_path or f"{name}.softpatch").rsplit("/", 1)[-1]
    st.code(" ".join(services.cli_score_command(bundle_file)), language="bash")
    st.caption("Prints each image's score and, with the bundle's threshold, whether it is anomalous.")
with c_onnx:
    st.markdown(
        "**ONNX model** — for the line PC: backbone, memory bank, map and the threshold's decision in one file "
        "that ONNX Runtime or OpenVINO runs without torch; score folders with the inference script next to it."
    )
    if st.button(
        "Prepare the ONNX model",
        icon=":material/memory:",
        key="dp_onnx",
        help="Exports the fitted model with the threshold above to ONNX and checks that it reproduces these scores.",
    ):
        with user_errors("export the ONNX model"), st.spinner("Exporting and checking the ONNX model…"):
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            exported = export_model(
                model, session.workspace.subdir("exports") / f"{name}-{stamp}.onnx", threshold=session.threshold
            )
            session.onnx_export = (str(exported.model_file), exported.summary())
    onnx_export = session.onnx_export
    if onnx_export:
        onnx_path, summary = onnx_export
        if offer_file(
            onnx_path,
            "Download ONNX model ({mb} MB)",
            file_name=onnx_path.rsplit("/", 1)[-1],
            mime="application/octet-stream",
            key="dp_onnx_dl",
            help="Run it with onnxruntime or OpenVINO; its metadata holds the threshold and the resize/crop.",
        ):
            st.caption(summary)
        st.download_button(
            "Download the inference script",
            INFER_SCRIPT.read_bytes(),
            file_name=INFER_SCRIPT.name,
            mime="text/x-python",
            icon=":material/code:",
            key="dp_script_dl",
            help="python softpatch_infer.py MODEL.onnx FOLDER --csv scores.csv: needs numpy, Pillow and onnxruntime.",
        )
with c2:
    st.markdown(
        "**HTML report** — settings, removed-patch examples, the coreset map, heatmaps and metrics in one "
        "file that opens offline in any browser."
    )
    if st.button(
        "Prepare the report",
        icon=":material/summarize:",
        key="dp_report",
        help="Builds one HTML file with the settings, examples, the coreset map, heatmaps and metrics.",
    ):
        bars = StageProgress(st.container())
        with user_errors("build the report"), st.spinner("Building the report (a t-SNE map takes a few seconds)…"):
            html = build_session_report(session, detection, device=device_label(model.config.device), progress=bars)
            session.report_html = html
            bars.finish()
    report = session.report_html
    if report:
        st.download_button(
            f"Download report ({len(report.encode()) / 2**20:.1f} MB)",
            report.encode("utf-8"),
            file_name=f"{name}-softpatch-report.html",
            mime="text/html",
            icon=":material/download:",
            type="primary",
            key="dp_report_dl",
            help="Opens in any browser, also offline.",
        )
