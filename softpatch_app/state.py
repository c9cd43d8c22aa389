"""Per-browser-session state: one ``SessionData`` object in ``st.session_state``.

Each browser session works in a project (``softpatch_app.project``): its own folder, data, model and
labels, saved on the server and named by an unguessable id in the page address (``?project=<id>``), so
a refresh, a reconnect or an app restart brings the work back. Nothing here is shared between projects
(shared, read-only things such as backbones live in ``st.cache_resource``; the demo images are one
read-only folder).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from softpatch.io.demo import DemoManifest
from softpatch_app.loading import LoadedSplit, LoadResult, load_demo
from softpatch_app.server_paths import ServerPaths, server_path_policy
from softpatch_app.settings import AppSettings, Environment, read_environment
from softpatch_app.workspace import Workspace, cleanup_stale

log = logging.getLogger("softpatch_app")
KEY = "_softpatch_session"
LABELS = ("defective", "good", "unsure")


@dataclass(eq=False)
class SessionData:
    """Everything one browser session owns. Replaced parts are swapped in only after they loaded fine."""

    workspace: Workspace
    settings: AppSettings
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # data
    dataset_name: str = ""
    train: LoadedSplit | None = None
    test: LoadedSplit | None = None
    demo: DemoManifest | None = None
    data_version: int = 0  # bumped whenever the training set changes
    test_version: int = 0  # bumped whenever the test set changes
    test_with_train: bool = False  # the test set came with the training folder (MVTec layout, demo)
    # model
    model: Any = None  # softpatch.SoftPatch, fitted
    model_data_version: int = -1
    model_feature_key: tuple = ()
    fit_seconds: float = 0.0
    baseline: Any = None  # the PatchCore variant of ``model`` (Detect page)
    baseline_token: tuple = ()
    model_records: list = field(default_factory=list)  # the training records the model was fitted on
    results: dict = field(default_factory=dict)  # (model token, files) -> Detection
    embed_memo: dict = field(default_factory=dict)  # (feature token, files) -> Embeddings
    duplicates_memo: dict = field(
        default_factory=dict
    )  # (files, features) -> softpatch.evaluation.duplicates.DuplicateReport
    # review
    labels: dict[str, str] = field(default_factory=dict)  # training image name -> one of LABELS
    review_pos: int = 0
    # deploy
    threshold: float | None = None
    threshold_method: str = ""
    threshold_mode: str = ""  # the Deploy page's choice: "f1", "percentile" or "manual"
    threshold_pct: float = 99.0  # the percentile, when chosen by percentile
    threshold_rule: Any = None  # softpatch_app.services.ThresholdRule that gave ``threshold``
    weights_problem: str = ""  # why the backbone's weights could not be had at the last fit ("" = none)
    # what pages prepared on request, kept across reruns and page changes (not saved with the project)
    upload_dirs: dict[str, str] = field(default_factory=dict)  # "train"/"test" -> folder of the last browser upload
    review_count: int | None = None  # how many of the most suspicious images the Review page walks
    detect_upload: tuple | None = None  # (token of the uploaded files, their LoadedSplit) on the Detect page
    cleaned_zip: tuple[str, int] | None = None  # (path, image count) of the cleaned-folder .zip
    bundle_file: str | None = None  # the bundle prepared on the Deploy page
    onnx_export: tuple[str, str] | None = None  # (model file, summary) prepared on the Deploy page
    report_html: str | None = None  # the HTML report prepared on the Deploy page
    threshold_memo: dict = field(default_factory=dict)  # (model settings, exclusions, target) -> GoodImageThreshold
    notices: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown once
    upload_counter: int = 0
    store: Any = None  # softpatch_app.project.ProjectStore: saves this state into the project folder

    @property
    def project_id(self) -> str:
        """The id in the page address (the project folder's name)."""
        return self.workspace.name

    def slot(self, kind: str) -> str:
        """A fresh upload folder name inside the workspace (uploads/<kind>-<n>)."""
        self.upload_counter += 1
        return f"uploads/{kind}-{self.upload_counter}"

    # ----------------------------------------------------------------------------- data changes
    def set_training(self, result: LoadResult) -> None:
        """New training data (and the test set that came with it): drops the model and the labels."""
        self.dataset_name = result.name
        self.train = result.train
        self.demo = result.demo
        self.data_version += 1
        self.forget_model()
        self.labels.clear()
        self.review_pos = 0
        if result.test is not None:
            self.set_test(result.test)
            self.test_with_train = True
        elif self.test_with_train:  # the old test set came with the old training folder: it goes with it
            self.set_test(None)

    def set_test(self, split: LoadedSplit | None) -> None:
        """A test set loaded on its own (it stays when another training folder is loaded)."""
        self.test = split
        self.test_with_train = False
        self.test_version += 1
        self.results.clear()

    def forget_model(self) -> None:
        self.model = None
        self.model_records = []
        self.baseline = None
        self.baseline_token = ()
        self.results.clear()
        self.model_data_version = -1
        self.threshold = None
        self.threshold_method = ""
        self.threshold_mode = ""
        self.threshold_rule = None
        self.threshold_memo.clear()

    @property
    def model_is_current(self) -> bool:
        return self.model is not None and self.model_data_version == self.data_version

    def notify(self, kind: str, text: str) -> None:
        self.notices.append((kind, text))


def _cleanup(workdir, max_age_s: float) -> list[str]:
    """Remove projects (and temporary workspaces of older versions) idle for more than ``max_age_s``."""
    from softpatch_app.project import projects_dir

    removed: list[str] = []
    for base in (workdir, projects_dir(workdir)):
        try:
            removed += [str(p) for p in cleanup_stale(base, max_age_s=max_age_s)]
        except Exception:
            log.exception("cleanup of stale workspaces failed")
    return removed


@st.cache_resource(show_spinner=False)
def _process_startup(workdir: str, max_age_s: float) -> list[str]:
    """Once per server process: remove projects nobody used for a long time."""
    return _cleanup(workdir, max_age_s)


def environment() -> Environment:
    return read_environment()


def server_paths(env: Environment | None = None) -> ServerPaths:
    """Where typed server paths may point, for the address this server listens on (read at every call:
    the policy must follow the running server, not the environment alone)."""
    env = env or environment()
    return server_path_policy(env.server_roots, env.workdir, st.get_option("server.address"))


_demo_lock = threading.Lock()  # sessions starting together must not write the shared demo folder at once


def load_shared_demo(env: Environment) -> LoadResult:
    """The built-in demo data, generated once into the folder all projects share (read-only)."""
    from softpatch_app.project import shared_demo_workspace

    with _demo_lock:
        return load_demo(shared_demo_workspace(env.workdir), limits=env.limits)


def _new_session(env: Environment) -> SessionData:
    """A new project (fresh id and folder) with the demo data loaded."""
    from softpatch_app.project import ProjectStore, create_project

    _process_startup(str(env.workdir), env.max_age_s)
    _cleanup(env.workdir, env.max_age_s)
    data = SessionData(workspace=create_project(env.workdir), settings=env.settings)
    data.store = ProjectStore(data.workspace, env, server_paths(env))
    for warning in env.warnings:  # a bad environment variable: say so once, carry on with the default
        data.notify("warning", f"Setting ignored: {warning}")
    try:
        data.set_training(load_shared_demo(env))
    except Exception as exc:
        log.exception("demo data could not be loaded")
        data.notify("error", f"The demo data could not be prepared: {exc}")
    return data


def _open_session(env: Environment, raw_id: object) -> SessionData | None:
    """The session of the existing project ``raw_id`` (restored from its folder), or None if there is none."""
    from softpatch_app.project import open_project, restore

    _process_startup(str(env.workdir), env.max_age_s)
    _cleanup(env.workdir, env.max_age_s)  # first, so that an expired project is not opened
    workspace = open_project(env.workdir, raw_id)
    if workspace is None:
        return None
    return restore(workspace, env, server_paths(env))


def get_session() -> SessionData:
    """This browser session's data: the project named in the page address, restored from its folder, or a
    new project (with the demo data loaded) whose id is then put into the address."""
    from softpatch_app.project import QUERY_PARAM

    data = st.session_state.get(KEY)
    if isinstance(data, SessionData) and data.workspace.alive:
        data.workspace.touch()
    else:
        env = environment()
        raw = None if isinstance(data, SessionData) else st.query_params.get(QUERY_PARAM)
        fresh = _open_session(env, raw) if raw else None
        if fresh is None:
            fresh = _new_session(env)
            if isinstance(data, SessionData) or raw:  # the project was removed (idle too long) or never existed
                hours = env.max_age_s / 3600
                fresh.notify(
                    "warning",
                    "The project in this page's address does not exist (projects are removed after "
                    f"{hours:g} hours without use), so a new project was started with the demo data.",
                )
        data = fresh
        st.session_state[KEY] = data
    # Page changes clear the address's parameters: put the id back on every run, so a refresh finds it.
    if st.query_params.get(QUERY_PARAM) != data.project_id:
        st.query_params[QUERY_PARAM] = data.project_id
    return data


# ----------------------------------------------------------------------------------------------- widget values
# Widget values are Streamlit's, kept under the keys of ``softpatch_app.keys``; these three functions are the
# only way the pages read or write them.
def widget_value(key: str, default: Any = None) -> Any:
    """The current value of the widget ``key`` (``default`` before it was drawn)."""
    return st.session_state.get(key, default)


def set_widget_value(key: str, value: Any) -> None:
    """Set the widget ``key`` (e.g. from a button's callback, before the widget is drawn again)."""
    st.session_state[key] = value


def restore_widget_value(key: str, value: Any) -> None:
    """Give the widget ``key`` the value remembered in the session when it has none: Streamlit drops a widget's
    value when the user visits another page, the session's settings keep it."""
    if key not in st.session_state:
        st.session_state[key] = value
