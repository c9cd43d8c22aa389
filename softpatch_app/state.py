"""Per-browser-session state: one ``SessionData`` object in ``st.session_state``.

Each browser session gets its own workspace folder, data, model and labels; nothing here is shared
between sessions (shared, read-only things such as backbones live in ``st.cache_resource``).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from softpatch.demo import DemoManifest
from softpatch.workspace import Workspace, cleanup_stale
from softpatch_app.loading import LoadedSplit, LoadResult, load_demo
from softpatch_app.settings import AppSettings, Environment, read_environment

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
    duplicates_memo: dict = field(default_factory=dict)  # (files, features) -> softpatch.duplicates.DuplicateReport
    # review
    labels: dict[str, str] = field(default_factory=dict)  # training image name -> one of LABELS
    review_pos: int = 0
    # deploy
    threshold: float | None = None
    threshold_method: str = ""
    threshold_rule: Any = None  # softpatch_app.services.ThresholdRule that gave ``threshold``
    threshold_memo: dict = field(default_factory=dict)  # (model settings, exclusions, target) -> GoodImageThreshold
    notices: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown once
    upload_counter: int = 0

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
        self.threshold_rule = None
        self.threshold_memo.clear()

    @property
    def model_is_current(self) -> bool:
        return self.model is not None and self.model_data_version == self.data_version

    def notify(self, kind: str, text: str) -> None:
        self.notices.append((kind, text))


@st.cache_resource(show_spinner=False)
def _process_startup(workdir: str, max_age_s: float) -> list[str]:
    """Once per server process: remove working folders of sessions that ended long ago."""
    try:
        return [str(p) for p in cleanup_stale(workdir, max_age_s=max_age_s)]
    except Exception:
        log.exception("cleanup of stale workspaces failed")
        return []


def environment() -> Environment:
    return read_environment()


def _new_session(env: Environment) -> SessionData:
    _process_startup(str(env.workdir), env.max_age_s)
    try:
        cleanup_stale(env.workdir, max_age_s=env.max_age_s)
    except Exception:
        log.exception("cleanup of stale workspaces failed")
    workspace = Workspace.create(env.workdir)
    data = SessionData(workspace=workspace, settings=env.settings)
    for warning in env.warnings:  # a bad environment variable: say so once, carry on with the default
        data.notify("warning", f"Setting ignored: {warning}")
    workspace.register_cleanup(data)  # the folder goes when the session's state is dropped
    return data


def get_session() -> SessionData:
    """This browser session's data, created on first use (with the demo data already loaded)."""
    data = st.session_state.get(KEY)
    if isinstance(data, SessionData) and data.workspace.alive:
        data.workspace.touch()
        return data
    env = environment()
    fresh = _new_session(env)
    if isinstance(data, SessionData):  # the folder was removed (idle too long): start over, say so
        fresh.notify(
            "warning",
            "This session was idle for a long time and its files were cleaned up; the demo data is loaded again.",
        )
    try:
        fresh.set_training(load_demo(fresh.workspace, limits=env.limits))
    except Exception as exc:
        log.exception("demo data could not be loaded")
        fresh.notify("error", f"The demo data could not be prepared: {exc}")
    st.session_state[KEY] = fresh
    return fresh
