"""Folder scanning, the MVTec AD layout and the noisy split."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch.errors import DataError
from softpatch.io.datasets import (
    PROGRESS_EVERY,
    Dataset,
    ImageFolder,
    ImageRecord,
    SkippedFile,
    load_mvtec,
    make_noisy_split,
    scan_images,
)
from softpatch.io.limits import LoadLimits
from tests.hostile_corpus import encode, noise_image

REAL_DATA = Path("/work/shared/data")


def _png(seed: int = 0, size: tuple[int, int] = (12, 10)) -> bytes:
    return encode(noise_image(*size, seed=seed), "PNG")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- records


def test_records_are_frozen_and_named() -> None:
    rec = ImageRecord(Path("/data/a/b.png"))
    assert (rec.label, rec.defect, rec.mask_path, rec.name) == (0, "good", None, "b.png")
    assert ImageRecord(Path("/data/a/b.png"), relpath="a/b.png").name == "a/b.png"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.label = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SkippedFile("x", "y").reason = "z"  # type: ignore[misc]


# ---------------------------------------------------------------- scan_images


def test_scan_is_recursive_sorted_and_keeps_same_names(tmp_path: Path) -> None:
    for i, rel in enumerate(["b/same.png", "a/same.png", "z.png", "a/sub/x.jpg", "part 01 ü.png", "A.PNG"]):
        _write(tmp_path / rel, _png(i))
    folder = scan_images(tmp_path)
    assert isinstance(folder, ImageFolder)
    assert folder.names == ["A.PNG", "a/same.png", "a/sub/x.jpg", "b/same.png", "part 01 ü.png", "z.png"]
    assert len(folder) == 6 and folder.skipped == []
    assert folder.paths[1] == tmp_path / "a" / "same.png"
    assert all(r.path.is_absolute() and r.label == 0 for r in folder)
    assert scan_images(tmp_path).records == folder.records  # deterministic


def test_scan_decides_by_content_and_lists_reasons(tmp_path: Path) -> None:
    _write(tmp_path / "good.png", _png())
    _write(tmp_path / "png_named.jpg", _png(1))
    _write(tmp_path / "noext", _png(2))
    _write(tmp_path / "page.png", b"<html><body>not found</body></html>")
    _write(tmp_path / "cut.png", _png(3, (64, 64))[:300])
    _write(tmp_path / "notes.txt", b"hello")
    _write(tmp_path / "data.csv", b"a,b")
    _write(tmp_path / ".DS_Store", b"x")
    _write(tmp_path / "Thumbs.db", b"x")
    _write(tmp_path / "__MACOSX" / "._good.png", b"x")
    _write(tmp_path / ".cache" / "a.png", _png())
    folder = scan_images(tmp_path)
    assert folder.names == ["good.png", "noext", "png_named.jpg"]
    reasons = {s.path: s.reason for s in folder.skipped}
    assert reasons == {
        ".DS_Store": "hidden or system file",
        ".cache/": "hidden or system folder",
        "Thumbs.db": "hidden or system file",
        "__MACOSX/": "hidden or system folder",
        "cut.png": "truncated or corrupt image data",
        "data.csv": "not an image file type",
        "notes.txt": "not an image file type",
        "page.png": "not an image: looks like HTML (a web page saved under an image name?)",
    }


def test_scan_file_limit(tmp_path: Path) -> None:
    for i in range(5):
        _write(tmp_path / f"{i}.png", _png(i))
    folder = scan_images(tmp_path, limits=LoadLimits(max_files=3))
    assert folder.names == ["0.png", "1.png", "2.png"]
    assert [(s.path, s.reason) for s in folder.skipped] == [
        ("3.png", "over the file limit (LoadLimits.max_files=3)"),
        ("4.png", "over the file limit (LoadLimits.max_files=3)"),
    ]


def test_scan_root_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        scan_images(tmp_path / "missing")
    a_file = _write(tmp_path / "x.png", _png())
    with pytest.raises(DataError, match="is a file, not a folder"):
        scan_images(a_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder is empty"):
        scan_images(tmp_path / "empty")


def test_scan_summarises_why_nothing_is_usable(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", b"x")
    _write(tmp_path / "b.txt", b"x")
    _write(tmp_path / "c.json", b"{}")
    _write(tmp_path / "d.png", b"")
    _write(tmp_path / "e.png", _png(0, (64, 64))[:200])
    with pytest.raises(DataError) as excinfo:
        scan_images(tmp_path)
    message = str(excinfo.value)
    assert message == (
        f"no readable images in {tmp_path}: 5 files skipped (3 not an image file type, "
        "1 empty file (0 bytes), 1 truncated or corrupt image data)"
    )


def test_scan_unreadable_root_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "a.png", _png())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(DataError, match="permission denied"):
        scan_images(tmp_path)


def test_scan_unreadable_root_scandir_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "a.png", _png())
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="permission denied"):
        scan_images(tmp_path)


def test_scan_unreadable_subfolder_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "ok" / "a.png", _png())
    _write(tmp_path / "locked" / "b.png", _png())
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    folder = scan_images(tmp_path)
    assert folder.names == ["ok/a.png"]
    assert folder.skipped == [SkippedFile("locked/", "folder cannot be read (permission denied)")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_scan_unreadable_root_and_subfolder_chmod(tmp_path: Path) -> None:
    _write(tmp_path / "ok" / "a.png", _png())
    locked = _write(tmp_path / "locked" / "b.png", _png()).parent
    locked.chmod(0)
    try:
        folder = scan_images(tmp_path)
        assert folder.names == ["ok/a.png"]
        assert folder.skipped == [SkippedFile("locked/", "folder cannot be read (permission denied)")]
        (tmp_path / "ok").chmod(0)
        with pytest.raises(DataError, match="permission denied"):
            scan_images(tmp_path / "ok")
    finally:
        locked.chmod(0o755)
        (tmp_path / "ok").chmod(0o755)


def test_scan_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(root / "real" / "a.png", _png())
    outside = _write(tmp_path / "outside" / "secret.png", _png(1)).parent
    os.symlink(outside / "secret.png", root / "leak.png")
    os.symlink(outside, root / "leakdir")
    os.symlink(root, root / "real" / "loop")  # a loop back to the root
    os.symlink(root / "real", root / "alias")  # inside: scanned once, under the real name
    folder = scan_images(root)
    assert folder.names == ["real/a.png"]
    reasons = {s.path: s.reason for s in folder.skipped}
    assert reasons == {
        "alias/": "symlink to a folder that is already scanned",
        "leak.png": "symlink points outside the folder",
        "leakdir/": "symlink points outside the folder",
        "real/loop/": "symlink to a folder that is already scanned",
    }


def test_scan_follows_inside_symlinked_folder_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(tmp_path / "root" / "zz_store" / "a.png", _png())
    os.symlink(root / "zz_store", root / "aa_link")
    os.symlink(root / "zz_store" / "a.png", root / "b_link.png")
    folder = scan_images(root)
    assert folder.names == ["zz_store/a.png"]  # the real folder wins over the link that sorts first
    assert {s.path for s in folder.skipped} == {"aa_link/", "b_link.png"}


def test_scan_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    _write(tmp_path / "real" / "a.png", _png())
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert scan_images(tmp_path / "link").names == ["a.png"]


def test_scan_deep_nesting(tmp_path: Path) -> None:
    deep = "/".join(f"level{i}" for i in range(25))
    _write(tmp_path / deep / "x.png", _png())
    assert scan_images(tmp_path).names == [f"{deep}/x.png"]


def test_scan_2000_images_lists_each_once_in_order_and_reports_progress(tmp_path: Path) -> None:
    data = _png(0, (32, 32))
    for i in range(2000):
        (tmp_path / f"{i:04d}.png").write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an image")
    heard: list[tuple[float, str]] = []
    folder = scan_images(tmp_path, progress=lambda fraction, message: heard.append((fraction, message)))
    assert folder.names == [f"{i:04d}.png" for i in range(2000)] and len(folder.skipped) == 1
    # Every PROGRESS_EVERY files and once at the end, in order, all in the loading stage.
    assert len(heard) == 2000 // PROGRESS_EVERY + 1
    assert [f for f, _ in heard] == sorted(f for f, _ in heard) and heard[-1][0] == 1.0
    assert heard[0][1] == f"loading: {PROGRESS_EVERY} of 2,000 files checked"
    assert heard[-1][1] == "loading: 2,000 of 2,000 files checked"


def test_load_mvtec_reports_each_part_and_its_masks(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "bottle")
    heard: list[tuple[float, str]] = []
    load_mvtec(root, progress=lambda fraction, message: heard.append((fraction, message)))
    finished = [m for f, m in heard if f == 1.0]
    assert finished == [
        "loading: 4 of 4 files of train/good/ checked",
        "loading: 3 of 3 files of test/crack/ checked",
        "loading: 2 of 2 files of test/good/ checked",
        "loading: 2 of 2 files of test/scratch/ checked",
        "loading: 4 of 4 masks checked",
    ]


# ---------------------------------------------------------------- MVTec AD layout


def _mask_png(shape: tuple[int, int] = (10, 12), value: int = 255) -> bytes:
    arr = np.zeros(shape, dtype=np.uint8)
    arr[2:5, 3:7] = value
    return encode(Image.fromarray(arr), "PNG")


def _mvtec(root: Path) -> Path:
    for i in range(4):
        _write(root / "train" / "good" / f"{i:03d}.png", _png(i))
    _write(root / "test" / "good" / "000.png", _png(10))
    _write(root / "test" / "good" / "001.png", _png(11))
    _write(root / "test" / "crack" / "000.png", _png(20))  # mask with the _mask suffix
    _write(root / "test" / "crack" / "001.png", _png(21))  # mask with the same file name
    _write(root / "test" / "crack" / "002.jpg", _png(22))  # mask with the same stem, other extension
    _write(root / "test" / "scratch" / "000.png", _png(30))  # no mask at all
    _write(root / "test" / "scratch" / "001.png", _png(31))  # unreadable mask
    _write(root / "test" / "readme.txt", b"x")
    _write(root / "ground_truth" / "crack" / "000_mask.png", _mask_png())
    _write(root / "ground_truth" / "crack" / "001.png", _mask_png())
    _write(root / "ground_truth" / "crack" / "002.png", _mask_png())
    _write(root / "ground_truth" / "crack" / "999_mask.png", _mask_png())  # no test image: ignored
    _write(root / "ground_truth" / "scratch" / "001_mask.png", b"<html></html>")
    return root


def test_load_mvtec(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "bottle")
    ds = load_mvtec(root)
    assert isinstance(ds, Dataset)
    assert ds.name == "bottle" and ds.root == root
    assert ds.train.names == [f"train/good/{i:03d}.png" for i in range(4)]
    assert all(r.label == 0 and r.defect == "good" and r.mask_path is None for r in ds.train)
    summary = [(r.name, r.label, r.defect, r.mask_path and r.mask_path.relative_to(root).as_posix()) for r in ds.test]
    assert summary == [
        ("test/crack/000.png", 1, "crack", "ground_truth/crack/000_mask.png"),
        ("test/crack/001.png", 1, "crack", "ground_truth/crack/001.png"),
        ("test/crack/002.jpg", 1, "crack", "ground_truth/crack/002.png"),
        ("test/good/000.png", 0, "good", None),
        ("test/good/001.png", 0, "good", None),
        ("test/scratch/000.png", 1, "scratch", None),
        ("test/scratch/001.png", 1, "scratch", None),
    ]
    reasons = {s.path: s.reason for s in ds.test.skipped}
    assert reasons["test/readme.txt"] == "not inside a test/<defect>/ folder"
    assert reasons["ground_truth/scratch/001_mask.png"].startswith("mask not used: not an image")
    assert ds.test.labels.tolist() == [1, 1, 1, 0, 0, 1, 1]


def test_load_mvtec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        load_mvtec(tmp_path / "missing")
    _write(tmp_path / "cat" / "test" / "good" / "a.png", _png())
    with pytest.raises(DataError, match="train/good/ is missing"):
        load_mvtec(tmp_path / "cat")
    _write(tmp_path / "cat" / "train" / "good" / "a.txt", b"x")
    with pytest.raises(DataError, match="no readable images"):
        load_mvtec(tmp_path / "cat")


def test_load_mvtec_without_test_folder(tmp_path: Path) -> None:
    _write(tmp_path / "cat" / "train" / "good" / "a.png", _png())
    ds = load_mvtec(tmp_path / "cat")
    assert len(ds.train) == 1 and len(ds.test) == 0


@pytest.mark.skipif(not (REAL_DATA / "battery_weld").is_dir(), reason="real data not present")
def test_load_mvtec_on_real_battery_weld() -> None:
    ds = load_mvtec(REAL_DATA / "battery_weld")
    assert len(ds.train) == 37
    assert len(ds.test) == 128
    defective = [r for r in ds.test if r.label == 1]
    assert len(defective) == 93 and all(r.mask_path is not None and r.defect == "defective" for r in defective)
    assert all(r.mask_path.name == r.path.name for r in defective)  # masks named like their image
    assert sum(r.label == 0 for r in ds.test) == 35
    assert ds.train.skipped == [] and ds.test.skipped == []


# ---------------------------------------------------------------- noisy split


def _dataset(n_train: int = 10, n_good: int = 3, n_bad: int = 6) -> Dataset:
    train = [ImageRecord(Path(f"/d/train/good/{i}.png"), relpath=f"train/good/{i}.png") for i in range(n_train)]
    test = [ImageRecord(Path(f"/d/test/good/{i}.png")) for i in range(n_good)]
    test += [ImageRecord(Path(f"/d/test/bad/{i}.png"), label=1, defect="bad") for i in range(n_bad)]
    return Dataset(
        Path("/d"), "d", ImageFolder(Path("/d/train/good"), train, []), ImageFolder(Path("/d/test"), test, [])
    )


def test_noise_zero_leaves_train_unchanged() -> None:
    ds = _dataset()
    split = make_noisy_split(ds, noise=0.0, overlap=False, seed=0)
    assert split.train == ds.train.records and split.test == ds.test.records and split.injected == []


@pytest.mark.parametrize("overlap", [False, True])
def test_noisy_split(overlap: bool) -> None:
    ds = _dataset()
    split = make_noisy_split(ds, noise=0.3, overlap=overlap, seed=1)
    assert len(split.injected) == 3
    assert all(r.label == 1 for r in split.injected)
    assert split.train == ds.train.records + split.injected
    if overlap:
        assert split.test == ds.test.records
    else:
        assert len(split.test) == len(ds.test.records) - 3
        assert not set(split.injected) & set(split.test)
    again = make_noisy_split(ds, noise=0.3, overlap=overlap, seed=1)
    assert again.injected == split.injected  # reproducible
    draws = {tuple(r.path for r in make_noisy_split(ds, noise=0.3, overlap=overlap, seed=s).injected) for s in range(8)}
    assert len(draws) > 1  # the seed matters


def test_noise_fraction_rounding() -> None:
    ds = _dataset(n_train=100, n_bad=40)
    assert len(make_noisy_split(ds, noise=0.29, overlap=True, seed=0).injected) == 29


def test_noisy_split_errors() -> None:
    ds = _dataset(n_train=10, n_bad=2)
    with pytest.raises(DataError, match=r"needs 3 anomalous test images .* has only 2"):
        make_noisy_split(ds, noise=0.3, overlap=False, seed=0)
    with pytest.raises(DataError, match="noise must be"):
        make_noisy_split(ds, noise=-0.1, overlap=False, seed=0)
    with pytest.raises(DataError, match="noise must be"):
        make_noisy_split(ds, noise=float("nan"), overlap=False, seed=0)
