"""Print the outcome of every case of the hostile-input corpus (tests/hostile_corpus.py) as a Markdown table.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/hostile_inputs_table.py``.
The tests assert these outcomes; this script shows them for a report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from softpatch.errors import SoftPatchError
from softpatch.io.datasets import scan_images
from softpatch.io.safezip import extract_zip
from tests.hostile_corpus import build_corpus, image_root


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = build_corpus(work / "corpus")
        folder = scan_images(image_root(work / "corpus"))
        used = {str(r.path) for r in folder.records}
        skipped = {s.path: s.reason for s in folder.skipped}
        print("| case | kind | expected | outcome |\n| --- | --- | --- | --- |")
        for name, case in cases.items():
            if case.kind == "image":
                path = str(case.path)
                reason = next((r for p, r in skipped.items() if path.endswith(p.rstrip("/")) or p == path), None)
                outcome = "used" if path in used else f"skipped: {reason or '(inside a skipped folder)'}"
            elif case.kind == "zip":
                try:
                    result = extract_zip(case.path, work / "out" / name.replace(":", "_").replace("/", "_"))
                    hits = [s for s in result.skipped if not case.member or case.member in s.path]
                    outcome = f"{len(result.extracted)} extracted; " + (
                        f"skipped: {hits[0].reason}" if hits else "nothing skipped"
                    )
                except SoftPatchError as exc:
                    outcome = f"refused: {exc}"
            else:
                try:
                    found = scan_images(case.path)
                    outcome = f"used {len(found.records)}, skipped {len(found.skipped)}"
                except SoftPatchError as exc:
                    outcome = f"refused: {exc}"
            print(f"| {name} | {case.kind} | {case.expected} | {outcome[:120]} |")


if __name__ == "__main__":
    main()
