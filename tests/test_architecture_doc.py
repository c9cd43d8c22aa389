"""docs/ARCHITECTURE.md matches the code: its reference block is what scripts/api_reference.py prints, and its
module table names every module."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_block_is_what_the_code_gives() -> None:
    api = _generator()
    doc = api.DOC.read_text(encoding="utf-8")
    block = api.embedded(doc)
    assert block is not None, "docs/ARCHITECTURE.md lacks the generated reference block"
    assert block == api.reference(), "docs/ARCHITECTURE.md is stale: run python scripts/api_reference.py --write"


def test_the_module_table_names_every_module() -> None:
    api = _generator()
    doc = api.DOC.read_text(encoding="utf-8")
    prose = doc[: doc.find(api.BEGIN)]
    named = set(re.findall(r"`([\w/]+\.py)`", prose))
    missing = []
    for path in api.modules():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py":
            continue  # a package __init__ holds its docstring and lazy public names only
        short = rel.split("/", 1)[1] if rel.startswith("softpatch/") else rel
        if rel not in named and short not in named:
            missing.append(rel)
    assert not missing, f"the module table of docs/ARCHITECTURE.md leaves out {missing}"


def test_a_stale_reference_is_detected(tmp_path: Path) -> None:
    api = _generator()
    block = api.reference()
    assert api.embedded("intro\n" + block) == block
    tampered = block.replace("-> SoftPatch`", "-> object`", 1)
    assert tampered != block and api.embedded("intro\n" + tampered) != api.reference()
