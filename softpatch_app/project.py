"""Projects: a session's work kept on the server under an unguessable id, restored on refresh or restart.

A project is a persistent ``softpatch_app.workspace.Workspace`` at ``<work dir>/projects/<id>``. The id is made
here only (``secrets.token_urlsafe``, 192 bits) and travels in the page address (``?project=<id>``): the
address is the key, and nothing else leads to a project. An id from an address is checked against
``PROJECT_ID`` before it becomes part of a path, and only an existing project folder is opened: an unknown
id never creates a folder (so nobody can plant a project under an id they chose and hand it out).

What a project folder holds (all written atomically: temporary file, then rename):

- ``data.json``: the training and test sets as lists of image records (paths relative to the project
  folder for uploads, to the shared demo folder for the demo, absolute for server folders), skipped files.
- ``project.json``: the settings, the fitted model's settings and its bundle's file name, labels, review
  position, threshold and how it was chosen.
- ``model-<n>.softpatch``: the fitted model (``softpatch.deployment.bundle``, with the training features, so that
  re-tuning after a restore works as before), rewritten after each fit.
- ``uploads/``, ``exports/``: uploaded files and prepared downloads, as before.

Age cleanup (``SOFTPATCH_SESSION_MAX_AGE_H``) removes whole project folders idle that long; every use of a
project touches its marker file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from softpatch.config import ConfigError, SoftPatchConfig
from softpatch.errors import DataError, SoftPatchError
from softpatch.io.datasets import ImageFolder, ImageRecord, SkippedFile
from softpatch.io.demo import load_demo_manifest
from softpatch.io.paths import is_within
from softpatch_app.loading import LoadedSplit
from softpatch_app.server_paths import ServerPaths
from softpatch_app.settings import AppSettings, Environment
from softpatch_app.state import LABELS, SessionData
from softpatch_app.workspace import Workspace

log = logging.getLogger("softpatch_app")

QUERY_PARAM = "project"  # ?project=<id> in the page address
ID_BYTES = 24  # 192 random bits: far beyond guessing, even for many projects and many tries
PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # exactly what token_urlsafe(24) produces
PROJECTS = "projects"  # <work dir>/projects/<id>
DATA_FILE = "data.json"
STATE_FILE = "project.json"
BUNDLE_PREFIX = "model-"
BUNDLE_SUFFIX = ".softpatch"
SCHEMA = 1
_MAX_MANIFEST_BYTES = 256 * 2**20  # far above any real manifest; a larger file is not ours


# ------------------------------------------------------------------------------------------- ids and folders


def new_project_id() -> str:
    """A fresh random id (32 url-safe characters)."""
    return secrets.token_urlsafe(ID_BYTES)


def valid_project_id(raw: object) -> str | None:
    """``raw`` if it has exactly the shape of an id this module makes, else None (never raises)."""
    if isinstance(raw, str) and PROJECT_ID.fullmatch(raw):
        return raw
    return None


def projects_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / PROJECTS


def create_project(workdir: str | os.PathLike) -> Workspace:
    """A new, empty project folder under a fresh id (the id is the workspace's ``name``)."""
    for _ in range(3):  # a collision of 192-bit ids does not happen; retrying costs nothing
        try:
            return Workspace.create_named(projects_dir(workdir), new_project_id())
        except DataError as exc:
            last = exc
    raise last


def open_project(workdir: str | os.PathLike, raw_id: object) -> Workspace | None:
    """The existing project ``raw_id``, or None when the id is malformed or no such project exists.

    Never creates anything: a well-formed id of a project that was cleaned up (or never existed) gives None.
    """
    project_id = valid_project_id(raw_id)
    if project_id is None:
        return None
    try:
        return Workspace.open_named(projects_dir(workdir), project_id)
    except DataError:
        return None


def shared_demo_workspace(workdir: str | os.PathLike) -> Workspace:
    """The one folder, shared read-only by all projects, that the built-in demo data is generated into.

    The demo is the same synthetic images for everyone (generated from a seed), so a project that only
    looks at it costs no disk space of its own. ``<work dir>/shared`` carries no marker, so age cleanup of
    the work dir never removes it.
    """
    base = Path(workdir) / "shared"
    try:
        return Workspace.open_named(base, "demo")
    except DataError:
        pass
    try:
        return Workspace.create_named(base, "demo")
    except DataError:  # another session made it meanwhile
        return Workspace.open_named(base, "demo")


# ------------------------------------------------------------------------------------------- paths in manifests


def _inside(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` ("/" form) when it lies inside it, else None (lexically, both absolute)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


class PathCodec:
    """Writes image paths into a manifest and reads them back, checked.

    ``project:<rel>`` and ``demo:<rel>`` are relative to the project folder and the shared demo folder;
    ``server:<abs>`` is a file on the server, which must pass the same check as a typed server path
    (``server``: the allowed folders, never inside the work dir, so never another project's files).
    """

    def __init__(self, project: Path, demo: Path, server: ServerPaths) -> None:
        self.roots = {"project": Path(os.path.abspath(project)), "demo": Path(os.path.abspath(demo))}
        self.server = server

    def encode(self, path: str | os.PathLike) -> str:
        absolute = Path(os.path.abspath(path))
        for scheme, root in self.roots.items():
            rel = _inside(absolute, root)
            if rel is not None:
                return f"{scheme}:{rel}"
        return f"server:{absolute}"

    def decode(self, spec: object) -> Path:
        """The path for ``spec``; ``DataError`` when it is malformed or points where it must not."""
        if not isinstance(spec, str) or ":" not in spec:
            raise DataError("a damaged entry in the project's file list")
        scheme, _, rest = spec.partition(":")
        if scheme in self.roots:
            root = self.roots[scheme]
            parts = rest.split("/")
            if not rest or rest.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise DataError("a damaged entry in the project's file list")
            path = root.joinpath(*parts)
            if not is_within(path, root):  # a symlink out of the folder
                raise DataError("a damaged entry in the project's file list")
            return path
        if scheme == "server":
            path = Path(rest)
            if not path.is_absolute():
                raise DataError("a damaged entry in the project's file list")
            try:
                return self.server.check(rest)  # resolved: a file swapped for a link out of the roots is refused
            except DataError:
                raise DataError(f"{path} is no longer a server file this app may read") from None
        raise DataError("a damaged entry in the project's file list")


# ------------------------------------------------------------------------------------------- writing


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _records_json(records: list[ImageRecord], codec: PathCodec) -> list[list]:
    return [
        [codec.encode(r.path), r.relpath, int(r.label), r.defect, codec.encode(r.mask_path) if r.mask_path else None]
        for r in records
    ]


def _split_json(split: LoadedSplit | None, codec: PathCodec) -> dict | None:
    if split is None:
        return None
    return {
        "root": codec.encode(split.folder.root),
        "source": split.source,
        "description": split.description,
        "labelled": bool(split.labelled),
        "records": _records_json(split.records, codec),
        "skipped": [[s.path, s.reason] for s in split.skipped],
    }


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


class ProjectStore:
    """Saves one session's state into its project folder, writing only what changed since the last save."""

    def __init__(self, workspace: Workspace, env: Environment, server: ServerPaths) -> None:
        self.workspace = workspace
        self.codec = PathCodec(workspace.path, shared_demo_workspace(env.workdir).path, server)
        self._data_token: tuple | None = None
        self._state_text: str | None = None
        self._model: Any = None  # the model object last written as a bundle (compared by identity)
        self._bundle: str | None = None
        self._bundle_gen = 0
        self.failed = False  # the last save failed (said once, not on every run)

    def remember(self, session: SessionData, bundle: str | None) -> None:
        """After a restore: what is on disk already matches ``session`` (nothing needs rewriting)."""
        self._data_token = self._token(session)
        self._model = session.model
        self._bundle = bundle
        if bundle:
            match = re.fullmatch(rf"{BUNDLE_PREFIX}(\d+){re.escape(BUNDLE_SUFFIX)}", bundle)
            self._bundle_gen = int(match.group(1)) if match else 0
        self._state_text = json.dumps(self._state(session), sort_keys=True)

    @staticmethod
    def _token(session: SessionData) -> tuple:
        return (session.data_version, session.test_version, id(session.train), id(session.test), session.demo)

    def _data(self, session: SessionData) -> dict:
        return {
            "schema": SCHEMA,
            "dataset_name": session.dataset_name,
            "demo_root": self.codec.encode(session.demo.root) if session.demo is not None else None,
            "test_with_train": session.test_with_train,
            "train": _split_json(session.train, self.codec),
            "test": _split_json(session.test, self.codec),
            "model_records": _records_json(session.model_records, self.codec) if session.model is not None else [],
        }

    def _state(self, session: SessionData) -> dict:
        model = session.model
        return {
            "schema": SCHEMA,
            "settings": asdict(session.settings),
            "model": None
            if model is None or self._bundle is None
            else {
                "bundle": self._bundle,
                "config": model.config.to_dict(),
                "feature_key": list(session.model_feature_key),
                "current": session.model_is_current,
                "fit_seconds": session.fit_seconds,
            },
            "labels": dict(session.labels),
            "review_pos": int(session.review_pos),
            "threshold": _finite(session.threshold),
            "threshold_method": session.threshold_method,
            "threshold_mode": session.threshold_mode,
            "threshold_pct": float(session.threshold_pct),
            "upload_counter": int(session.upload_counter),
        }

    def save(self, session: SessionData) -> None:
        """Write what changed: the bundle after a fit, the file lists after a load, the small state always."""
        if not self.workspace.alive:
            return
        path = self.workspace.path
        old_bundle = None
        model_changed = session.model is not self._model
        if model_changed:
            old_bundle = self._bundle
            if session.model is None:
                self._bundle = None
            else:
                from softpatch.deployment.bundle import save_bundle

                self._bundle_gen += 1
                name = f"{BUNDLE_PREFIX}{self._bundle_gen}{BUNDLE_SUFFIX}"
                save_bundle(session.model, path / name, training_features=True)
                self._bundle = name
            self._model = session.model
        token = self._token(session)
        if model_changed or token != self._data_token:
            _write_json(path / DATA_FILE, self._data(session))
            self._data_token = token
        state = self._state(session)
        text = json.dumps(state, sort_keys=True)
        if text != self._state_text:
            _write_json(path / STATE_FILE, state)
            self._state_text = text
        if old_bundle and old_bundle != self._bundle:  # only once the manifest no longer names it
            (path / old_bundle).unlink(missing_ok=True)
        self.workspace.touch()


def save_project(session: SessionData) -> None:
    """Save ``session`` into its project (never raises: a failure is logged and said once)."""
    store = session.store
    if store is None:
        return
    try:
        store.save(session)
        store.failed = False
    except Exception as exc:  # saving must never break the page; the user is told once
        log.exception("saving project %s failed", store.workspace.name[:6])
        if not store.failed:
            from softpatch_app.guard import message_for

            session.notify(
                "warning",
                f"This project could not be saved, so a page refresh would lose the latest changes: {message_for(exc)}",
            )
        store.failed = True


# ------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict | None:
    """The manifest at ``path``; None when it does not exist. ``DataError`` when it is unreadable."""
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise DataError(f"{path.name} is too large to be this app's")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name} is damaged ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DataError(f"{path.name} was written by another version of this app")
    return data


def _records(rows: object, codec: PathCodec, missing: list[str]) -> list[ImageRecord]:
    """Records back from a manifest; those whose file is gone (or not allowed any more) are listed in ``missing``."""
    if not isinstance(rows, list):
        raise DataError("the project's file list is damaged")
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5):
            raise DataError("the project's file list is damaged")
        spec, relpath, label, defect, mask = row
        try:
            path = codec.decode(spec)
            mask_path = codec.decode(mask) if mask is not None else None
        except DataError as exc:
            missing.append(f"{relpath or spec}: {exc}")
            continue
        if not path.is_file():
            missing.append(str(relpath or path.name))
            continue
        if mask_path is not None and not mask_path.is_file():
            mask_path = None
        out.append(ImageRecord(path, 1 if int(label) == 1 else 0, str(defect), mask_path, str(relpath)))
    return out


def _split(data: object, codec: PathCodec, what: str, notes: list[str]) -> LoadedSplit | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise DataError(f"the {what} in the project is damaged")
    missing: list[str] = []
    records = _records(data.get("records"), codec, missing)
    skipped = [SkippedFile(str(p), str(r)) for p, r in data.get("skipped") or []]
    if missing:
        shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
        notes.append(f"{len(missing)} {what} images are no longer available ({shown}).")
        skipped += [SkippedFile(m, "no longer available since the project was saved") for m in missing]
    if not records:
        raise DataError(f"none of the {what} images is available any more")
    try:
        root = codec.decode(data.get("root"))
    except DataError:
        root = records[0].path.parent
    folder = ImageFolder(root, records, skipped)
    return LoadedSplit(
        folder, str(data.get("source", "")), str(data.get("description", "")), bool(data.get("labelled"))
    )


def _settings(saved: object, defaults: AppSettings) -> AppSettings:
    """Saved settings over the environment's defaults; a value of the wrong type keeps the default."""
    if not isinstance(saved, dict):
        return defaults
    changes = {}
    for f in fields(AppSettings):
        if f.name in saved:
            value, default = saved[f.name], getattr(defaults, f.name)
            if isinstance(default, bool) or isinstance(value, bool):
                ok = isinstance(value, bool) and isinstance(default, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float))
                value = type(default)(value) if ok else value
            else:
                ok = isinstance(value, type(default))
            if ok:
                changes[f.name] = value
    settings = defaults.with_changes(**changes)
    settings.fit_config()  # ConfigError when the saved combination is no longer valid
    return settings


def _restore_model(session: SessionData, saved: dict, env: Environment, notes: list[str]) -> str | None:
    """Load the bundle named in ``saved`` into ``session``; returns its file name, or None (with a note)."""
    from softpatch.config import RETUNE_FIELDS
    from softpatch.deployment.bundle import load_bundle

    name = saved.get("bundle")
    if not isinstance(name, str) or not re.fullmatch(rf"{BUNDLE_PREFIX}\d+{re.escape(BUNDLE_SUFFIX)}", name):
        raise DataError("the project's model entry is damaged")
    if not session.model_records:
        raise DataError("the images it was fitted on are no longer available")
    model = load_bundle(session.workspace.path / name, device=session.settings.device)
    names = model.train_names_
    if len(names) != len(session.model_records) or any(
        Path(n).name != r.path.name for n, r in zip(names, session.model_records, strict=True)
    ):
        raise DataError("it does not match the images it was fitted on (some are no longer available)")
    # The bundle is written after each fit; later re-tunes (tau, k, coreset) are re-applied from the settings.
    target = SoftPatchConfig.from_dict(saved["config"])
    changes = {
        k: getattr(target, k) for k in RETUNE_FIELDS - {"device"} if getattr(target, k) != getattr(model.config, k)
    }
    if changes:
        model.retune(**changes)
    session.model = model
    session.model_feature_key = tuple(saved.get("feature_key") or ())
    session.fit_seconds = float(saved.get("fit_seconds") or 0.0)
    session.model_data_version = session.data_version if saved.get("current", True) else session.data_version - 1
    return name


def restore(workspace: Workspace, env: Environment, server: ServerPaths) -> SessionData:
    """A session rebuilt from the project folder; what cannot be restored is left out and said in one message.

    ``server`` is the server-path policy that server files in the project must still pass.
    """
    session = SessionData(workspace=workspace, settings=env.settings)
    store = ProjectStore(workspace, env, server)
    session.store = store
    notes: list[str] = []
    bundle = None
    data = state = None
    try:
        data = _read_json(workspace.path / DATA_FILE)
    except DataError as exc:
        notes.append(f"its image lists could not be read ({exc})")
    try:
        state = _read_json(workspace.path / STATE_FILE)
    except DataError as exc:
        notes.append(f"its settings and labels could not be read ({exc})")
    if data is not None:
        session.dataset_name = str(data.get("dataset_name", ""))
        for kind, what in (("train", "training"), ("test", "test")):
            try:
                split = _split(data.get(kind), store.codec, what, notes)
            except (DataError, TypeError, ValueError) as exc:
                notes.append(f"the {what} set could not be restored ({exc})")
                split = None
            setattr(session, kind, split)
        session.data_version = 1 if session.train is not None else 0
        session.test_version = 1 if session.test is not None else 0
        session.test_with_train = bool(data.get("test_with_train")) and session.test is not None
        demo_root = data.get("demo_root")
        if demo_root and session.train is not None:
            try:
                session.demo = load_demo_manifest(store.codec.decode(demo_root))
            except DataError:
                session.demo = None
    if state is not None:
        try:
            session.settings = _settings(state.get("settings"), env.settings)
        except (ConfigError, SoftPatchError, TypeError, ValueError) as exc:
            notes.append(f"the saved settings are no longer valid, the defaults are used ({exc})")
        labels = state.get("labels")
        if isinstance(labels, dict):
            session.labels = {str(k): v for k, v in labels.items() if v in LABELS}
        pos = state.get("review_pos")
        session.review_pos = pos if isinstance(pos, int) and pos >= 0 else 0
        counter = state.get("upload_counter")
        session.upload_counter = counter if isinstance(counter, int) and counter >= 0 else 0
        saved_model = state.get("model")
        if isinstance(saved_model, dict) and session.train is None:
            notes.append("the fitted model was not restored, as its training images were not")
        elif isinstance(saved_model, dict):
            try:
                missing: list[str] = []
                session.model_records = _records(data.get("model_records") if data else None, store.codec, missing)
                if missing:
                    session.model_records = []
                bundle = _restore_model(session, saved_model, env, notes)
            except (SoftPatchError, ConfigError, KeyError, TypeError, ValueError, OSError) as exc:
                from softpatch_app.guard import message_for

                session.forget_model()
                notes.append(f"the fitted model could not be restored: {message_for(exc)} Fit again on Denoise")
        if session.model is not None:  # a threshold belongs to a model
            threshold = state.get("threshold")
            if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold):
                session.threshold = float(threshold)
                session.threshold_method = str(state.get("threshold_method", ""))
                session.threshold_mode = str(state.get("threshold_mode", ""))
                pct = state.get("threshold_pct")
                if isinstance(pct, (int, float)) and 80.0 <= pct <= 100.0:
                    session.threshold_pct = float(pct)
    if notes:
        session.notify("warning", "This project was only partly restored: " + "; ".join(notes) + ".")
    store.remember(session, bundle)
    # A manifest that could not be read is rewritten from what was restored on the next save.
    if data is None or state is None:
        store._data_token = store._state_text = None
    workspace.touch()
    return session
