"""Files the user downloads: label CSVs, the cleaned file list and the cleaned folder as a .zip."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from softpatch.io.csvsafe import write_csv
from softpatch.io.datasets import ImageRecord
from softpatch.runtime.progress import report


def _csv(rows: Sequence[dict], fields: Sequence[str]) -> str:
    """The CSV text (cells that a spreadsheet would run as formulas are neutralised: ``softpatch.io.csvsafe``)."""
    buf = io.StringIO()
    write_csv(buf, rows, fields)
    return buf.getvalue()


def labels_csv(rows: Sequence[dict]) -> str:
    """One row per training image: rank, image, path, suspicion, removed_share, label ('' = not reviewed)."""
    return _csv(rows, ["rank", "image", "path", "suspicion", "removed_share", "label"])


def cleaned_list_csv(records: Sequence[ImageRecord], labels: dict[str, str]) -> str:
    """The training images that are kept (not marked defective), with their review label if any."""
    rows = [
        {"image": r.name, "path": str(r.path), "label": labels.get(r.name, "")}
        for r in records
        if labels.get(r.name) != "defective"
    ]
    return _csv(rows, ["image", "path", "label"])


def _arcname(name: str) -> str:
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    return "/".join(parts) or "image"


def cleaned_zip(records: Sequence[ImageRecord], labels: dict[str, str], dest: Path, progress=None) -> tuple[Path, int]:
    """Write the kept training images (not marked defective) into ``dest`` (.zip); returns (path, count).

    Images keep their relative names (e.g. train/good/001.png); they are stored, not recompressed.
    ``progress(fraction, "export: i/n images")`` is called as the images are packed.
    """
    kept = [r for r in records if labels.get(r.name) != "defective"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    used: set[str] = set()
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for r in kept:
            arc = _arcname(r.name)
            stem, n = arc, 1
            while arc in used:
                n += 1
                arc = f"{Path(stem).with_suffix('')}-{n}{Path(stem).suffix}"
            used.add(arc)
            zf.write(r.path, arcname=arc)
            report(progress, len(used) / len(kept), f"export: {len(used)}/{len(kept)} images")
    tmp.replace(dest)
    return dest, len(kept)


def download_name(dataset_name: str, suffix: str) -> str:
    """A downloaded file's name: the dataset's name without spaces (or 'softpatch'), a dash and ``suffix``."""
    return f"{dataset_name or 'softpatch'}-{suffix}".replace(" ", "_")
