"""Projects through the app (AppTest): a refresh restores the work; hostile, unknown or expired ids in the
address start a fresh project; one project's id never opens another project's files.

AppTest note: ``app.py`` saves the project at the end of every run. After its first run AppTest re-runs only
the page script, not ``app.py``, so these tests call ``save_project`` where the app would have.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from softpatch_app import project
from softpatch_app.project import save_project
from softpatch_app.workspace import MARKER_NAME
from tests.apptest_helpers import APP, button, png, session


@pytest.fixture
def env(app_env):
    return app_env


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def open_url(project_id: str | None) -> AppTest:
    """A new browser session on ``?project=<project_id>`` (what a refresh or a shared link does)."""
    at = AppTest.from_file(APP, default_timeout=180)
    if project_id is not None:
        at.query_params["project"] = project_id
    return at.run()


def projects(env: Path) -> set[str]:
    base = project.projects_dir(env / "work")
    return {p.name for p in base.iterdir()} if base.is_dir() else set()


def test_a_refresh_restores_the_project(env) -> None:
    at = open_url(None)
    clean(at)
    pid = at.query_params["project"]
    assert project.valid_project_id(pid) == pid == session(at).project_id
    at.switch_page("pages/2_denoise.py").run()
    button(at, "Fit SoftPatch on 34").click().run()
    at.slider(key="dn_tau").set_value(0.1).run()  # a re-tune after the fit
    clean(at)
    removed_before = next(m.value for m in at.metric if m.label == "Patches removed")
    at.switch_page("pages/3_review.py").run()
    button(at, "Defective").click().run()
    button(at, "Good").click().run()
    at.switch_page("pages/6_deploy.py").run()
    at.radio(key="dp_method").set_value("manual").run()  # the default is the threshold from good images alone
    at.number_input(key="dp_manual").set_value(3.5).run()
    clean(at)
    before = session(at)
    save_project(before)
    assert len(before.labels) == 2 and before.threshold == 3.5

    marker = before.workspace.path / MARKER_NAME
    past = time.time() - 11 * 3600  # idle for 11 of the 12 hours the cleanup allows
    os.utime(marker, (past, past))
    known = projects(env)

    after = open_url(pid)  # the refresh
    clean(after)
    assert after.query_params["project"] == pid
    assert projects(env) == known  # the same project, no new folder
    assert marker.stat().st_mtime > past + 3600  # used again: the age cleanup starts over
    restored = session(after)
    assert restored is not before and restored.project_id == pid
    assert restored.model is not None and restored.model_is_current
    assert restored.model.config.tau == 0.1
    assert restored.labels == before.labels and restored.review_pos == before.review_pos
    assert restored.threshold == 3.5 and restored.threshold_mode == "manual"
    np.testing.assert_array_equal(restored.model.vetting_report().ranking, before.model.vetting_report().ranking)
    side = " ".join(m.value for m in after.sidebar.markdown)
    assert "**Model:** fitted" in side and "tau 0.10" in side
    assert not after.warning, [w.value for w in after.warning]

    after.switch_page("pages/2_denoise.py").run()  # no refit offered: the restored model is shown as is
    clean(after)
    assert next(m.value for m in after.metric if m.label == "Patches removed") == removed_before
    assert not any("Fit again" in w.value for w in after.warning)  # neither "data changed" nor "settings changed"
    after.switch_page("pages/6_deploy.py").run()
    clean(after)
    assert after.number_input(key="dp_manual").value == 3.5


@pytest.mark.parametrize(
    "raw",
    ["../x", "..%2F..%2Fwork", "..%2F", "a" * 31, "a" * 33, "ä" * 32, "unknown", "cleaned"],
)
def test_hostile_unknown_or_expired_ids_start_a_fresh_project(env, raw: str) -> None:
    victim = open_url(None)
    victim_id = victim.query_params["project"]
    victim_path = session(victim).workspace.path
    (victim_path / "secret.txt").write_text("victim")
    if raw == "unknown":
        raw = project.new_project_id()  # well formed, never issued
    if raw == "cleaned":
        expired = open_url(None)
        raw = expired.query_params["project"]
        past = time.time() - 13 * 3600
        os.utime(session(expired).workspace.path / MARKER_NAME, (past, past))
    known = projects(env) - {raw}

    at = open_url(raw)
    clean(at)
    new_id = at.query_params["project"]
    assert new_id != raw and new_id != victim_id and project.valid_project_id(new_id) == new_id
    assert projects(env) == known | {new_id}  # one new folder, nothing named after the given id
    assert any("does not exist" in w.value and "new project" in w.value for w in at.warning)
    s = session(at)
    assert s.workspace.path != victim_path and len(s.train) == 34  # the demo, in a fresh project
    assert not any(victim_path in r.path.parents for r in s.train.records)
    assert (victim_path / "secret.txt").read_text() == "victim"
    at.run()
    assert not any("does not exist" in w.value for w in at.warning)  # said once


def test_only_the_id_in_the_address_opens_a_project(env, monkeypatch) -> None:
    monkeypatch.setenv("SOFTPATCH_SERVER_ROOTS", str(env))  # server folders on, the work dir inside the root
    owner = open_url(None)
    owner.radio(key="load_train_method").set_value("browser folder").run()
    owner.file_uploader(key="load_train_dir").set_value(
        [(f"mine/{i}.png", png(i), "image/png") for i in range(7)]
    ).run()
    button(owner, "Load this training folder").click().run()
    clean(owner)
    mine = session(owner)
    save_project(mine)
    upload_dir = mine.train.records[0].path.parent
    assert mine.workspace.path in upload_dir.parents

    other = open_url(None)  # another user, with a project of their own
    assert session(other).project_id != mine.project_id
    # Typing the owner's upload folder (or the work dir holding it) as a server path is refused...
    for path in (upload_dir, env / "work"):
        other.radio(key="load_train_method").set_value("server folder").run()
        other.text_input(key="load_train_path").set_value(str(path)).run()
        button(other, "Load this training folder").click().run()
        assert any("work folder" in e.value for e in other.error), [e.value for e in other.error]
        assert len(session(other).train) == 34
    # ...and a folder above the work dir is scanned without it: none of the owner's images is loaded.
    other.text_input(key="load_train_path").set_value(str(env)).run()
    button(other, "Load this training folder").click().run()
    assert not any(mine.workspace.path in r.path.parents for r in session(other).train.records)
    # ...and so is adding one of its files by path.
    other.switch_page("pages/1_data.py").run()
    other.text_area(key="add_paths").set_value(str(mine.train.records[0].path)).run()
    button(other, "Add to the training set").click().run()
    assert len(session(other).train) == 34
    assert not any(mine.workspace.path in r.path.parents for r in session(other).train.records)

    shared = open_url(mine.project_id)  # whoever holds the address opens the project
    clean(shared)
    assert [r.path for r in session(shared).train.records] == [r.path for r in mine.train.records]
