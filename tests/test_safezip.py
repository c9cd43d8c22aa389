"""Untrusted zips (extract_zip), browser uploads (save_uploads) and session workspaces."""

from __future__ import annotations

import gc
import io
import os
import stat
import time
import zipfile
from pathlib import Path

import pytest

from softpatch.errors import DataError
from softpatch.io.datasets import SkippedFile, scan_images
from softpatch.io.limits import LoadLimits
from softpatch.io.safezip import (
    ExtractResult,
    _SizeExceeded,
    _write_member,
    extract_zip,
    safe_relative_parts,
    single_folder_root,
)
from softpatch_app.uploads import sanitize_upload_name, save_uploads
from softpatch_app.workspace import MARKER_NAME, Workspace, cleanup_stale, default_base, register_cleanup
from tests.hostile_corpus import (
    declared_bomb_zip,
    encode,
    encrypted_zip,
    lying_size_zip,
    make_zip,
    noise_image,
    symlink_entry,
    utf8_without_flag_zip,
    zeros_bomb_zip,
)

GOOD = encode(noise_image(16, 12), "PNG")


def _tree(path: Path) -> set[str]:
    """Every path under ``path`` (files, folders, links), relative: a snapshot to diff."""
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def _rel(result: ExtractResult, dest: Path) -> list[str]:
    return [p.relative_to(dest).as_posix() for p in result.extracted]


# ---------------------------------------------------------------- extract_zip


def test_extracts_folders_and_unicode_names(tmp_path: Path) -> None:
    data = make_zip([("b/x.png", GOOD), ("a/größe 01.png", GOOD), ("名前/画像.png", GOOD), ("dir/", b"")])
    dest = tmp_path / "out"
    result = extract_zip(data, dest)
    assert _rel(result, dest) == ["a/größe 01.png", "b/x.png", "名前/画像.png"]
    assert result.root == dest and result.skipped == []
    assert (dest / "a" / "größe 01.png").read_bytes() == GOOD


def test_cp437_fallback_for_utf8_names_without_the_flag(tmp_path: Path) -> None:
    result = extract_zip(utf8_without_flag_zip(GOOD, "bïld 01.png"), tmp_path)
    assert _rel(result, tmp_path) == ["bïld 01.png"]
    legacy = make_zip([("plain.png", GOOD)])
    assert _rel(extract_zip(legacy, tmp_path / "l"), tmp_path / "l") == ["plain.png"]


def test_root_is_the_single_top_folder(tmp_path: Path) -> None:
    data = make_zip([("bottle/train/good/a.png", GOOD), ("bottle/test/good/b.png", GOOD)])
    result = extract_zip(data, tmp_path)
    assert result.root == tmp_path / "bottle"
    assert single_folder_root(tmp_path, []) == tmp_path


@pytest.mark.parametrize(
    ("name", "keyword"),
    [
        ("../evil.txt", "'..'"),
        ("a/../../evil.txt", "'..'"),
        ("..\\evil.txt", "'..'"),
        ("/abs/evil.txt", "absolute"),
        ("C:\\Windows\\evil.txt", "absolute"),
        ("c:evil.txt", "absolute"),
        ("\\\\server\\share\\evil.txt", "absolute"),
    ],
)
def test_unsafe_paths_are_skipped(tmp_path: Path, name: str, keyword: str) -> None:
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "dest"
    sandbox.mkdir()
    before = _tree(tmp_path)
    result = extract_zip(make_zip([(name, b"x"), ("ok.png", GOOD)]), dest)
    assert [s.path for s in result.skipped] == [name]
    assert result.skipped[0].reason.startswith("unsafe path") and keyword in result.skipped[0].reason
    assert _rel(result, dest) == ["ok.png"]
    assert _tree(tmp_path) - before == {"sandbox/dest", "sandbox/dest/ok.png"}
    assert not Path("/abs/evil.txt").exists()


def test_safe_relative_parts() -> None:
    assert safe_relative_parts("a/./b//c.png") == (["a", "b", "c.png"], "")
    assert safe_relative_parts("a\\b.png") == (["a", "b.png"], "")
    assert safe_relative_parts("a/\x01b\x7f.png") == (["a", "b.png"], "")
    assert safe_relative_parts("./")[0] == []
    assert safe_relative_parts("a/\x00/b")[0] == []


def test_symlink_entries_are_not_extracted(tmp_path: Path) -> None:
    data = make_zip([(symlink_entry("link.png", "/etc/passwd"), b"/etc/passwd"), ("ok.png", GOOD)])
    result = extract_zip(data, tmp_path)
    assert result.skipped == [SkippedFile("link.png", "symbolic link not extracted")]
    assert not (tmp_path / "link.png").exists() and not (tmp_path / "link.png").is_symlink()


def test_special_file_entries_are_not_extracted(tmp_path: Path) -> None:
    fifo = zipfile.ZipInfo("pipe.png")
    fifo.create_system = 3
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    result = extract_zip(make_zip([(fifo, b""), ("ok.png", GOOD)]), tmp_path)
    assert [s.path for s in result.skipped] == ["pipe.png"]
    assert "not a regular file" in result.skipped[0].reason


def test_encrypted_nested_and_hidden_entries(tmp_path: Path) -> None:
    result = extract_zip(encrypted_zip(GOOD), tmp_path / "enc")
    assert result.skipped == [SkippedFile("secret.png", "encrypted (password-protected) entry not extracted")]
    assert _rel(result, tmp_path / "enc") == ["good.png"]
    nested = make_zip([("inner.zip", make_zip([("a.png", GOOD)])), ("x.tar.gz", b"x"), ("ok.png", GOOD)])
    result = extract_zip(nested, tmp_path / "nest")
    assert [(s.path, s.reason) for s in result.skipped] == [
        ("inner.zip", "nested archive not extracted"),
        ("x.tar.gz", "nested archive not extracted"),
    ]
    hidden = make_zip([("__MACOSX/._ok.png", b"x"), ("a/.DS_Store", b"x"), ("Thumbs.db", b"x"), ("ok.png", GOOD)])
    result = extract_zip(hidden, tmp_path / "hid")
    assert {s.reason for s in result.skipped} == {"hidden or system file"} and len(result.skipped) == 3
    assert not (tmp_path / "hid" / "__MACOSX").exists()


def test_zip_bomb_by_ratio_is_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zeros_bomb_zip(megabytes=64)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(str(name)) or real_open(self, name, *a, **k)
    )
    result = extract_zip(bomb, tmp_path)
    assert not any("zeros.bmp" in name for name in opened), "refused from the zip's directory, never inflated"
    assert [s.path for s in result.skipped] == ["zeros.bmp"]
    assert "compression ratio" in result.skipped[0].reason and "max_zip_ratio" in result.skipped[0].reason
    assert _tree(tmp_path) == set()  # nothing written, not even an empty file
    # Under a laxer ratio the same member extracts (it is honest about its size).
    lax = extract_zip(bomb, tmp_path / "lax", limits=LoadLimits(max_zip_ratio=5000))
    assert (tmp_path / "lax" / "zeros.bmp").stat().st_size == 64 << 20 and lax.skipped == []


def test_small_members_are_not_ratio_checked(tmp_path: Path) -> None:
    result = extract_zip(make_zip([("black.bmp", bytes(500_000))]), tmp_path)
    assert _rel(result, tmp_path) == ["black.bmp"]


def test_declared_total_over_limit_refuses_the_archive(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"would expand to 8\.0 GB, over the limit of 4\.0 GB"):
        extract_zip(declared_bomb_zip(GOOD), dest)
    assert not dest.exists()  # checked before anything is written
    small = make_zip([("a.png", GOOD), ("b.png", GOOD)])
    with pytest.raises(DataError, match="max_zip_uncompressed_bytes"):
        extract_zip(small, dest, limits=LoadLimits(max_zip_uncompressed_bytes=len(GOOD) + 1))


def test_declared_sizes_that_lie_are_caught_while_streaming(tmp_path: Path) -> None:
    result = extract_zip(lying_size_zip(GOOD), tmp_path)
    assert [s.path for s in result.skipped] == ["liar.bin"]
    assert "corrupt" in result.skipped[0].reason
    assert not (tmp_path / "liar.bin").exists()  # the partial file is removed
    assert _rel(result, tmp_path) == ["good.png"]


def test_streaming_counts_real_bytes(tmp_path: Path) -> None:
    """Belt and braces under zipfile's own size handling: the writer trusts no header."""

    class FakeZip:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

        def open(self, info: zipfile.ZipInfo) -> io.BytesIO:
            return io.BytesIO(self.payload)

    info = zipfile.ZipInfo("x.bin")
    info.file_size = 1000
    target = tmp_path / "x.bin"
    with pytest.raises(_SizeExceeded, match="more data than its header declares"):
        _write_member(FakeZip(b"x" * 3_000_000), info, target, budget=10**9)  # type: ignore[arg-type]
    assert not target.exists()
    info.file_size = 3_000_000
    with pytest.raises(_SizeExceeded, match="max_zip_uncompressed_bytes"):
        _write_member(FakeZip(b"x" * 3_000_000), info, target, budget=1_500_000)  # type: ignore[arg-type]
    assert not target.exists()
    assert _write_member(FakeZip(b"x" * 3_000_000), info, target, budget=3_000_000) == 3_000_000  # type: ignore[arg-type]


def test_member_count_and_upload_size_limits(tmp_path: Path) -> None:
    data = make_zip([(f"{i}.png", GOOD) for i in range(6)])
    with pytest.raises(DataError, match="6 entries, over the limit of 5"):
        extract_zip(data, tmp_path, limits=LoadLimits(max_zip_members=5))
    with pytest.raises(DataError, match="over the upload limit"):
        extract_zip(data, tmp_path, limits=LoadLimits(max_upload_bytes=100))
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    with pytest.raises(DataError, match="over the upload limit"):
        extract_zip(path, tmp_path / "x", limits=LoadLimits(max_upload_bytes=100))
    with pytest.raises(DataError, match="over the upload limit"):
        extract_zip(io.BytesIO(data), tmp_path / "x", limits=LoadLimits(max_upload_bytes=100))


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip at all", b"PK\x03\x04" + bytes(100), b"PK\x05\x06" + bytes(18)[:10]],
    ids=["empty", "text", "local-header-only", "short-eocd"],
)
def test_not_a_zip(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(DataError, match="not a valid zip archive"):
        extract_zip(data, tmp_path / "out")


def test_truncated_zip(tmp_path: Path) -> None:
    data = make_zip([("a.png", GOOD), ("b.png", GOOD)])
    with pytest.raises(DataError, match="not a valid zip archive"):
        extract_zip(data[: len(data) - 30], tmp_path / "out")


def test_damaged_member_data_is_skipped(tmp_path: Path) -> None:
    data = bytearray(make_zip([("a.png", GOOD), ("b.png", GOOD)], compression=zipfile.ZIP_STORED))
    data[60] ^= 0xFF  # inside a.png's stored bytes: CRC mismatch
    result = extract_zip(bytes(data), tmp_path)
    assert [s.path for s in result.skipped] == ["a.png"] and "corrupt" in result.skipped[0].reason
    assert _rel(result, tmp_path) == ["b.png"]


def test_duplicate_and_clashing_entries(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", GOOD)
        with pytest.warns(UserWarning):
            zf.writestr("a.png", b"second")
        zf.writestr("f", b"a file")
        zf.writestr("f/inside.png", GOOD)
    result = extract_zip(buf.getvalue(), tmp_path)
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["a.png"].startswith("duplicate entry")
    assert "clashes" in reasons["f/inside.png"]
    assert (tmp_path / "a.png").read_bytes() == GOOD


def test_sources_path_bytes_file_and_stream(tmp_path: Path) -> None:
    data = make_zip([("a.png", GOOD)])
    path = tmp_path / "in.zip"
    path.write_bytes(data)

    class Stream(io.RawIOBase):  # not seekable, like a socket
        def __init__(self) -> None:
            self._buf = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:
            chunk = self._buf.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    for i, source in enumerate([path, str(path), data, io.BytesIO(data), Stream()]):
        out = tmp_path / f"o{i}"
        assert _rel(extract_zip(source, out), out) == ["a.png"]
    with pytest.raises(DataError, match="archive not found"):
        extract_zip(tmp_path / "missing.zip", tmp_path / "x")


def test_existing_symlink_in_dest_is_not_followed(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    os.symlink(outside, dest / "sub")
    result = extract_zip(make_zip([("sub/evil.png", GOOD), ("ok.png", GOOD)]), dest)
    assert [s.path for s in result.skipped] == ["sub/evil.png"]
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------- save_uploads


def test_sanitize_upload_name() -> None:
    assert sanitize_upload_name("good/part 01.png") == ["good", "part 01.png"]
    assert sanitize_upload_name("../../etc/passwd") == ["etc", "passwd"]
    assert sanitize_upload_name("/abs/x.png") == ["abs", "x.png"]
    assert sanitize_upload_name("C:\\Users\\me\\x.png") == ["Users", "me", "x.png"]
    assert sanitize_upload_name("a\x00b\n.png") == ["ab.png"]
    assert sanitize_upload_name("../..") == []


def test_save_uploads_keeps_folders_and_stays_inside(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    dest = sandbox / "dest"
    before = _tree(tmp_path)
    files = [
        ("good/part 01.png", GOOD),
        ("bad/part 01.png", GOOD),  # same name, other folder: both kept
        ("../../escape.png", GOOD),
        ("/etc/abs.png", GOOD),
        ("C:\\temp\\win.png", GOOD),
        ("good/part 01.png", b"again"),  # repeated: first one kept
        (".DS_Store", b"x"),
        ("__MACOSX/._x.png", b"x"),
        ("big.png", b"x" * 2000),
        ("../", b"x"),
        ("x.tar.gz", b"x"),
    ]
    root, skipped = save_uploads(files, dest, limits=LoadLimits(max_upload_bytes=1000))
    assert root == dest
    assert sorted(_tree(dest)) == [
        "bad",
        "bad/part 01.png",
        "escape.png",
        "etc",
        "etc/abs.png",
        "good",
        "good/part 01.png",
        "temp",
        "temp/win.png",
    ]
    assert (dest / "good" / "part 01.png").read_bytes() == GOOD
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["good/part 01.png"].startswith("duplicate")
    assert reasons[".DS_Store"] == reasons["__MACOSX/._x.png"] == "hidden or system file"
    assert "over the upload limit" in reasons["big.png"]
    assert "empty" in reasons["../"]
    assert "archive type not supported" in reasons["x.tar.gz"]
    assert {p.split("/", 1)[0] for p in _tree(tmp_path) - before} == {"sandbox"}
    assert len(scan_images(root)) == 5


def test_save_uploads_extracts_zips_and_picks_the_root(tmp_path: Path) -> None:
    bottle = make_zip([("bottle/train/good/a.png", GOOD), ("bottle/test/good/b.png", GOOD), ("../evil.png", GOOD)])
    root, skipped = save_uploads([("bottle.zip", bottle)], tmp_path)
    assert root == tmp_path / "bottle" / "bottle"
    assert skipped == [SkippedFile("bottle.zip/../evil.png", "unsafe path: '..' would write outside the folder")]
    root, skipped = save_uploads([("broken.zip", b"garbage"), ("a.png", GOOD)], tmp_path / "two")
    assert root == tmp_path / "two"
    assert skipped[0].path == "broken.zip" and "not a valid zip archive" in skipped[0].reason


def test_save_uploads_file_count_limit(tmp_path: Path) -> None:
    files = [(f"{i}.png", GOOD) for i in range(4)]
    _, skipped = save_uploads(files, tmp_path, limits=LoadLimits(max_files=2))
    assert [s.path for s in skipped] == ["2.png", "3.png"]
    assert all("max_files=2" in s.reason for s in skipped)


def test_save_uploads_file_and_folder_clash(tmp_path: Path) -> None:
    _, skipped = save_uploads([("a", GOOD), ("a/b.png", GOOD)], tmp_path)
    assert [s.path for s in skipped] == ["a/b.png"] and "clashes" in skipped[0].reason


# ---------------------------------------------------------------- workspaces


def test_workspace_create_subdir_touch_remove(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path)
    assert ws.path.parent == tmp_path and ws.path.is_dir()
    assert stat.S_IMODE(ws.path.stat().st_mode) == 0o700
    assert (ws.path / MARKER_NAME).is_file()
    up = ws.subdir("uploads/run 1")
    assert up.is_dir() and up == ws.path / "uploads" / "run 1"
    for bad in ("../x", "/etc", "a/../../x", ""):
        with pytest.raises(DataError):
            ws.subdir(bad)
    os.utime(ws.path / MARKER_NAME, (1, 1))
    ws.touch()
    assert ws.last_activity() > 1, "touch records activity now, not the old time"
    other = Workspace.create(tmp_path)
    assert other.path != ws.path
    ws.remove()
    ws.remove()  # idempotent
    assert not ws.path.exists() and not ws.alive
    assert other.alive


def test_workspace_removed_on_garbage_collection(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path)
    path = ws.path
    del ws
    gc.collect()
    assert not path.exists()


def test_workspace_tied_to_an_owner(tmp_path: Path) -> None:
    class Session:
        pass

    owner = Session()
    ws = Workspace.create(tmp_path)
    register_cleanup(ws, owner)
    keep = ws  # the workspace object itself stays alive
    del owner
    gc.collect()
    assert not keep.path.exists()


def test_default_base_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTPATCH_WORK_DIR", str(tmp_path / "work"))
    assert default_base() == tmp_path / "work"
    ws = Workspace.create()
    assert ws.path.parent == tmp_path / "work"
    assert stat.S_IMODE((tmp_path / "work").stat().st_mode) == 0o700
    ws.remove()
    monkeypatch.delenv("SOFTPATCH_WORK_DIR")
    assert default_base().name == "softpatch-sessions"


def test_cleanup_stale_only_touches_old_workspaces(tmp_path: Path) -> None:
    old = Workspace.create(tmp_path)
    fresh = Workspace.create(tmp_path)
    (old.path / "data.png").write_bytes(GOOD)
    stranger = tmp_path / "not-ours"
    stranger.mkdir()
    os.utime(stranger, (1, 1))
    lookalike = tmp_path / "ws-fake"
    lookalike.mkdir()  # no marker file
    linked = tmp_path / "linked"
    os.symlink(old.path, linked)  # a symlink to a workspace is not itself a workspace
    os.utime(old.path / MARKER_NAME, (time.time() - 7200,) * 2)
    removed = cleanup_stale(tmp_path, max_age_s=3600)
    assert removed == [old.path]
    assert not old.path.exists() and fresh.path.exists()
    assert stranger.exists() and lookalike.exists() and linked.is_symlink()
    assert cleanup_stale(tmp_path / "missing") == []


def test_workspace_refuses_a_symlinked_base(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "base")
    with pytest.raises(DataError, match="not a plain folder"):
        Workspace.create(tmp_path / "base")
