"""Server paths under attack: every way a typed path, a symlink or a dataset layout could read outside the allowed
folders, performed, and shown refused with a clear message and nothing read.

Policy level (``softpatch_app.server_paths`` + the scoped scans of ``softpatch.io.datasets``), then through the app
(AppTest) for the listening address, another session's uploads and "Add training images".
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch.errors import DataError
from softpatch.io.datasets import EXCLUDED_REASON, OUTSIDE_REASON, load_mvtec, scan_images
from softpatch.io.limits import LoadLimits
from softpatch.io.paths import ReadScope, is_within
from softpatch_app import loading
from softpatch_app.server_paths import default_roots, is_loopback, server_path_policy
from softpatch_app.uploads import save_uploads
from softpatch_app.workspace import Workspace

LIMITS = LoadLimits()


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed))
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside every root, with a readable image and names that must never be listed."""
    folder = tmp_path / "outside"
    write_png(folder / "secret.png", 99)
    (folder / "passwd").write_text("root:x:0:0")
    write_png(folder / "masks" / "crack" / "000.png", 98)
    return folder


def refusal(call, *args) -> str:
    with pytest.raises(DataError) as info:
        call(*args)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- the helper


def test_is_within_resolves_both_sides(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (tmp_path / "data2").mkdir()
    (root / "up").symlink_to(tmp_path)
    (tmp_path / "alias").symlink_to(root)
    assert is_within(root / "a", root) and is_within(root, root)
    assert not is_within(tmp_path / "data2", root), "a sibling sharing the prefix is not inside"
    assert not is_within(root / "a" / ".." / ".." / "data2", root)
    assert not is_within(root / "up" / "data2", root), "a symlink out of the root is outside"
    assert is_within(tmp_path / "alias" / "a", root), "a symlinked root still contains its own files"


# ----------------------------------------------------------------------------------------------- the listening address


@pytest.mark.parametrize("address", [None, "", "0.0.0.0", "::", "192.168.1.20", "qa-box.example.com"])
def test_server_paths_are_off_on_a_network_address_without_roots(tmp_path: Path, address: str | None) -> None:
    write_png(tmp_path / "data" / "a.png")
    policy = server_path_policy((), tmp_path / "work", address)
    assert not policy.enabled
    for raw in (str(tmp_path / "data"), "/etc", str(tmp_path / "data" / "a.png")):
        message = refusal(policy.folder, raw)
        assert message.startswith("Server folders are off") and "SOFTPATCH_SERVER_ROOTS" in message
        assert refusal(policy.file, raw) == message


def test_loopback_addresses() -> None:
    assert all(is_loopback(a) for a in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(a) for a in (None, "", "0.0.0.0", "::", "10.0.0.1", "example.com", "unix:///s"))


def test_localhost_allows_the_default_roots_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, app = tmp_path / "home", tmp_path / "app"
    write_png(home / "parts" / "a.png")
    write_png(tmp_path / "shared" / "data" / "b.png")
    app.mkdir()
    monkeypatch.setenv("HOME", str(home))
    policy = server_path_policy((), tmp_path / "work", "127.0.0.1", app_root=app)
    assert policy.roots == (home, app, tmp_path / "shared")
    assert policy.folder(str(home / "parts")) == home / "parts"
    assert policy.folder("~/parts") == home / "parts"
    assert policy.folder(str(app / ".." / "shared" / "data")) == tmp_path / "shared" / "data"
    for raw in ("/etc", "/etc/passwd", str(tmp_path / "elsewhere"), "/no/such/folder"):
        # The same refusal whether the path exists or not: nothing about it is revealed.
        assert "is outside the folders this server allows" in refusal(policy.folder, raw)
    assert "is outside the folders this server allows" in refusal(policy.file, "/etc/passwd")


def test_a_filesystem_root_is_never_a_default_root(tmp_path: Path) -> None:
    roots = default_roots(tmp_path / "app", home=Path("/"))
    assert Path("/") not in roots and roots == (tmp_path / "app", tmp_path / "shared")


def test_configured_roots_apply_on_any_address(tmp_path: Path) -> None:
    write_png(tmp_path / "srv" / "a.png")
    write_png(tmp_path / "srv2" / "a.png")
    policy = server_path_policy((tmp_path / "srv",), tmp_path / "work", "0.0.0.0")
    assert policy.enabled and policy.folder(str(tmp_path / "srv")) == tmp_path / "srv"
    assert "outside the folders" in refusal(policy.folder, str(tmp_path / "srv2"))
    assert "outside the folders" in refusal(policy.folder, str(tmp_path / "srv" / ".." / "srv2"))


def test_hidden_folders_below_a_root_are_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "srv" / ".ssh" / "id.png")
    policy = server_path_policy((tmp_path / "srv",), tmp_path / "work", "127.0.0.1")
    assert "hidden or system" in refusal(policy.folder, str(tmp_path / "srv" / ".ssh"))
    assert "hidden or system" in refusal(policy.file, str(tmp_path / "srv" / ".ssh" / "id.png"))


def test_hostile_typed_paths_are_one_line_messages(tmp_path: Path) -> None:
    policy = server_path_policy((tmp_path,), tmp_path / "work", "0.0.0.0")
    cases = {
        "": "type the path",
        "  '' ": "type the path",
        f"{tmp_path}/x\x00y": "is not a valid path",
        f"{tmp_path}/" + "a" * 5000: "not found on the server",
        f"{tmp_path}/" + "a/" * 3000: "not found on the server",
    }
    for raw, expected in cases.items():
        for call in (policy.folder, policy.file):
            message = refusal(call, raw)
            assert expected in message and "\n" not in message and "\x00" not in message and len(message) < 400


# ----------------------------------------------------------------------------------------------- the work folder


@pytest.fixture
def other_session(tmp_path: Path):
    """Another browser session's workspace, holding an uploaded image, under a root that contains the work folder."""
    ws = Workspace.create(tmp_path / "work")
    root, _ = save_uploads([("secret/part.png", png_bytes(7))], ws.subdir("uploads/train-1"))
    yield ws, root / "part.png"
    ws.remove()


def test_another_sessions_upload_cannot_be_opened_by_path(tmp_path: Path, other_session) -> None:
    ws, uploaded = other_session
    assert uploaded.is_file()
    policy = server_path_policy((tmp_path,), tmp_path / "work", "0.0.0.0")  # the root holds the work folder
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.png").symlink_to(uploaded)
    (tmp_path / "data" / "linkdir").symlink_to(ws.path)
    for raw in (
        str(tmp_path / "work"),
        str(ws.path),
        str(uploaded.parent),
        str(tmp_path / "data" / ".." / "work" / ws.path.name),
        str(tmp_path / "data" / "linkdir"),
    ):
        assert "inside the app's work folder" in refusal(policy.folder, raw), raw
    for raw in (str(uploaded), str(tmp_path / "data" / "link.png")):
        assert "inside the app's work folder" in refusal(policy.file, raw), raw


def test_scanning_a_root_that_holds_the_work_folder_skips_it(tmp_path: Path, other_session) -> None:
    ws, uploaded = other_session
    write_png(tmp_path / "data" / "own.png")
    (tmp_path / "data" / "link.png").symlink_to(uploaded)
    policy = server_path_policy((tmp_path,), tmp_path / "work", "0.0.0.0")
    folder = scan_images(policy.folder(str(tmp_path)), limits=LIMITS, scope=policy.scope)
    assert folder.names == ["data/own.png"]
    assert not any(is_within(r.path, tmp_path / "work") for r in folder.records)
    skipped = {s.path: s.reason for s in folder.skipped}
    assert skipped["work/"] == EXCLUDED_REASON and skipped["data/link.png"] == EXCLUDED_REASON
    assert not any(ws.path.name in s.path or "part.png" in s.path for s in folder.skipped), "nothing inside is named"


# ----------------------------------------------------------------------------------------------- symlinks out of a root


def test_a_symlinked_file_pointing_outside_a_root_is_refused(tmp_path: Path, outside: Path) -> None:
    srv = tmp_path / "srv"
    write_png(srv / "good.png")
    (srv / "evil.png").symlink_to(outside / "secret.png")
    policy = server_path_policy((srv,), tmp_path / "work", "0.0.0.0")
    message = refusal(policy.file, str(srv / "evil.png"))
    assert "is outside the folders this server allows" in message
    assert "secret" not in message and str(outside) not in message, "the link's target is not revealed"
    assert policy.file(str(srv / "good.png")) == srv / "good.png"


def test_scanning_a_folder_skips_symlinks_out_without_naming_their_target(tmp_path: Path, outside: Path) -> None:
    srv = tmp_path / "srv"
    write_png(srv / "good.png")
    (srv / "evil.png").symlink_to(outside / "secret.png")
    (srv / "etc").symlink_to(outside)
    policy = server_path_policy((srv,), tmp_path / "work", "0.0.0.0")
    folder = scan_images(policy.folder(str(srv)), limits=LIMITS, scope=policy.scope)
    assert folder.names == ["good.png"]
    assert {s.path: s.reason for s in folder.skipped} == {"etc/": OUTSIDE_REASON, "evil.png": OUTSIDE_REASON}
    text = " ".join(f"{s.path} {s.reason}" for s in folder.skipped)
    assert "secret" not in text and "passwd" not in text and str(outside) not in text


def test_no_skipped_list_for_a_folder_outside_the_roots(tmp_path: Path, outside: Path) -> None:
    policy = server_path_policy((tmp_path / "srv",), tmp_path / "work", "0.0.0.0")
    (tmp_path / "srv").mkdir()
    assert "outside the folders" in refusal(policy.folder, str(outside))
    # Even a caller that skips the typed-path check gets a refusal from the scan, not a listing.
    for call in (
        lambda: scan_images(outside, limits=LIMITS, scope=policy.scope),
        lambda: load_mvtec(outside, limits=LIMITS, scope=policy.scope),
        lambda: loading.read_training_folder(outside, limits=LIMITS, source="x", label="x", scope=policy.scope),
        lambda: loading.read_test_folder(outside, limits=LIMITS, source="x", label="x", scope=policy.scope),
    ):
        message = refusal(call)
        assert "outside the folders that may be read here" in message
        assert "passwd" not in message and "secret" not in message


def test_a_test_class_folder_symlinked_out_is_skipped_unread(tmp_path: Path, outside: Path) -> None:
    srv = tmp_path / "srv"
    write_png(srv / "test" / "good" / "000.png", 1)
    write_png(srv / "test" / "crack" / "000.png", 2)
    (srv / "test" / "leak").symlink_to(outside)
    policy = server_path_policy((srv,), tmp_path / "work", "0.0.0.0")
    split = loading.read_test_folder(policy.folder(str(srv)), limits=LIMITS, source="x", label="x", scope=policy.scope)
    assert sorted(split.folder.names) == ["crack/000.png", "good/000.png"]
    assert [(s.path, s.reason) for s in split.skipped] == [("leak/", OUTSIDE_REASON)]


# ----------------------------------------------------------------------------------------------- masks and dataset parts


def _class_folders(base: Path) -> None:
    write_png(base / "test" / "good" / "000.png", 1)
    write_png(base / "test" / "crack" / "000.png", 2)
    write_png(base / "ground_truth" / "crack" / "000.png", 3)


def test_masks_from_ground_truth_next_to_a_root_are_not_used(tmp_path: Path) -> None:
    cat = tmp_path / "cat"
    _class_folders(cat)
    # The root is the test folder itself: its ../ground_truth lies outside the root.
    policy = server_path_policy((cat / "test",), tmp_path / "work", "0.0.0.0")
    split = loading.read_test_folder(
        policy.folder(str(cat / "test")), limits=LIMITS, source="x", label="x", scope=policy.scope
    )
    assert split.labelled and split.n_defective == 1
    assert split.n_masks == 0, "a mask outside the allowed folders must not be used"
    # The same layout with the category as the root: the masks are inside it and are used.
    policy = server_path_policy((cat,), tmp_path / "work", "0.0.0.0")
    split = loading.read_test_folder(
        policy.folder(str(cat / "test")), limits=LIMITS, source="x", label="x", scope=policy.scope
    )
    assert split.n_masks == 1


def test_mask_folders_symlinked_out_are_not_used(tmp_path: Path, outside: Path) -> None:
    cat = tmp_path / "srv" / "cat"
    write_png(cat / "test" / "good" / "000.png", 1)
    write_png(cat / "test" / "crack" / "000.png", 2)
    (cat / "ground_truth").mkdir()
    (cat / "ground_truth" / "crack").symlink_to(outside / "masks" / "crack")
    policy = server_path_policy((cat,), tmp_path / "work", "0.0.0.0")
    split = loading.read_test_folder(policy.folder(str(cat)), limits=LIMITS, source="x", label="x", scope=policy.scope)
    assert split.n_defective == 1 and split.n_masks == 0
    # MVTec layout: the same symlinked mask folder is ignored there too.
    write_png(cat / "train" / "good" / "000.png", 4)
    ds = load_mvtec(cat, limits=LIMITS, scope=policy.scope)
    assert [r.mask_path for r in ds.test.records if r.label == 1] == [None]


def test_mvtec_parts_symlinked_out_are_refused(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "elsewhere" / "good").mkdir(parents=True)
    write_png(tmp_path / "elsewhere" / "good" / "000.png")
    cat = tmp_path / "cat"
    (cat / "train").mkdir(parents=True)
    (cat / "train" / "good").symlink_to(tmp_path / "elsewhere" / "good")
    message = refusal(load_mvtec, cat)  # refused by the core even without a scope
    assert "train/good/ is a symlink that points outside the folder" in message and "elsewhere" not in message
    (cat / "train" / "good").unlink()
    write_png(cat / "train" / "good" / "000.png")
    (cat / "test").symlink_to(outside)
    ds = load_mvtec(cat)
    assert len(ds.test) == 0 and [(s.path, s.reason) for s in ds.test.skipped] == [("test/", OUTSIDE_REASON)]


def test_a_demo_manifest_symlinked_out_is_ignored(tmp_path: Path) -> None:
    from softpatch.io.demo import MANIFEST_NAME, generate_demo_dataset, load_demo_manifest

    demo = generate_demo_dataset(tmp_path / "demo", seed=0)
    copy = tmp_path / "srv" / "cat"
    write_png(copy / "train" / "good" / "000.png")
    (copy / MANIFEST_NAME).symlink_to(demo / MANIFEST_NAME)
    assert load_demo_manifest(demo) is not None
    assert load_demo_manifest(copy) is None


def test_uploads_are_read_within_their_own_workspace(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "work")
    root, _ = save_uploads([("cat/test/good/000.png", png_bytes(1))], ws.subdir("uploads/test-1"))
    scope = ReadScope.of([ws.path])
    split = loading.read_test_folder(root, limits=LIMITS, source="zip", label="x", scope=scope)
    assert len(split) == 1
    other = Workspace.create(tmp_path / "work")
    message = refusal(lambda: scan_images(other.path, limits=LIMITS, scope=scope))
    assert "outside the folders that may be read here" in message


# ----------------------------------------------------------------------------------------------- through the app


@pytest.fixture
def listening():
    """Set the address Streamlit reports as listening on (``server.address``), restored afterwards."""
    from streamlit import config

    saved = config.get_option("server.address")
    yield lambda address: config.set_option("server.address", address)
    config.set_option("server.address", saved)


def _start():
    from streamlit.testing.v1 import AppTest

    repo = Path(__file__).resolve().parent.parent
    return AppTest.from_file(str(repo / "app.py"), default_timeout=180).run()


def _errors(at) -> str:
    return " | ".join(e.value for e in at.error)


def _load(at, kind: str, path: str) -> None:
    from tests.apptest_helpers import button

    at.radio(key=f"load_{kind}_method").set_value("server folder").run()
    at.text_input(key=f"load_{kind}_path").set_value(path).run()
    button(at, f"Load this {'training' if kind == 'train' else 'test'} folder").click().run()


def _add(at, text: str) -> None:
    from tests.apptest_helpers import button

    at.text_area(key="add_paths").set_value(text).run()
    button(at, "Add to the training set").click().run()


def test_app_on_every_interface_offers_no_server_folder(app_env: Path, listening) -> None:
    from tests.apptest_helpers import button, session

    listening(None)  # Streamlit's default: every interface
    at = _start()
    before = session(at).train
    at.radio(key="load_train_method").set_value("server folder").run()
    assert not at.exception
    assert any(i.value.startswith("Server folders are off") for i in at.info)
    assert not [t for t in at.text_input if t.key == "load_train_path"], "no path box while server folders are off"
    assert button(at, "Load this training folder").disabled
    assert at.text_area(key="add_paths").disabled
    # A request forged past the disabled widgets still meets the same refusal in the loader:
    # test_server_paths_are_off_on_a_network_address_without_roots. Nothing was loaded.
    assert session(at).train is before


def test_app_on_localhost_reads_the_home_folder_but_not_etc(
    app_env: Path, listening, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.apptest_helpers import session

    home = app_env / "home"
    for i in range(4):
        write_png(home / "parts" / f"{i}.png", i)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SOFTPATCH_SERVER_ROOTS", raising=False)
    listening("127.0.0.1")
    at = _start()
    _load(at, "train", "~/parts")
    assert not at.exception and not at.error, _errors(at)
    assert len(session(at).train) == 4
    before = session(at).train
    _load(at, "train", "/etc")
    assert "/etc is outside the folders this server allows" in _errors(at)
    assert session(at).train is before


def test_app_refuses_another_sessions_upload(app_env: Path, listening, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.apptest_helpers import button, session

    # The root holds the work folder (app_env/work): still never readable.
    monkeypatch.setenv("SOFTPATCH_SERVER_ROOTS", str(app_env))
    listening("0.0.0.0")
    victim = _start()
    victim.radio(key="load_train_method").set_value("browser folder").run()
    victim.file_uploader(key="load_train_dir").set_value(
        [(f"private/{i}.png", png_bytes(i), "image/png") for i in range(3)]
    ).run()
    button(victim, "Load this training folder").click().run()
    uploaded = session(victim).train.records[0].path
    assert is_within(uploaded, app_env / "work")

    attacker = _start()
    before = session(attacker).train
    _load(attacker, "train", str(uploaded.parent))
    assert "inside the app's work folder" in _errors(attacker)
    (app_env / "innocent.png").symlink_to(uploaded)
    _add(attacker, f"{uploaded}\n{app_env / 'innocent.png'}")
    assert "inside the app's work folder" in _errors(attacker)
    assert not attacker.exception and session(attacker).train is before
    assert not any(is_within(r.path, session(victim).workspace.path) for r in session(attacker).train.records)


def test_app_add_training_images_refuses_a_symlink_out_of_a_root(
    app_env: Path, listening, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.apptest_helpers import session

    srv = app_env / "srv"
    write_png(srv / "suspect.png", 5)
    (srv / "evil.png").symlink_to(outside / "secret.png")
    monkeypatch.setenv("SOFTPATCH_SERVER_ROOTS", str(srv))
    listening("0.0.0.0")
    at = _start()
    n = len(session(at).train)
    _add(at, str(srv / "evil.png"))
    message = _errors(at)
    assert "is outside the folders this server allows" in message and "secret" not in message
    assert len(session(at).train) == n
    # A folder holding the link adds its own image and lists the link without naming its target.
    _add(at, str(srv))
    assert not at.error, _errors(at)
    train = session(at).train
    assert len(train) == n + 1 and train.records[-1].name == "added/srv/suspect.png"
    assert [(s.path, s.reason) for s in train.skipped if "evil" in s.path] == [("added/srv/evil.png", OUTSIDE_REASON)]
    assert os.path.realpath(outside / "secret.png") not in {os.path.realpath(r.path) for r in train.records}


def test_a_workspace_subfolder_symlinked_out_is_refused(tmp_path: Path, outside: Path) -> None:
    ws = Workspace.create(tmp_path / "work")
    (ws.path / "uploads").symlink_to(outside)
    assert "invalid workspace folder name" in refusal(ws.subdir, "uploads/train-1")
    assert not (outside / "train-1").exists(), "nothing was created outside the workspace"
    assert ws.subdir("exports").parent == ws.path
