"""AppTest walk through every page on the demo data: fit, move tau, change k, open a large view, label, export,
drop-and-refit, coreset map, detect (SoftPatch vs PatchCore), threshold, bundle and report.

Uses the real mobilenetv1 ImageNet weights from ../shared/weights at a small image size (128/112) so that the
whole module runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.apptest_helpers import button, session
from tests.conftest import MOBILENET_WEIGHTS

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
WEIGHTS = MOBILENET_WEIGHTS

ENV = {
    "SOFTPATCH_BACKBONE": "mobilenetv1_100",
    "SOFTPATCH_WEIGHTS": str(WEIGHTS),
    "SOFTPATCH_BACKBONE_KWARGS": '{"bn_eps": 0.001, "pad_type": "same"}',
    "SOFTPATCH_RESIZE": "128",
    "SOFTPATCH_CROP": "112",
    "SOFTPATCH_DEVICE": "cpu",
}


@pytest.fixture(scope="module")
def at(tmp_path_factory):
    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS} (expected ../shared/weights next to the repository)")
    saved = {k: os.environ.get(k) for k in [*ENV, "SOFTPATCH_WORK_DIR"]}
    os.environ.update(ENV, SOFTPATCH_WORK_DIR=str(tmp_path_factory.mktemp("work")))
    try:
        yield AppTest.from_file(APP, default_timeout=180).run()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clean(at: AppTest) -> None:
    """No traceback and no error message on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}: {[m.label for m in at.metric]}")


def test_first_launch_has_the_demo_loaded(at: AppTest) -> None:
    clean(at)
    assert metric(at, "Train images") == "34"
    assert metric(at, "Test images") == "20"
    assert metric(at, "Defective / with mask") == "12 / 12"
    side = " ".join(m.value for m in at.sidebar.markdown)
    assert "**Device:** CPU" in side
    assert "mobilenetv1_100" in side and "local file" in side
    assert "softpatch demo" in side
    assert any("hides **4 defective parts**" in i.value for i in at.info)


def test_pages_before_fitting_say_what_to_do(at: AppTest) -> None:
    for page in ("pages/3_review.py", "pages/4_coreset.py", "pages/5_detect.py", "pages/6_deploy.py"):
        at.switch_page(page).run()
        clean(at)
        assert any("Fit SoftPatch first" in i.value for i in at.info), page


def test_fit_finds_the_planted_defects(at: AppTest) -> None:
    at.switch_page("pages/2_denoise.py").run()
    clean(at)
    button(at, "Fit SoftPatch on 34 training images").click().run()
    clean(at)
    assert any("4 of the 4 planted defective images" in s.value for s in at.success)
    assert any(s.value.startswith("Fitted in") for s in at.success)
    assert len(at.get("plotly_chart")) >= 1


def test_denoise_page_states_its_assumption_and_offers_the_better_setting(
    at: AppTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softpatch.method import contamination

    # The demo hides 4 defective parts among 34 images: the page shows the estimate and what auto chose.
    assert session(at).model.config.discriminator == "auto", "auto is the default"
    assert any("Estimated share of suspect images" in c.value and "Auto uses lof" in c.value for c in at.caption)
    assert not any("look defective" in w.value for w in at.warning), "auto is never a weak spot"
    # The paper's LOF k=6 with a weak spot that applies here: a warning and its one-click fix, which applies.
    spot = contamination.WeakSpot("lof", 0.0, "this is a test.", {"discriminator": "auto"}, "Use auto", 8)
    monkeypatch.setattr(contamination, "WEAK_SPOTS", (spot,))
    at.selectbox(key="dn_disc").set_value("lof").run()
    clean(at)
    assert any("look defective" in w.value and "this is a test." in w.value for w in at.warning)
    model = session(at).model
    assert model.config.discriminator == "lof"
    button(at, "Use auto").click().run()
    clean(at)
    assert at.session_state["dn_disc"] == "auto"
    assert session(at).model is model and model.config.discriminator == "auto", "re-tuned, not refitted"
    assert not any("look defective" in w.value for w in at.warning)


def test_moving_tau_changes_the_removed_count_without_refitting(at: AppTest) -> None:
    model = session(at).model
    before = metric(at, "Patches removed")
    at.slider(key="dn_tau").set_value(0.05).run()
    clean(at)
    after = metric(at, "Patches removed")
    assert before != after
    assert int(after.replace(",", "")) < int(before.replace(",", ""))
    assert session(at).model is model, "tau re-tunes the fitted model, it does not refit"
    assert model.config.tau == pytest.approx(0.05)
    at.slider(key="dn_k").set_value(10).run()
    clean(at)
    assert session(at).model is model and model.config.lof_k == 10


def test_large_view_opens(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Open").click().run()
    clean(at)
    assert any(m.value.startswith("**#1 ·") for m in at.markdown)


def test_label_export_and_drop_refit(at: AppTest) -> None:
    at.switch_page("pages/3_review.py").run()
    clean(at)
    button(at, "Defective").click().run()
    clean(at)
    assert metric(at, "Defective") == "1"
    labels = dict(session(at).labels)
    assert list(labels.values()) == ["defective"]
    first = next(iter(labels))
    assert any(b.label == "Labels (CSV)" for b in at.get("download_button"))

    button(at, "Good").click().run()
    assert metric(at, "Good") == "1"
    button(at, "Prepare the cleaned folder").click().run()
    clean(at)
    path, count = session(at).cleaned_zip
    assert count == 33
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert len(names) == 33 and first not in names
    assert any(b.label.startswith("Download cleaned folder (33 images") for b in at.get("download_button"))

    from softpatch_app import exports

    csv_text = exports.cleaned_list_csv(session(at).train.records, session(at).labels)
    assert first not in csv_text and csv_text.count("\n") == 34  # header + 33

    button(at, "Drop the 1 images marked defective and refit").click().run()
    clean(at)
    assert len(session(at).train) == 33
    assert session(at).model_is_current
    assert any("Dropped 1 images" in s.value for s in at.success)
    # The app stays on the model's settings after the refit.
    assert session(at).model.config.tau == pytest.approx(0.05)


def test_coreset_map(at: AppTest) -> None:
    at.switch_page("pages/4_coreset.py").run()
    clean(at)
    assert int(metric(at, "Patches in the memory bank").replace(",", "")) > 0
    assert int(metric(at, "Patches removed as noise").replace(",", "")) > 0
    assert len(at.get("plotly_chart")) == 1
    at.radio(key="cs_colour").set_value("weight").run()
    clean(at)
    at.radio(key="cs_method").set_value("UMAP").run()
    clean(at)


def test_detect_compares_softpatch_and_patchcore(at: AppTest) -> None:
    at.switch_page("pages/5_detect.py").run()
    clean(at)
    button(at, "Score 20 images").click().run()
    clean(at)
    table = at.dataframe[0].value
    assert list(table.columns) == ["SoftPatch", "PatchCore"]
    assert set(table.index) == {"image AUROC", "pixel AUROC", "AUPRO"}
    auroc = float(table.loc["image AUROC", "SoftPatch"])
    assert 0.5 < auroc <= 1.0
    assert len(at.get("plotly_chart")) >= 2  # ROC + histograms
    at.slider(key="dt_alpha").set_value(0.9).run()
    clean(at)


def test_deploy_threshold_bundle_and_report(at: AppTest) -> None:
    at.switch_page("pages/6_deploy.py").run()
    clean(at)
    assert metric(at, "False-alarm rate").endswith("%")
    f1_threshold = session(at).threshold
    at.radio(key="dp_method").set_value("percentile").run()
    clean(at)
    assert session(at).threshold != f1_threshold
    at.radio(key="dp_method").set_value("manual").run()
    at.number_input(key="dp_manual").set_value(5.0).run()
    clean(at)
    assert session(at).threshold == pytest.approx(5.0)
    assert metric(at, "False-alarm rate") == "100.0%"  # every good image scores above 5

    button(at, "Prepare the model bundle").click().run()
    clean(at)
    import json

    from safetensors import safe_open

    bundle = Path(session(at).bundle_file)
    assert bundle.is_file() and session(at).workspace.path in bundle.parents
    with safe_open(str(bundle), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "softpatch-bundle"
    assert json.loads(meta["threshold"]) == pytest.approx(5.0)
    assert json.loads(meta["config"])["tau"] == pytest.approx(0.05)
    try:
        from softpatch import load_bundle

        loaded = load_bundle(bundle, device="cpu")
    except AttributeError as exc:  # pragma: no cover - a core bug reported to the lead
        pytest.xfail(f"load_bundle cannot read the bundle yet: {exc}")
    assert loaded.threshold_ == pytest.approx(5.0)


def test_deploy_offers_the_onnx_model_with_its_threshold(at: AppTest) -> None:
    at.switch_page("pages/6_deploy.py").run()
    button(at, "Prepare the ONNX model").click().run()
    clean(at)
    path, summary = session(at).onnx_export
    onnx_file = Path(path)
    assert onnx_file.is_file() and session(at).workspace.path in onnx_file.parents
    assert "memory bank" in summary and "backbone" in summary
    from softpatch.deployment.export import read_export_metadata

    meta = read_export_metadata(onnx_file)
    assert float(meta["threshold"]) == pytest.approx(session(at).threshold)
    assert (meta["resize"], meta["crop"]) == ("128", "112")
    labels = [b.label for b in at.get("download_button")]
    assert any(label.startswith("Download ONNX model") for label in labels)
    assert "Download the inference script" in labels


def test_report(at: AppTest) -> None:
    at.switch_page("pages/6_deploy.py").run()
    button(at, "Prepare the report").click().run()
    clean(at)
    html = session(at).report_html
    assert html.startswith("<!DOCTYPE html>")
    assert "SoftPatch vetting report" in html and "data:image/jpeg;base64," in html
    assert "Detection quality" in html and "Memory bank and removed patches" in html
    import re

    assert not re.search(r"<script[^>]+src=", html), "the report must work offline: no external scripts"
    assert not re.search(r"""<(img|link)[^>]+(src|href)=["']https?:""", html), "no external images or styles"
    assert html.count("Plotly.newPlot") >= 3
    assert any(b.label.startswith("Download report") for b in at.get("download_button"))


def test_labels_csv_content(at: AppTest) -> None:
    from softpatch_app import exports

    rows = [{"rank": 1, "image": "a.png", "path": "/x/a.png", "suspicion": 2.0, "removed_share": 0.1, "label": "good"}]
    text = exports.labels_csv(rows)
    assert text.splitlines()[0] == "rank,image,path,suspicion,removed_share,label"
    assert list(io.StringIO(text))[1].strip() == "1,a.png,/x/a.png,2.0,0.1,good"


def test_one_threshold_everywhere(at: AppTest, capsys: pytest.CaptureFixture) -> None:
    """Deploy's threshold from good images alone is the one Detect, the bundle, the CLI and the report use."""
    import json
    import shlex

    from safetensors import safe_open

    from softpatch.cli import main

    at.switch_page("pages/6_deploy.py").run()
    at.radio(key="dp_method").set_value("good").run()
    clean(at)
    threshold = session(at).threshold
    assert "good training images alone" in session(at).threshold_method
    assert "at most" in session(at).threshold_method  # the false-alarm bound is part of the method

    at.switch_page("pages/5_detect.py").run()
    clean(at)
    assert metric(at, "Threshold") == f"{threshold:.4f}"
    assert any("PatchCore has its own threshold" in c.value and "same rule" in c.value for c in at.caption)

    at.switch_page("pages/6_deploy.py").run()
    button(at, "Prepare the model bundle").click().run()
    clean(at)
    bundle = session(at).bundle_file
    with safe_open(bundle, "pt") as f:
        assert json.loads(f.metadata()["threshold"]) == pytest.approx(threshold)
    command = shlex.split(at.code[-1].value)
    assert command[0] == "softpatch" and command[2] == Path(bundle).name  # the file the button offers
    image = str(session(at).test.records[0].path)
    argv = [bundle if a == command[2] else image if a == "IMAGES_OR_FOLDER" else a for a in command[1:]]
    capsys.readouterr()
    assert main(["--quiet", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(threshold)

    button(at, "Prepare the report").click().run()
    clean(at)
    assert f"{threshold:.4f}" in session(at).report_html
    assert "PatchCore&#x27;s own threshold (same rule)" in session(at).report_html or (
        "PatchCore's own threshold (same rule)" in session(at).report_html
    )


def test_deploy_keeps_the_chosen_rule_across_pages(at: AppTest) -> None:
    at.switch_page("pages/6_deploy.py").run()
    at.radio(key="dp_method").set_value("manual").run()
    at.number_input(key="dp_manual").set_value(7.25).run()
    clean(at)
    at.switch_page("pages/5_detect.py").run()
    assert metric(at, "Threshold") == "7.2500"
    at.switch_page("pages/6_deploy.py").run()  # back: the hand-set value stays the session's threshold
    clean(at)
    assert at.radio(key="dp_method").value == "manual"
    assert session(at).threshold == pytest.approx(7.25)
