"""Two sessions at once keep separate data, models and working folders (AppTest, two threads fitting together)."""

from __future__ import annotations

import gc
import threading

import pytest
from streamlit.testing.v1 import AppTest

from tests.apptest_helpers import APP, button, png, session


@pytest.fixture
def env(app_env):
    return app_env


def test_two_sessions_fitting_at_once_stay_separate(env) -> None:
    a = AppTest.from_file(APP, default_timeout=180).run()
    b = AppTest.from_file(APP, default_timeout=180).run()
    # Session B uploads its own folder; A keeps the demo.
    b.radio(key="load_train_method").set_value("browser folder").run()
    b.file_uploader(key="load_train_dir").set_value([(f"mine/{i}.png", png(i), "image/png") for i in range(7)]).run()
    button(b, "Load this training folder").click().run()
    assert len(session(b).train) == 7 and len(session(a).train) == 34

    a.switch_page("pages/2_denoise.py").run()
    b.switch_page("pages/2_denoise.py").run()
    fit_a, fit_b = button(a, "Fit SoftPatch on 34"), button(b, "Fit SoftPatch on 7")
    fit_a.click()
    fit_b.click()
    failures: list[BaseException] = []

    def run(at: AppTest) -> None:
        try:
            at.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(at,)) for at in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    for at in (a, b):
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]

    sa, sb = session(a), session(b)
    assert sa.workspace.path != sb.workspace.path
    assert sa.model is not None and sb.model is not None and sa.model is not sb.model
    assert len(sa.model_records) == 34 and len(sb.model_records) == 7
    assert all(sb.workspace.path in r.path.parents for r in sb.model_records)
    assert not any(sb.workspace.path in r.path.parents for r in sa.model_records)
    assert not any(sa.workspace.path in r.path.parents for r in sb.model_records)
    assert {r.name for r in sb.model_records}.isdisjoint({r.name for r in sa.model_records})


def test_a_projects_folder_outlives_its_session_until_age_cleanup(env) -> None:
    """The folder is no longer tied to the session's state object: it stays for a refresh, and goes by age."""
    import os
    import time

    from softpatch_app.state import _new_session, environment
    from softpatch_app.workspace import MARKER_NAME

    data = _new_session(environment())
    path = data.workspace.path
    (data.workspace.subdir("uploads") / "x.png").write_bytes(png(1))
    del data
    gc.collect()
    assert (path / "uploads" / "x.png").is_file()
    past = time.time() - 13 * 3600
    os.utime(path / MARKER_NAME, (past, past))
    AppTest.from_file(APP, default_timeout=180).run()  # a new session runs the age cleanup
    assert not path.exists()


def test_stale_workspaces_are_removed_at_startup(env) -> None:
    import os
    import time

    from softpatch_app.workspace import Workspace

    old = Workspace.create(env / "work")
    path = old.path
    marker = path / ".softpatch-workspace"
    past = time.time() - 48 * 3600
    os.utime(marker, (past, past))
    old._finalizer.detach()  # simulate a server restart: nobody owns the folder any more
    AppTest.from_file(APP, default_timeout=180).run()
    assert not path.exists()


def test_pages_compile_without_building_python_ast_objects(env, monkeypatch) -> None:
    """Python 3.11 cannot build AST objects from two threads at once; the app's config keeps Streamlit from it.

    Streamlit's "magic" parses each page with ``ast.parse`` before compiling it; two users opening a page
    together then failed with "AST constructor recursion depth mismatch". With magic off the page goes
    straight to ``compile``. The pages draw nothing implicitly, so nothing is lost.
    """
    import ast
    from pathlib import Path

    from streamlit.runtime.scriptrunner import magic

    parsed: list[str] = []
    real_add_magic = magic.add_magic

    def recording_add_magic(code, script_path):
        parsed.append(script_path)
        return real_add_magic(code, script_path)

    monkeypatch.setattr(magic, "add_magic", recording_add_magic)
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/2_denoise.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.button) > 0  # the page really ran
    assert not parsed, f"these scripts went through Streamlit's magic: {parsed}"

    root = Path(APP).parent
    implicit = []
    for script in [root / "app.py", *sorted((root / "pages").glob("*.py"))]:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call | ast.Await | ast.Yield):
                if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                    implicit.append(f"{script.name}:{node.lineno}")
    assert not implicit, f"these lines relied on magic to draw: {implicit}"
