"""AppTest on a noisy real category: battery_weld's training folder plus defective test images copied into it,
the category's test split as the test folder. Leakage is named on the Data page, left out of Detect's metrics
by default, and the threshold from good images alone is the one Detect and Deploy use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.apptest_helpers import button, session

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
BATTERY = REPO.parent / "shared" / "data" / "battery_weld"
COPIED = ["1-+_row0_0.png", "1--_row0_2.png", "2-l1_row0_133.png"]


@pytest.fixture
def noisy_category(app_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not BATTERY.is_dir():
        pytest.skip(f"real data not found at {BATTERY}")
    # AppTest listens on no address, so server folders are off unless roots are configured.
    monkeypatch.setenv("SOFTPATCH_SERVER_ROOTS", os.pathsep.join([str(app_env), str(BATTERY)]))
    train = app_env / "noisy_train"
    shutil.copytree(BATTERY / "train" / "good", train)
    for name in COPIED:
        shutil.copy(BATTERY / "test" / "defective" / name, train / f"copied_{name}")
    return train


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_leakage_is_named_left_out_and_the_threshold_agrees(noisy_category: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.radio(key="load_train_method").set_value("server folder").run()
    at.text_input(key="load_train_path").set_value(str(noisy_category)).run()
    button(at, "Load this training folder").click().run()
    at.radio(key="load_test_method").set_value("server folder").run()
    at.text_input(key="load_test_path").set_value(str(BATTERY)).run()
    button(at, "Load this test folder").click().run()
    _clean(at)
    s = session(at)
    assert len(s.train) == 37 + len(COPIED) and len(s.test) == 128

    # Data: the copies are named (battery_weld's own split also repeats 7 training images in test/good).
    warning = next(w.value for w in at.warning if w.value.startswith("**Leakage:"))
    assert all(name in warning for name in COPIED)
    from softpatch_app import services

    found = services.duplicates(s)
    leaked_names = {Path(p).name for p in found.leaked_test}
    assert set(COPIED) <= leaked_names
    assert any(len(g.train) == 2 for g in found.within_train)  # 6-+2.png and 6-+3.png are the same image

    at.switch_page("pages/2_denoise.py").run()
    button(at, "Fit SoftPatch on").click().run()
    _clean(at)
    at.switch_page("pages/5_detect.py").run()
    button(at, "Score 128 images").click().run()
    _clean(at)
    n_leaked = len(found.leaked_test)
    assert at.toggle(key="dt_leak").value is True
    assert any(f"Metrics on {128 - n_leaked} of 128 images" in c.value for c in at.caption)
    detection = services.cached_detection(s, list(s.test.records), True)
    leaked = services.leaked_mask(s, detection)
    assert int(leaked.sum()) == n_leaked
    expected = services.evaluate(detection, s.model.transform_, exclude=leaked)["SoftPatch"]["image AUROC"]
    assert float(at.dataframe[0].value.loc["image AUROC", "SoftPatch"]) == pytest.approx(expected, abs=1e-3)
    at.toggle(key="dt_leak").set_value(False).run()
    assert any("include test images that are also in training" in w.value for w in at.warning)

    # The default threshold: from good training images alone, the copied defects left out of it.
    threshold = s.threshold
    assert "good training images alone" in s.threshold_method
    assert float(next(m.value for m in at.metric if m.label == "Threshold")) == pytest.approx(threshold, abs=1e-4)
    memo_size = len(s.threshold_memo)
    good = services.good_image_threshold(s, s.model, services.ThresholdRule())
    assert len(s.threshold_memo) == memo_size  # the very result Detect used, from the memo
    assert {Path(n).name for n in good.excluded} == {f"copied_{n}" for n in COPIED}
    assert good.n_images == 37 and good.threshold == threshold
    assert np.all(good.scores < threshold)  # 1% of 37 images allows no false alarm among them

    at.switch_page("pages/6_deploy.py").run()
    _clean(at)
    assert at.radio(key="dp_method").value == "good"
    assert s.threshold == threshold
    assert any(
        f"{n_leaked} test images that are also in the training folder are left out" in c.value for c in at.caption
    )
