"""Projects (softpatch_app.project): ids, opening only what exists, saving and restoring, and attacks on both.

Each attack is performed: a hostile id, a planted folder or symlink, a tampered manifest, a server path into
the work dir. The assertion is that it is refused (None, a DataError, a missing-file note) and that no other
folder was created or read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from softpatch.errors import DataError
from softpatch.io.datasets import ImageFolder, ImageRecord, scan_images
from softpatch_app import project
from softpatch_app.loading import LoadedSplit
from softpatch_app.server_paths import ServerPaths, server_path_policy
from softpatch_app.settings import read_environment
from softpatch_app.state import SessionData
from softpatch_app.workspace import MARKER_NAME, Workspace, cleanup_stale

REPO = Path(__file__).resolve().parent.parent


def _server(env) -> ServerPaths:
    """The server-path policy a restore checks against: the temp folder (where the test images live) allowed."""
    return server_path_policy((Path(tempfile.gettempdir()).resolve(),), env.workdir, "127.0.0.1")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    monkeypatch.setenv("SOFTPATCH_WORK_DIR", str(work))
    return work


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (relative), to show that an attempt created nothing."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------------- ids


def test_ids_are_random_url_safe_and_long() -> None:
    ids = {project.new_project_id() for _ in range(500)}
    assert len(ids) == 500
    assert project.ID_BYTES * 8 >= 128
    for pid in ids:
        assert project.valid_project_id(pid) == pid
        assert len(pid) == 32 and all(c.isalnum() or c in "-_" for c in pid)


HOSTILE_IDS = [
    "../x",
    "..%2F",
    "..%2Fprojects",
    "%2e%2e%2fshared",
    "../shared/demo",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a" * 31,  # one short
    "a" * 33,  # one long
    "a" * 31 + ".",
    "a" * 31 + "/",
    "a" * 30 + "/.",
    "é" * 32,  # another alphabet
    "a" * 31 + "\x00",
    "a" * 31 + " ",
    "a" * 31 + "\n",
    "ＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡ",  # full-width letters: str.isalnum() but not ASCII
    None,
    12345,
    ["a" * 32],
]


@pytest.mark.parametrize("raw", HOSTILE_IDS, ids=repr)
def test_hostile_ids_open_nothing_and_create_nothing(workdir: Path, raw: object) -> None:
    real = project.create_project(workdir)
    outside = workdir / "x"  # a workspace-looking folder right next to projects/
    outside.mkdir()
    (outside / MARKER_NAME).write_text("{}")
    before = listing(workdir)
    assert project.valid_project_id(raw) is None
    assert project.open_project(workdir, raw) is None
    assert listing(workdir) == before
    assert real.alive


def test_a_well_formed_unknown_id_creates_no_folder(workdir: Path) -> None:
    project.create_project(workdir)
    before = listing(workdir)
    planted = project.new_project_id()  # what an attacker would hand out, hoping the server makes it
    assert project.open_project(workdir, planted) is None
    assert listing(workdir) == before
    assert not (project.projects_dir(workdir) / planted).exists()


def test_an_existing_project_opens_by_its_exact_id_only(workdir: Path) -> None:
    ws = project.create_project(workdir)
    pid = ws.name
    opened = project.open_project(workdir, pid)
    assert opened is not None and opened.path == ws.path and opened.persistent
    for variant in (pid.upper() if pid.upper() != pid else pid.lower(), pid[:-1] + ("A" if pid[-1] != "A" else "B")):
        assert project.open_project(workdir, variant) is None


def test_a_symlink_planted_as_a_project_is_refused(workdir: Path, tmp_path: Path) -> None:
    victim = project.create_project(workdir)
    (victim.path / "secret.txt").write_text("victim's data")
    fake = project.new_project_id()
    os.symlink(victim.path, project.projects_dir(workdir) / fake)  # another folder, under a new id
    assert project.open_project(workdir, fake) is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MARKER_NAME).write_text("{}")
    fake2 = project.new_project_id()
    os.symlink(elsewhere, project.projects_dir(workdir) / fake2)
    assert project.open_project(workdir, fake2) is None


def test_a_folder_without_the_marker_is_not_a_project(workdir: Path) -> None:
    project.create_project(workdir)
    pid = project.new_project_id()
    (project.projects_dir(workdir) / pid).mkdir()
    assert project.open_project(workdir, pid) is None


def test_a_cleaned_up_project_cannot_be_opened(workdir: Path) -> None:
    old = project.create_project(workdir)
    fresh = project.create_project(workdir)
    past = time.time() - 13 * 3600
    os.utime(old.path / MARKER_NAME, (past, past))
    removed = cleanup_stale(project.projects_dir(workdir), max_age_s=12 * 3600)
    assert removed == [old.path]
    assert project.open_project(workdir, old.name) is None
    assert project.open_project(workdir, fresh.name) is not None


def test_named_workspaces_refuse_bad_names_and_never_adopt(tmp_path: Path) -> None:
    for bad in ("..", "../x", "a/b", "a.b", "", "a" * 129, ".hidden"):
        with pytest.raises(DataError):
            Workspace.create_named(tmp_path, bad)
        with pytest.raises(DataError):
            Workspace.open_named(tmp_path, bad)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists"):
        Workspace.create_named(tmp_path, "taken")  # an existing folder is never taken over
    assert not (tmp_path / "taken" / MARKER_NAME).exists()


def test_a_project_outlives_its_objects_and_the_process(workdir: Path) -> None:
    """An app restart: the process that made the project exits; the folder stays and opens again."""
    code = (
        "import sys; from softpatch_app import project; from softpatch_app.workspace import Workspace\n"
        "ws = project.create_project(sys.argv[1]); (ws.path / 'kept.txt').write_text('x')\n"
        "tmp = Workspace.create(sys.argv[1]); print(ws.name, tmp.path)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code, str(workdir)], capture_output=True, text=True, env=env, check=True
    )
    pid, tmp_path = out.stdout.split()
    assert not Path(tmp_path).exists()  # a temporary workspace still goes at exit
    reopened = project.open_project(workdir, pid)
    assert reopened is not None and (reopened.path / "kept.txt").read_text() == "x"


# ------------------------------------------------------------------------------------------- paths in manifests


def test_path_codec_refuses_escapes_and_the_work_dir(workdir: Path, tmp_path: Path) -> None:
    mine, other = project.create_project(workdir), project.create_project(workdir)
    (other.path / "uploads").mkdir()
    secret = other.path / "uploads" / "secret.png"
    secret.write_bytes(b"not yours")
    demo = project.shared_demo_workspace(workdir)
    codec = project.PathCodec(mine.path, demo.path, server_path_policy((tmp_path,), workdir, "127.0.0.1"))
    os.symlink(secret, mine.path / "link.png")  # a link inside my project pointing into another one
    attacks = [
        f"project:../{other.name}/uploads/secret.png",
        "project:uploads/../../x",
        "project:/etc/passwd",
        "project:",
        "project:link.png",
        "demo:../../projects",
        f"server:{secret}",
        f"server:{workdir}/projects/{other.name}/uploads/secret.png",
        "server:relative/path.png",
        "file:/etc/passwd",
        "no-scheme",
        None,
        42,
    ]
    for spec in attacks:
        with pytest.raises(DataError):
            codec.decode(spec)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    assert codec.decode(codec.encode(data / "a.png")) == data / "a.png"
    (mine.path / "uploads").mkdir()
    assert codec.encode(mine.path / "uploads" / "b.png") == "project:uploads/b.png"


def test_server_paths_never_reach_the_work_dir(workdir: Path, tmp_path: Path) -> None:
    other = project.create_project(workdir)
    (other.path / "uploads").mkdir()
    (other.path / "uploads" / "secret.png").write_bytes(_png_bytes())
    policy = server_path_policy((tmp_path,), workdir, "127.0.0.1")
    for path in (workdir, project.projects_dir(workdir), other.path / "uploads"):
        with pytest.raises(DataError, match="work folder"):
            policy.check(str(path))
    # A folder above the work dir may be read, but its scan skips the work dir: no project's file is listed.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "own.png").write_bytes(_png_bytes())
    folder = scan_images(policy.folder(str(tmp_path)), scope=policy.scope)
    assert [r.relpath for r in folder.records] == ["data/own.png"]
    assert not any("secret" in s.path for s in folder.skipped)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- save and restore


def _split(records: list[ImageRecord], root: Path) -> LoadedSplit:
    return LoadedSplit(ImageFolder(root, records, []), "server folder", f"{root} (server folder)")


@pytest.fixture
def saved(workdir: Path, synthetic_set, small_config, extractor):
    """A session with data, a fitted (then re-tuned) model, labels, a threshold and a review position, saved."""
    from softpatch import SoftPatch
    from softpatch_app.settings import AppSettings

    env = read_environment()
    ws = project.create_project(workdir)
    settings = AppSettings(
        backbone="resnet18", weights_mode="random", device="cpu", resize=72, crop=64, tau=0.2, lof_k=4
    )
    session = SessionData(workspace=ws, settings=settings)
    session.store = project.ProjectStore(ws, env, _server(env))
    records = [ImageRecord(p, relpath=p.name) for p in synthetic_set.train]
    test = [ImageRecord(p, label=0, relpath=p.name) for p in synthetic_set.test_good]
    test += [ImageRecord(p, label=1, defect="blob", relpath=p.name) for p in synthetic_set.test_bad]
    session.train = _split(records, synthetic_set.train_dir)
    session.test = LoadedSplit(ImageFolder(synthetic_set.test_bad[0].parent, test, []), "server folder", "t", True)
    session.data_version = session.test_version = 1
    model = SoftPatch(small_config, extractor=extractor).fit(records)
    session.model, session.model_records = model, records
    session.model_data_version = session.data_version
    session.model_feature_key = settings.feature_key()
    project.save_project(session)
    model.retune(tau=0.2, lof_k=4)  # after the bundle was written: re-applied on restore from the settings
    session.labels = {records[3].name: "defective", records[0].name: "good"}
    session.review_pos = 2
    session.threshold, session.threshold_method, session.threshold_mode = 1.25, "By hand", "manual"
    project.save_project(session)
    return session, env


def test_restore_gives_back_the_same_work(saved, synthetic_set) -> None:
    session, env = saved
    model = session.model
    restored = project.restore(project.open_project(env.workdir, session.project_id), env, _server(env))
    assert restored.notices == []
    assert [r.path for r in restored.train.records] == [r.path for r in session.train.records]
    assert [(r.path, r.label) for r in restored.test.records] == [(r.path, r.label) for r in session.test.records]
    assert restored.labels == session.labels and restored.review_pos == 2
    assert (restored.threshold, restored.threshold_mode) == (1.25, "manual")
    assert restored.settings == session.settings
    back = restored.model
    assert back is not None and restored.model_is_current
    assert (back.config.tau, back.config.lof_k) == (0.2, 4)
    np.testing.assert_array_equal(back.vetting_report().ranking, model.vetting_report().ranking)
    np.testing.assert_array_equal(back.removed_mask_, model.removed_mask_)
    np.testing.assert_allclose(
        back.score(synthetic_set.test).image_scores, model.score(synthetic_set.test).image_scores, rtol=1e-5
    )
    back.retune(tau=0.05)  # a restored model re-tunes like a fitted one (the bundle carries the features)
    assert back.removed_mask_.sum() < model.removed_mask_.sum()


def test_only_the_latest_bundle_is_kept(saved, small_config, extractor) -> None:
    from softpatch import SoftPatch

    session, _ = saved
    bundles = sorted(p.name for p in session.workspace.path.glob("model-*.softpatch"))
    assert bundles == ["model-1.softpatch"]
    session.model = SoftPatch(small_config, extractor=extractor).fit(session.model_records)
    project.save_project(session)
    bundles = sorted(p.name for p in session.workspace.path.glob("model-*.softpatch"))
    assert bundles == ["model-2.softpatch"]
    state = json.loads((session.workspace.path / project.STATE_FILE).read_text())
    assert state["model"]["bundle"] == "model-2.softpatch"


def test_unchanged_state_is_not_rewritten(saved) -> None:
    session, _ = saved
    files = [session.workspace.path / n for n in (project.DATA_FILE, project.STATE_FILE)]
    for f in files:
        os.utime(f, (1, 1))
    project.save_project(session)
    assert [f.stat().st_mtime for f in files] == [1, 1]
    session.labels["x"] = "unsure"
    project.save_project(session)
    assert files[0].stat().st_mtime == 1 and files[1].stat().st_mtime > 1


def test_a_damaged_bundle_restores_the_rest_with_one_message(saved) -> None:
    session, env = saved
    bundle = session.workspace.path / "model-1.softpatch"
    bundle.write_bytes(bundle.read_bytes()[:1000])
    restored = project.restore(project.open_project(env.workdir, session.project_id), env, _server(env))
    assert restored.model is None and restored.threshold is None
    assert restored.labels == session.labels and len(restored.train) == len(session.train)
    [(kind, text)] = restored.notices
    assert kind == "warning" and "fitted model could not be restored" in text and "Traceback" not in text


def test_damaged_manifests_are_a_message_never_an_exception(saved) -> None:
    session, env = saved
    (session.workspace.path / project.DATA_FILE).write_text("{not json")
    restored = project.restore(project.open_project(env.workdir, session.project_id), env, _server(env))
    assert restored.train is None and restored.model is None
    assert restored.labels == session.labels  # project.json was fine: its part comes back
    [(kind, text)] = restored.notices
    assert kind == "warning" and "image lists could not be read" in text and "model was not restored" in text
    (session.workspace.path / project.STATE_FILE).write_text(
        json.dumps({"schema": 1, "labels": [1], "review_pos": "x"})
    )
    (session.workspace.path / project.DATA_FILE).write_text(json.dumps({"schema": 1, "train": {"records": "x"}}))
    restored = project.restore(project.open_project(env.workdir, session.project_id), env, _server(env))
    assert restored.train is None and restored.labels == {} and restored.review_pos == 0
    assert all(kind == "warning" for kind, _ in restored.notices)


def test_a_missing_training_image_is_listed_and_the_model_dropped(saved, tmp_path: Path) -> None:
    session, env = saved
    gone = session.train.records[5].path
    moved = tmp_path / "moved.png"
    gone.rename(moved)
    try:
        restored = project.restore(project.open_project(env.workdir, session.project_id), env, _server(env))
    finally:
        moved.rename(gone)
    assert len(restored.train) == len(session.train) - 1
    assert any(s.path == session.train.records[5].name for s in restored.train.skipped)
    assert restored.model is None  # it was fitted on an image that is gone: fit again
    text = " ".join(t for _, t in restored.notices)
    assert "no longer available" in text and "fitted model could not be restored" in text


def test_a_tampered_manifest_cannot_read_another_project(saved) -> None:
    """A manifest pointing into another project (by a relative escape or an absolute path) reads nothing there."""
    session, env = saved
    other = project.create_project(env.workdir)
    (other.path / "uploads").mkdir()
    secret = other.path / "uploads" / "secret.png"
    secret.write_bytes(session.train.records[0].path.read_bytes())
    data_file = session.workspace.path / project.DATA_FILE
    data = json.loads(data_file.read_text())
    data["train"]["records"] += [
        [f"project:../{other.name}/uploads/secret.png", "a", 0, "good", None],
        [f"server:{secret}", "b", 0, "good", None],
        ["demo:../../projects/" + other.name + "/uploads/secret.png", "c", 0, "good", None],
    ]
    data_file.write_text(json.dumps(data))
    restored = project.restore(project.open_project(env.workdir, session.project_id), env, _server(env))
    assert len(restored.train) == len(session.train)
    assert not any(other.path in r.path.parents for r in restored.train.records)
    assert {"a", "b", "c"} <= {s.path.split(":")[0] for s in restored.train.skipped}
