"""AppTest: loading data every way (browser folder, zip, server folder, demo, added images) and bad inputs.

Every bad input must end in a clear st.error / st.warning, never a traceback, and must not lose what was loaded.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.apptest_helpers import button, session

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenetv1_100_keras_in1k.safetensors"
BATTERY = REPO.parent / "shared" / "data" / "battery_weld"


@pytest.fixture
def env(app_env, monkeypatch):
    # AppTest runs with server.address unset (every interface), where server folders are off by default: these
    # tests allow their own temporary folder (which holds the work folder too) and the shared data beside the repo.
    monkeypatch.setenv("SOFTPATCH_SERVER_ROOTS", os.pathsep.join([str(app_env), str(REPO.parent / "shared")]))
    return app_env


def png(seed: int, size=(64, 48), spot: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (120 + 20 * rng.standard_normal((size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    if spot:
        arr[10:20, 10:20] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def start(page: str = "pages/1_data.py") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180).run()
    if page != "pages/1_data.py":
        at.switch_page(page).run()
    return at


def no_traceback(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error)


def test_browser_folder_upload_with_a_non_image(env) -> None:
    at = start()
    at.radio(key="load_train_method").set_value("browser folder").run()
    files = [(f"parts/good/{i:02d}.png", png(i), "image/png") for i in range(6)]
    files += [("parts/good/readme.txt", b"not an image", "text/plain"), ("parts/.DS_Store", b"x", "application/x")]
    at.file_uploader(key="load_train_dir").set_value(files).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    s = session(at)
    assert len(s.train) == 6
    skipped = {k.path: k.reason for k in s.train.skipped}
    assert any("readme.txt" in p for p in skipped), skipped
    assert any(".DS_Store" in p for p in skipped), skipped
    assert s.test is None, "a plain folder has no test split; the demo's is dropped with the demo"
    # Files live in this session's own workspace, nowhere else.
    assert all(s.workspace.path in r.path.parents for r in s.train.records)
    assert any("Loaded 6 training images" in x.value for x in at.success)
    assert "readme.txt" in at.dataframe[-1].value.to_string()


def test_zip_upload_in_mvtec_layout(env) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(5):
            zf.writestr(f"widget/train/good/{i:03d}.png", png(i))
        zf.writestr("widget/test/good/000.png", png(50))
        zf.writestr("widget/test/spot/000.png", png(60, spot=True))
        mask = np.zeros((48, 64), np.uint8)
        mask[10:20, 10:20] = 255
        m = io.BytesIO()
        Image.fromarray(mask).save(m, format="PNG")
        zf.writestr("widget/ground_truth/spot/000_mask.png", m.getvalue())
        zf.writestr("../evil.png", png(1))
    at = start()
    at.radio(key="load_train_method").set_value("zip").run()
    at.file_uploader(key="load_train_zip").set_value(("widget.zip", buf.getvalue(), "application/zip")).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    s = session(at)
    assert s.dataset_name == "widget"
    assert len(s.train) == 5 and len(s.test) == 2
    assert s.test.labelled and s.test.n_defective == 1 and s.test.n_masks == 1
    assert not (env / "evil.png").exists() and not (Path(s.workspace.path).parent / "evil.png").exists()


def test_bad_inputs_give_clear_messages_and_keep_the_data(env) -> None:
    at = start()
    before = session(at).train
    # A server path that does not exist.
    at.radio(key="load_train_method").set_value("server folder").run()
    at.text_input(key="load_train_path").set_value(str(env / "nope")).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert "folder not found" in errors(at)
    assert session(at).train is before, "a failed load keeps the data already loaded"
    # A file instead of a folder.
    (env / "file.png").write_bytes(png(0))
    at.text_input(key="load_train_path").set_value(str(env / "file.png")).run()
    button(at, "Load this training folder").click().run()
    assert "is a file, not a folder" in errors(at)
    # A folder with no images.
    (env / "empty").mkdir()
    (env / "empty" / "notes.txt").write_text("hello")
    at.text_input(key="load_train_path").set_value(str(env / "empty")).run()
    button(at, "Load this training folder").click().run()
    assert "no readable images" in errors(at)
    # A damaged zip.
    at.radio(key="load_train_method").set_value("zip").run()
    at.file_uploader(key="load_train_zip").set_value(("broken.zip", b"PK\x03\x04garbage", "application/zip")).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert "not a valid zip archive" in errors(at)
    # Only non-images through the folder uploader.
    at.radio(key="load_train_method").set_value("browser folder").run()
    at.file_uploader(key="load_train_dir").set_value([("x/a.txt", b"a", "text/plain")]).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert "no readable images" in errors(at)
    assert session(at).train is before
    assert len(session(at).train) == 34


def test_test_folder_from_a_server_path(env) -> None:
    if not BATTERY.is_dir():
        pytest.skip(f"real data not found at {BATTERY}")
    at = start()
    tab_test_path = "load_test_path"
    at.radio(key="load_test_method").set_value("server folder").run()
    at.text_input(key=tab_test_path).set_value(str(BATTERY / "test")).run()
    button(at, "Load this test folder").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    t = session(at).test
    assert len(t) == 128 and t.labelled and t.n_defective == 93
    assert t.n_masks == 93, "battery_weld masks have the image's own name (no _mask suffix)"


def test_battery_weld_training_folder_plus_added_defects(env) -> None:
    """The README walk-through: a real training folder from the server, plus a few defective test images."""
    if not BATTERY.is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"real data or weights not found next to the repository ({BATTERY}, {WEIGHTS})")
    at = start()
    at.radio(key="load_train_method").set_value("server folder").run()
    at.text_input(key="load_train_path").set_value(str(BATTERY / "train" / "good")).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert len(session(at).train) == 37
    picks = ["1-+_row0_0.png", "2-l4_row0_135.png"]
    at.text_area(key="add_paths").set_value("\n".join(str(BATTERY / "test" / "defective" / p) for p in picks)).run()
    button(at, "Add to the training set").click().run()
    no_traceback(at)
    s = session(at)
    assert len(s.train) == 39
    assert [r.name for r in s.train.records[-2:]] == [f"added/{p}" for p in picks]

    at.switch_page("pages/2_denoise.py").run()
    button(at, "Fit SoftPatch on 39 training images").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    from softpatch_app import services

    vet = services.vetting(session(at))
    ranked = [vet.names[i] for i in vet.ranking]
    assert ranked.index("added/1-+_row0_0.png") < 3, ranked[:5]


def test_missing_weights_file_explains_the_two_ways_out(env, monkeypatch) -> None:
    monkeypatch.setenv("SOFTPATCH_WEIGHTS", str(env / "missing.safetensors"))
    monkeypatch.setenv("SOFTPATCH_BACKBONE", "resnet18")
    monkeypatch.delenv("SOFTPATCH_BACKBONE_KWARGS")
    at = start()
    no_traceback(at)
    at.switch_page("pages/2_denoise.py").run()
    button(at, "Fit SoftPatch on 34 training images").click().run()
    no_traceback(at)
    assert "weights file not found" in errors(at)
    assert any("Two ways out" in m.value for m in at.markdown)
    assert session(at).model is None
    button(at, "Use random weights").click().run()
    no_traceback(at)
    assert at.radio(key="dn_weights_mode").value == "random"
    assert any("Random weights" in w.value for w in at.warning)
    button(at, "Fit SoftPatch on 34 training images").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    assert session(at).model is not None
    assert session(at).model.config.weights_source == "random"


def test_bad_settings_are_messages(env) -> None:
    at = start("pages/2_denoise.py")
    at.text_input(key="dn_kwargs").set_value("{not json").run()
    no_traceback(at)
    assert any("JSON object" in w.value for w in at.warning)


def test_unknown_backbone_is_a_message(env, monkeypatch) -> None:
    monkeypatch.setenv("SOFTPATCH_BACKBONE", "no_such_net_xyz")
    at = start("pages/2_denoise.py")
    button(at, "Fit SoftPatch on 34 training images").click().run()
    no_traceback(at)
    assert "no_such_net_xyz" in errors(at)
    assert session(at).model is None


def test_detect_uploaded_images(env) -> None:
    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS}")
    at = start("pages/2_denoise.py")
    button(at, "Fit SoftPatch on 34 training images").click().run()
    at.switch_page("pages/5_detect.py").run()
    at.radio(key="dt_source").set_value("upload").run()
    demo = session(at).demo.root
    files = [(p.name, p.read_bytes(), "image/png") for p in sorted((demo / "test" / "scratch").glob("*.png"))[:2]]
    files.append(("bad.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"))
    at.file_uploader(key="dt_files").set_value(files).run()
    no_traceback(at)
    assert any("1 uploaded files were skipped" in w.value for w in at.warning)
    button(at, "Score 2 images").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    assert any("no labels" in i.value for i in at.info)


def test_work_dir_is_the_only_place_written(env) -> None:
    at = start()
    ws = session(at).workspace.path
    work = Path(os.environ["SOFTPATCH_WORK_DIR"])
    assert work in ws.parents
    # The demo images are generated once into the work dir's shared folder, read-only for every project.
    assert all(work / "shared" in r.path.parents for r in session(at).train.records)


def test_hostile_corpus_through_the_app(env) -> None:
    """Every hostile file and archive of the shared corpus: a message or a skip reason, never a traceback."""
    from tests.hostile_corpus import build_corpus, check_scan, image_root

    dest = env / "corpus"
    cases = build_corpus(dest, large_image=False)
    at = start()
    at.radio(key="load_train_method").set_value("server folder").run()
    at.text_input(key="load_train_path").set_value(str(image_root(dest))).run()
    button(at, "Load this training folder").click().run()
    no_traceback(at)
    assert not at.error, errors(at)
    folder = session(at).train.folder
    problems = check_scan(
        cases, image_root(dest), [r.relpath for r in folder.records], [(s.path, s.reason) for s in folder.skipped]
    )
    assert not problems, problems

    at.radio(key="load_train_method").set_value("zip").run()
    archives = sorted({c.path for c in cases.values() if c.kind == "zip"})
    assert archives
    for archive in archives:
        at.file_uploader(key="load_train_zip").set_value((archive.name, archive.read_bytes(), "application/zip")).run()
        button(at, "Load this training folder").click().run()
        no_traceback(at)
        refused = [c for c in cases.values() if c.kind == "zip" and c.path == archive and not c.member]
        if refused:
            assert refused[0].reason in errors(at).lower(), (archive.name, errors(at))
        # Nothing is ever written outside this session's workspace.
        assert not any(dest.parent.glob("*.txt")), "an archive wrote outside its folder"


def test_bad_environment_values_are_shown_once(env, monkeypatch) -> None:
    monkeypatch.setenv("SOFTPATCH_DEVICE", "tpu")
    at = start()
    no_traceback(at)
    assert any("SOFTPATCH_DEVICE" in w.value for w in at.warning)
    at.run()
    assert not any("SOFTPATCH_DEVICE" in w.value for w in at.warning)
