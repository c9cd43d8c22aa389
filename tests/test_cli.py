"""The ``softpatch`` command, in-process: outputs, exit codes, one-line errors, and the hostile corpus."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softpatch.cli import main
from softpatch.deployment.bundle import save_bundle
from softpatch.method.model import SoftPatch
from tests.conftest import SyntheticSet
from tests.hostile_corpus import ABSOLUTE_TARGET, CorpusCase, build_corpus, check_scan, image_root

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--backbone", "resnet18", "--no-pretrained", "--resize", "72", "--crop", "64", "--device", "cpu"]
SKIPPED_LINE = re.compile(r"^skipped (.+?): (.+)$")


@pytest.fixture(autouse=True)
def _restore_global_state(monkeypatch: pytest.MonkeyPatch):
    # main() sets warnings.formatwarning and the timm logger level for the process; undo it after each test.
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    timm_logger = logging.getLogger("timm")
    level = timm_logger.level
    yield
    timm_logger.setLevel(level)


def run(args: list[str]) -> tuple[int, str, str]:
    """Run ``softpatch --quiet <args>`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--quiet", *args])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def skipped_lines(stderr: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for line in stderr.splitlines() if (m := SKIPPED_LINE.match(line))]


@pytest.fixture(scope="module")
def fitted_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic_set: SyntheticSet) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model.softpatch"
    torch.manual_seed(0)
    code, stdout, stderr = run(["fit", str(synthetic_set.train_dir), "-o", str(out), *SMALL])
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert f"fitted on {len(synthetic_set.train)} images" in stdout and "removed 15.0%" in stdout
    return out


# ---------------------------------------------------------------- fit and score


def test_fit_writes_a_bundle(fitted_bundle: Path) -> None:
    assert fitted_bundle.is_file() and fitted_bundle.stat().st_size > 1000
    assert list(fitted_bundle.parent.iterdir()) == [fitted_bundle], "no partial or stray files"


def test_fit_then_score_with_the_default_discriminator(tmp_path: Path, synthetic_set: SyntheticSet) -> None:
    bundle = tmp_path / "lof.softpatch"
    assert run(["fit", str(synthetic_set.train_dir), "-o", str(bundle), *SMALL])[0] == 0
    code, stdout, stderr = run(["score", str(bundle), *map(str, synthetic_set.test), "--device", "cpu"])
    assert code == 0 and "Traceback" not in stderr
    assert len(stdout.splitlines()) == len(synthetic_set.test)


def test_score_prints_one_line_per_image(fitted_bundle: Path, synthetic_set: SyntheticSet) -> None:
    code, stdout, stderr = run(["score", str(fitted_bundle), *map(str, synthetic_set.test), "--device", "cpu"])
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == len(synthetic_set.test)
    scores = {}
    for line in lines:
        value, path = line.split(maxsplit=1)
        scores[path] = float(value)
    assert set(scores) == {str(p) for p in synthetic_set.test}
    good = [scores[str(p)] for p in synthetic_set.test_good]
    bad = [scores[str(p)] for p in synthetic_set.test_bad]
    assert min(bad) > max(good), "the blob images score higher"


def test_score_json_document(fitted_bundle: Path, synthetic_set: SyntheticSet) -> None:
    code, stdout, _ = run(["score", str(fitted_bundle), str(synthetic_set.test_good[0].parent), "--json"])
    assert code == 0
    document = json.loads(stdout)
    assert document["threshold"] is None and document["skipped"] == []
    results = document["results"]
    assert [r["path"] for r in results] == [str(p) for p in synthetic_set.test_good]
    assert all(set(r) == {"path", "score"} and isinstance(r["score"], float) for r in results)


def test_score_with_a_threshold_marks_anomalies(
    tmp_path: Path, small_config, extractor, train_embeddings, synthetic_set: SyntheticSet
) -> None:
    model = SoftPatch(small_config.replace(discriminator="nearest"), extractor=extractor)
    model.fit_embeddings(train_embeddings)
    scores = model.score(synthetic_set.test, with_maps=False).image_scores
    n_good = len(synthetic_set.test_good)
    threshold = float((scores[:n_good].max() + scores[n_good:].min()) / 2)
    bundle = save_bundle(model, tmp_path / "t.softpatch", threshold=threshold)
    code, stdout, _ = run(["score", str(bundle), *map(str, synthetic_set.test), "--json"])
    assert code == 0
    document = json.loads(stdout)
    assert document["threshold"] == pytest.approx(threshold)
    assert [r["anomalous"] for r in document["results"]] == [False] * n_good + [True] * len(synthetic_set.test_bad)
    code, stdout, _ = run(["score", str(bundle), *map(str, synthetic_set.test)])
    verdicts = [line.split()[-1] for line in stdout.splitlines()]
    assert verdicts == ["ok"] * n_good + ["ANOMALOUS"] * len(synthetic_set.test_bad)


def test_fit_with_a_false_alarm_target_stores_the_threshold_from_good_images(
    tmp_path: Path, synthetic_set: SyntheticSet
) -> None:
    bundle = tmp_path / "thr.softpatch"
    torch.manual_seed(0)
    assert len(synthetic_set.defective) == 2
    first = synthetic_set.train[synthetic_set.defective[0]]
    # One known by its file name, the other found as the most suspicious remaining image.
    options = ["--threshold-fpr", "0.01", "--threshold-folds", "4", "--threshold-exclude", first.name]
    options += ["--threshold-exclude-top", "1"]
    code, stdout, stderr = run(["fit", str(synthetic_set.train_dir), "-o", str(bundle), *SMALL, *options])
    assert code == 0, stderr
    summary = stdout.splitlines()[-1]
    n_good = len(synthetic_set.train) - len(synthetic_set.defective)
    assert f"0 of {n_good} good images flagged out of sample" in summary and "with 95% confidence" in summary
    assert "2 images excluded" in summary  # the named one and the most suspicious other (the second defect)
    code, stdout, _ = run(["score", str(bundle), *map(str, synthetic_set.test), "--json"])
    document = json.loads(stdout)
    assert f"threshold {document['threshold']:.4f}" in summary  # the bundle carries the threshold printed
    assert [r["anomalous"] for r in document["results"]] == [False] * len(synthetic_set.test_good) + [True] * len(
        synthetic_set.test_bad
    )


def test_score_heatmaps_are_written_at_the_original_size(
    tmp_path: Path, fitted_bundle: Path, synthetic_set: SyntheticSet
) -> None:
    folder = tmp_path / "heat"
    code, _, stderr = run(["score", str(fitted_bundle), *map(str, synthetic_set.test_bad), "--heatmaps", str(folder)])
    assert code == 0, stderr
    written = sorted(folder.glob("*.png"))
    assert len(written) == len(synthetic_set.test_bad)
    for path, source in zip(written, synthetic_set.test_bad, strict=True):
        assert source.stem in path.name
        with Image.open(path) as image:
            assert image.size == (80, 80) and image.mode == "RGB"
            assert np.asarray(image).std() > 0


def test_score_lists_unreadable_files_on_stderr_and_in_json(
    tmp_path: Path, fitted_bundle: Path, synthetic_set: SyntheticSet
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in synthetic_set.test_good:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(synthetic_set.test_bad[0].read_bytes()[:100])
    code, stdout, stderr = run(["score", str(fitted_bundle), str(folder), str(broken), "--json"])
    assert code == 0 and "Traceback" not in stderr
    document = json.loads(stdout)
    assert len(document["results"]) == len(synthetic_set.test_good)
    assert [s["path"] for s in document["skipped"]] == [str(broken)]
    assert document["skipped"][0]["reason"]
    skipped = dict(skipped_lines(stderr))
    assert "notes.txt" in skipped and "not an image" in skipped["notes.txt"]
    assert str(broken) in skipped


# ---------------------------------------------------------------- vet


def test_vet_csv(tmp_path: Path, synthetic_set: SyntheticSet) -> None:
    train = tmp_path / "train"
    shutil.copytree(synthetic_set.train_dir, train)
    (train / "readme.txt").write_text("hello")
    (train / "cut.png").write_bytes(synthetic_set.train[0].read_bytes()[:200])
    out = tmp_path / "vet.csv"
    torch.manual_seed(0)
    code, stdout, stderr = run(["vet", str(train), "--csv", str(out), *SMALL])
    assert code == 0, stderr
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["rank", "path", "suspicion", "removed_fraction"]
    body = rows[1:]
    assert len(body) == len(synthetic_set.train)
    assert [int(r[0]) for r in body] == list(range(1, len(body) + 1))
    assert {Path(r[1]).name for r in body} == {p.name for p in synthetic_set.train}
    suspicion = [float(r[2]) for r in body]
    assert suspicion == sorted(suspicion, reverse=True)
    assert all(0.0 <= float(r[3]) <= 1.0 for r in body)
    top = {Path(r[1]).name for r in body[: len(synthetic_set.defective)]}
    assert top == {synthetic_set.train[i].name for i in synthetic_set.defective}
    skipped = dict(skipped_lines(stderr))
    assert set(skipped) == {"readme.txt", "cut.png"}
    assert all(reason for reason in skipped.values())
    assert len(stdout.splitlines()) == len(body) + 1  # the ranking, then the duplicates line
    assert stdout.splitlines()[-1].startswith("duplicates: 0 of 0 test images are also in the training folder; 0 ")


def test_vet_reports_duplicates_and_leaks(tmp_path: Path, synthetic_set: SyntheticSet) -> None:
    train = tmp_path / "train"
    shutil.copytree(synthetic_set.train_dir, train)
    shutil.copy(train / "004.png", train / "004_again.png")
    test = tmp_path / "test"
    test.mkdir()
    for path in synthetic_set.test_good:
        shutil.copy(path, test / path.name)
    shutil.copy(train / "003.png", test / "leak.png")  # a planted defect, also in the test folder
    torch.manual_seed(0)
    code, stdout, stderr = run(["vet", str(train), "--test-dir", str(test), *SMALL])
    assert code == 0, stderr
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("duplicates: "))
    n_test = len(synthetic_set.test_good) + 1
    assert lines[start] == (
        f"duplicates: 1 of {n_test} test images are also in the training folder; 1 training images repeat another "
        "(1 groups); checked by identical pixels and features"
    )
    assert lines[start + 1].split() == ["exact", "leak", str(train / "003.png"), "=", "test:", str(test / "leak.png")]
    assert lines[start + 2].split() == ["exact", "train", f"{train / '004.png'},", str(train / "004_again.png")]


# ---------------------------------------------------------------- bench


def test_bench_json(mvtec_root: Path) -> None:
    torch.manual_seed(0)
    code, stdout, stderr = run(
        [
            "bench",
            str(mvtec_root),
            *SMALL,
            "--methods",
            "patchcore,softpatch-lof",
            "--noise",
            "0.2",
            "--overlap",
            "--json",
        ]
    )
    assert code == 0, stderr
    document = json.loads(stdout)
    assert set(document) == {"config", "results"}
    config = document["config"]
    assert config["n_train"] == 12 + 2 and config["n_injected"] == 2 and config["n_test"] == {"overlap": 10}
    assert config["backbone"] == "resnet18" and config["weights"] == "random" and config["protocols"] == ["overlap"]
    assert [r["method"] for r in document["results"]] == ["patchcore", "softpatch-lof"]
    for result in document["results"]:
        assert set(result) == {"method", "protocol", "image_auroc", "pixel_auroc", "aupro", "fit_s", "score_s"}
        assert result["protocol"] == "overlap"
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= result[key] <= 1.0
        assert result["fit_s"] >= 0 and result["score_s"] >= 0


def test_bench_table(mvtec_root: Path) -> None:
    code, stdout, _ = run(["bench", str(mvtec_root), *SMALL, "--methods", "softpatch-nearest", "--noise", "0.1"])
    assert code == 0
    lines = stdout.splitlines()
    # Default: both protocols, from one fit.
    assert "1 injected" in lines[0] and "10 test overlap" in lines[0] and "9 test no-overlap" in lines[0]
    assert lines[1].split()[:2] == ["method", "protocol"]
    assert [line.split()[:2] for line in lines[3:]] == [
        ["softpatch-nearest", "overlap"],
        ["softpatch-nearest", "no-overlap"],
    ]


@pytest.mark.parametrize(
    ("options", "protocols"),
    [
        (["--protocol", "both"], ["overlap", "no-overlap"]),
        (["--protocol", "no-overlap"], ["no-overlap"]),
        (["--protocol", "overlap"], ["overlap"]),
        (["--overlap"], ["overlap"]),  # the old flag, kept as an alias
    ],
    ids=["both", "no-overlap", "overlap", "overlap-alias"],
)
def test_bench_protocol_option_in_json(mvtec_root: Path, options: list[str], protocols: list[str]) -> None:
    argv = ["bench", str(mvtec_root), *SMALL, "--methods", "softpatch-nearest", "--noise", "0.2", "--json", *options]
    code, stdout, stderr = run(argv)
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["config"]["protocols"] == protocols
    assert [r["protocol"] for r in document["results"]] == protocols
    assert document["config"]["n_test"] == {p: {"overlap": 10, "no-overlap": 8}[p] for p in protocols}


def test_bench_unknown_protocol_is_one_line(mvtec_root: Path) -> None:
    code, stdout, stderr = run(["bench", str(mvtec_root), *SMALL, "--protocol", "sideways"])
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "--protocol" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------- errors: one line, never a traceback


@pytest.fixture(scope="module")
def junk(tmp_path_factory: pytest.TempPathFactory, synthetic_set: SyntheticSet) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("junk")
    garbage_weights = root / "garbage.pt"
    garbage_weights.write_bytes(b"\x00not torch\x00")
    garbage_bundle = root / "garbage.softpatch"
    garbage_bundle.write_bytes(b"this is no bundle at all")
    only_junk = root / "only_junk"
    only_junk.mkdir()
    (only_junk / "a.txt").write_text("x")
    broken = root / "broken.png"
    broken.write_bytes(synthetic_set.train[0].read_bytes()[:50])
    return {"weights": garbage_weights, "bundle": garbage_bundle, "only_junk": only_junk, "broken": broken}


def _bad_calls(train: str, out: str, bundle: str, mvtec: str, junk: dict[str, Path], tmp: str) -> dict[str, list[str]]:
    fit = ["fit", train, "-o", out, *SMALL]
    return {
        "no-command": [],
        "threshold-fpr-1": [*fit, "--threshold-fpr", "1"],
        "threshold-fpr-text": [*fit, "--threshold-fpr", "often"],
        "threshold-folds-1": [*fit, "--threshold-fpr", "0.01", "--threshold-folds", "1"],
        "threshold-exclude-unknown": [*fit, "--threshold-fpr", "0.01", "--threshold-exclude", "nope.png"],
        "threshold-exclude-all": [*fit, "--threshold-fpr", "0.01", "--threshold-exclude-top", "99"],
        "vet-near-ratio-negative": ["vet", train, *SMALL, "--near-ratio", "-1"],
        "vet-missing-test-dir": ["vet", train, *SMALL, "--test-dir", f"{tmp}/missing"],
        "fit-missing-folder": ["fit", f"{tmp}/missing", "-o", out, *SMALL],
        "fit-file-as-folder": ["fit", str(junk["broken"]), "-o", out, *SMALL],
        "fit-junk-only-folder": ["fit", str(junk["only_junk"]), "-o", out, *SMALL],
        "tau-2": [*fit, "--tau", "2"],
        "tau-text": [*fit, "--tau", "abc"],
        "layers-x": [*fit, "--layers", "x"],
        "layers-decreasing": [*fit, "--layers", "3,2"],
        "layers-out-of-range": [*fit, "--layers", "9"],
        "backbone-kwargs-list": [*fit, "--backbone-kwargs", "[1]"],
        "backbone-kwargs-not-json": [*fit, "--backbone-kwargs", "{bad"],
        "backbone-kwargs-unknown": [*fit, "--backbone-kwargs", '{"no_such_option": 1}'],
        "bad-weights-file": [*fit, "--weights", str(junk["weights"])],
        "missing-weights-file": [*fit, "--weights", f"{tmp}/missing.safetensors"],
        "unknown-backbone": ["fit", train, "-o", out, *SMALL[2:], "--backbone", "no_such_net"],
        "crop-over-resize": [*fit, "--crop", "300"],
        "lof-k-0": [*fit, "--lof-k", "0"],
        "coreset-ratio-0": [*fit, "--coreset-ratio", "0"],
        "batch-size-0": [*fit, "--batch-size", "0"],
        "unknown-discriminator": [*fit, "--discriminator", "forest"],
        "score-missing-bundle": ["score", f"{tmp}/missing.softpatch", train],
        "score-garbage-bundle": ["score", str(junk["bundle"]), train],
        "score-missing-image": ["score", bundle, f"{tmp}/missing.png"],
        "score-unreadable-image": ["score", bundle, str(junk["broken"])],
        "score-junk-folder": ["score", bundle, str(junk["only_junk"])],
        "vet-csv-in-missing-folder": ["vet", train, *SMALL, "--csv", f"{tmp}/no/such/dir/v.csv"],
        "bench-unknown-method": ["bench", mvtec, *SMALL, "--methods", "foo"],
        "bench-too-much-noise": ["bench", mvtec, *SMALL, "--noise", "5"],
        "bench-not-mvtec": ["bench", train, *SMALL],
    }


BAD_CALLS = list(
    _bad_calls("t", "o", "b", "m", dict.fromkeys(("weights", "bundle", "only_junk", "broken"), Path()), "x")
)


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_arguments_give_one_clear_line(
    tmp_path: Path, case: str, synthetic_set: SyntheticSet, fitted_bundle: Path, mvtec_root: Path, junk: dict
) -> None:
    out = tmp_path / "m.softpatch"
    calls = _bad_calls(str(synthetic_set.train_dir), str(out), str(fitted_bundle), str(mvtec_root), junk, str(tmp_path))
    code, _, stderr = run(calls[case])
    assert code != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if not line.startswith(("skipped ", "warning: "))]
    if code == 2 and lines and lines[0].startswith("usage:"):
        assert "error:" in lines[-1]  # argparse's own usage error
    else:
        assert len(lines) == 1, stderr
        assert lines[0].startswith("softpatch: error: ")
        assert len(lines[0]) > len("softpatch: error: ") + 10
    assert not out.exists(), "a failed fit writes no bundle"


def test_cuda_requested_without_a_gpu(synthetic_set: SyntheticSet, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, stderr = run(["fit", str(synthetic_set.train_dir), "-o", str(tmp_path / "m"), *SMALL, "--device", "cuda"])
    assert code == 2 and stderr.startswith("softpatch: error: ") and "cuda" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_pretrained_default_backbone_offline_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_set: SyntheticSet
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(name, str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache), raising=False)
    code, _, stderr = run(["fit", str(synthetic_set.train_dir), "-o", str(tmp_path / "m.softpatch"), "--device", "cpu"])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softpatch: error: ")
    assert lines[0].endswith("(options: --weights, --no-pretrained)")


def test_core_error_messages_name_no_command_line_option() -> None:
    """Core errors name settings (``weights``); only the CLI turns them into options (``--weights``)."""
    import ast

    option = re.compile(r"(?<![\w-])--[a-z]")
    found = []
    for path in sorted((REPO / "softpatch").rglob("*.py")):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if option.search(node.value):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:60]!r}")
    assert found == []


def test_unwritable_output_is_one_line(synthetic_set: SyntheticSet) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc as an unwritable folder")
    code, _, stderr = run(["fit", str(synthetic_set.train_dir), "-o", "/proc/softpatch-test.softpatch", *SMALL])
    assert code != 0 and "Traceback" not in stderr
    assert stderr.strip().startswith("softpatch: error: ")


# ---------------------------------------------------------------- the hostile corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, CorpusCase]]:
    dest = tmp_path_factory.mktemp("hostile")
    return dest, build_corpus(dest)


def _snapshot(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` (symlinks not followed) with its size."""
    return {str(p.relative_to(folder)): p.lstat().st_size for p in folder.rglob("*")}


@pytest.mark.slow
def test_hostile_corpus_through_vet_fit_and_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus: tuple[Path, dict[str, CorpusCase]]
) -> None:
    dest, cases = corpus
    root = image_root(dest).resolve()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    outputs = tmp_path / "out"
    before_corpus = _snapshot(dest)
    before_siblings = sorted(os.listdir(tmp_path.parent))

    # vet: every readable image ranked, every other file listed with its reason
    outputs.mkdir()
    code, stdout, stderr = run(["vet", str(root), "--csv", str(outputs / "vet.csv"), *SMALL, "--lof-k", "3"])
    assert code == 0, stderr
    assert "Traceback" not in stderr
    with open(outputs / "vet.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    used = [Path(r["path"]).resolve().relative_to(root).as_posix() for r in rows]
    skipped = skipped_lines(stderr)
    problems = check_scan(cases, root, used, skipped)
    assert not problems, "\n".join(problems)
    lines = stdout.splitlines()
    ranking_end = next(i for i, line in enumerate(lines) if line.startswith("duplicates: "))
    assert ranking_end == len(rows)  # one line per ranked image, then the duplicate check

    # fit + score over the same folder
    bundle = outputs / "hostile.softpatch"
    code, stdout, stderr = run(["fit", str(root), "-o", str(bundle), *SMALL, "--discriminator", "nearest"])
    assert code == 0 and "Traceback" not in stderr, stderr
    assert f"fitted on {len(rows)} images" in stdout
    assert check_scan(cases, root, used, skipped_lines(stderr)) == []
    code, stdout, stderr = run(["score", str(bundle), str(root), "--json", "--heatmaps", str(outputs / "heat")])
    assert code == 0 and "Traceback" not in stderr, stderr
    results = json.loads(stdout)["results"]
    assert sorted(Path(r["path"]).resolve().relative_to(root).as_posix() for r in results) == sorted(used)
    assert all(np.isfinite(r["score"]) for r in results)
    assert check_scan(cases, root, used, skipped_lines(stderr)) == []
    assert len(list((outputs / "heat").glob("*.png"))) == len(results)

    # nothing written anywhere but the outputs we asked for
    assert list(cwd.iterdir()) == []
    assert _snapshot(dest) == before_corpus
    assert sorted(os.listdir(tmp_path.parent)) == before_siblings
    assert not Path(ABSOLUTE_TARGET.format(os.getpid())).exists()


# ---------------------------------------------------------------- the real entry points


@pytest.mark.slow
def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "softpatch", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("fit", "score", "vet", "bench"):
        assert command in proc.stdout
    assert proc.stderr == ""


@pytest.mark.slow
def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "softpatch"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run(
        [str(script), "--quiet", "fit", str(tmp_path / "missing"), "-o", str(tmp_path / "m"), "--no-pretrained"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"softpatch: error: folder not found: {tmp_path / 'missing'}"]
