"""The generated hostile corpus through every loader: images, folders, zips and uploads.

For each input: readable images are used, unusable ones are listed with a reason that names the
problem, a clear ``DataError`` comes when nothing usable is left, and nothing is written outside the
destination folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from softpatch.errors import DataError, ImageLoadError, SoftPatchError
from softpatch.io.datasets import ImageFolder, scan_images
from softpatch.io.images import ImageTransform, failure_reason, load_image
from softpatch.io.safezip import extract_zip
from softpatch_app.uploads import save_uploads
from tests.hostile_corpus import ABSOLUTE_TARGET, CorpusCase, build_corpus, check_extract, check_scan, image_root

# Skip reasons that come from decoding (the others come from the folder walk and never reach load_image).
DECODE_KEYWORDS = ("truncated", "empty file", "not an image", "html", "unsupported image format", "over the limit")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, CorpusCase]]:
    dest = tmp_path_factory.mktemp("hostile")
    return dest, build_corpus(dest)


@pytest.fixture(scope="module")
def scanned(corpus: tuple[Path, dict[str, CorpusCase]]) -> ImageFolder:
    dest, _ = corpus
    return scan_images(image_root(dest))


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def test_corpus_covers_the_brief(corpus: tuple[Path, dict[str, CorpusCase]]) -> None:
    _, cases = corpus
    must_have = {
        "truncated_png", "truncated_jpeg", "zero_bytes", "text_as_png", "html_as_png", "png_named_jpg",
        "bomb_30000", "large_8000x6000", "one_pixel", "wide_4000x3", "tall_3x4000", "gray16_png", "cmyk_jpeg",
        "palette_transparency", "rgba_png", "animated_gif", "multipage_tiff", "exif_rotated_jpeg", "unicode_name",
        "spaces_name", "same_name_a", "same_name_b", "ds_store", "macosx_resource", "thumbs_db", "deep_nesting",
        "empty_folder", "single_image_folder", "missing_folder", "file_not_folder", "symlink_file_outside",
        "zip_traversal:../evil_traversal.txt", "zip_absolute:good.png", "zip_symlink:link.png",
        "zip_bomb_ratio:zeros.bmp", "zip_bomb_declared", "zip_nested:inner.zip", "zip_encrypted:secret.png",
        "zip_truncated",
    }  # fmt: skip
    assert must_have <= set(cases)
    assert all(c.expected in ("used", "skipped", "error") for c in cases.values())


def test_folder_scan_uses_and_skips_as_expected(
    corpus: tuple[Path, dict[str, CorpusCase]], scanned: ImageFolder
) -> None:
    dest, cases = corpus
    problems = check_scan(
        cases, image_root(dest), [r.relpath for r in scanned.records], [(s.path, s.reason) for s in scanned.skipped]
    )
    assert problems == []
    n_used = sum(c.kind == "image" and c.expected == "used" for c in cases.values())
    assert len(scanned) == n_used


def test_every_skip_reason_is_one_readable_line(scanned: ImageFolder) -> None:
    for s in scanned.skipped:
        assert s.reason and "\n" not in s.reason and "Traceback" not in s.reason
        assert not s.reason.startswith(("[Errno", "cannot identify image file"))  # no raw Pillow/OS text


def test_load_image_on_each_image_case(corpus: tuple[Path, dict[str, CorpusCase]]) -> None:
    _, cases = corpus
    for name, case in cases.items():
        if case.kind != "image" or case.path.is_symlink():
            continue
        if case.expected == "used":
            image = load_image(case.path)
            assert image.mode == "RGB" and min(image.size) >= 1, name
        elif case.reason != "not an image file type" and any(k in case.reason for k in DECODE_KEYWORDS):
            with pytest.raises(ImageLoadError) as excinfo:
                load_image(case.path)
            assert case.reason in failure_reason(excinfo.value).lower(), name
            assert str(case.path) in str(excinfo.value)


def test_used_images_go_through_the_transform(scanned: ImageFolder) -> None:
    transform = ImageTransform(64, 56)
    for record in scanned.records:
        tensor = transform(load_image(record.path))
        assert tensor.shape == (3, 56, 56) and bool(tensor.isfinite().all()), record.name


def test_specific_decodes(corpus: tuple[Path, dict[str, CorpusCase]]) -> None:
    _, cases = corpus
    assert load_image(cases["exif_rotated_jpeg"].path).size == (20, 40)
    gray16 = np.asarray(load_image(cases["gray16_png"].path))[..., 0]
    assert gray16.max() == 255 and len(np.unique(gray16)) > 32  # scaled, not clipped to a few levels
    assert load_image(cases["large_8000x6000"].path).size == (8000, 6000)
    assert load_image(cases["wide_4000x3"].path).size == (4000, 3)
    a, b = (np.asarray(load_image(cases[k].path)) for k in ("same_name_a", "same_name_b"))
    assert not np.array_equal(a, b)


def test_bomb_message_names_the_size_and_the_setting(scanned: ImageFolder) -> None:
    reasons = {s.path: s.reason for s in scanned.skipped}
    assert reasons["bombs/bomb_30000x30000.png"] == (
        "image is 30000x30000 = 900,000,000 pixels, over the limit of 50,000,000 (LoadLimits.max_image_pixels)"
    )


@pytest.mark.parametrize(
    "name", ["missing_folder", "file_not_folder", "empty_folder", "junk_only_folder", "single_image_folder"]
)
def test_folder_roots(corpus: tuple[Path, dict[str, CorpusCase]], name: str) -> None:
    _, cases = corpus
    case = cases[name]
    if case.expected == "used":
        assert len(scan_images(case.path)) == 1
        return
    with pytest.raises(DataError) as excinfo:
        scan_images(case.path)
    message = str(excinfo.value)
    assert case.reason in message.lower() and "\n" not in message
    assert str(case.path) in message


def test_junk_only_folder_summarises_reasons(corpus: tuple[Path, dict[str, CorpusCase]]) -> None:
    _, cases = corpus
    with pytest.raises(DataError) as excinfo:
        scan_images(cases["junk_only_folder"].path)
    message = str(excinfo.value)
    assert "3 files skipped" in message
    assert "not an image file type" in message and "hidden or system file" in message and "truncated" in message


def test_unreadable_folder_is_a_clear_error(
    corpus: tuple[Path, dict[str, CorpusCase]], monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, _ = corpus
    target = dest / "single"
    real_access = os.access
    # Tests may run as root, where chmod 000 does not stop reads: simulate the refusal instead.
    monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == target else real_access(p, m, **kw))
    with pytest.raises(DataError, match="permission denied"):
        scan_images(target)


def _archives(cases: dict[str, CorpusCase]) -> list[Path]:
    return sorted({c.path for c in cases.values() if c.kind == "zip"})


def test_every_archive_extracts_as_expected_and_stays_inside(
    corpus: tuple[Path, dict[str, CorpusCase]], tmp_path: Path
) -> None:
    _, cases = corpus
    absolute = Path(ABSOLUTE_TARGET.format(os.getpid()))
    for archive in _archives(cases):
        sandbox = tmp_path / archive.stem
        dest = sandbox / "dest"
        sandbox.mkdir()
        before = _tree(tmp_path)

        def run(path: Path, dest: Path = dest) -> tuple[list[str], list[tuple[str, str]]]:
            shutil.rmtree(dest, ignore_errors=True)
            result = extract_zip(path, dest)
            return [p.relative_to(dest).as_posix() for p in result.extracted], [
                (s.path, s.reason) for s in result.skipped
            ]

        assert check_extract(cases, archive, run) == [], archive.name
        new = _tree(tmp_path) - before
        assert all(p == f"{archive.stem}/dest" or p.startswith(f"{archive.stem}/dest/") for p in new), new
        assert not absolute.exists()
        assert not (tmp_path / "evil_traversal.txt").exists() and not (tmp_path.parent / "evil_traversal.txt").exists()


def test_archives_as_browser_uploads(corpus: tuple[Path, dict[str, CorpusCase]], tmp_path: Path) -> None:
    _, cases = corpus
    dest = tmp_path / "uploads"
    uploads = [(a.name, a.read_bytes()) for a in _archives(cases)]
    root, skipped = save_uploads(uploads, dest)
    assert root == dest
    assert {p.split("/", 1)[0] for p in _tree(tmp_path)} == {"uploads"}
    refused = {s.path for s in skipped if "/" not in s.path}
    assert refused == {f"{c.path.name}" for c in cases.values() if c.kind == "zip" and c.expected == "error"}
    folder = scan_images(root)
    extracted_good = sum(c.kind == "zip" and c.expected == "used" for c in cases.values())
    assert len(folder) == extracted_good


def test_image_files_as_browser_uploads(corpus: tuple[Path, dict[str, CorpusCase]], tmp_path: Path) -> None:
    dest, cases = corpus
    root_in = image_root(dest)
    files = []
    for case in cases.values():
        # Zips are extracted on upload; test_archives_as_browser_uploads covers them.
        if case.kind == "image" and case.path.is_file() and not case.path.is_symlink() and case.path.suffix != ".zip":
            files.append((case.path.relative_to(root_in).as_posix(), case.path.read_bytes()))
    files.append(("../../../../escape.png", files[0][1]))
    out = tmp_path / "uploads"
    root, skipped = save_uploads(files, out)
    assert {p.split("/", 1)[0] for p in _tree(tmp_path)} == {"uploads"}
    folder = scan_images(root)
    used = {
        c.path.relative_to(root_in).as_posix() for c in cases.values() if c.kind == "image" and c.expected == "used"
    }
    assert used | {"escape.png"} == set(folder.names)
    assert all(s.reason == "hidden or system file" for s in skipped)


def test_errors_are_softpatch_errors_with_one_line(corpus: tuple[Path, dict[str, CorpusCase]], tmp_path: Path) -> None:
    _, cases = corpus
    for case in cases.values():
        if case.kind == "zip" and case.expected == "error":
            with pytest.raises(SoftPatchError) as excinfo:
                extract_zip(case.path, tmp_path / case.path.stem)
            assert "\n" not in str(excinfo.value)
