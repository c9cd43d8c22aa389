"""Every page only gathers values and draws: no session state of its own, no work at the module's top level.

A page's module holds imports, constants and function definitions, and ends with one ``main()`` call; it never
touches ``st.session_state`` (per-user state lives in ``softpatch_app.state.SessionData``, widget values are
read and written through ``softpatch_app.state``'s functions under the keys of ``softpatch_app.keys``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "pages").glob("*.py"))
SCRIPTS = [REPO / "app.py", *PAGES]  # every script Streamlit runs


def session_state_uses(tree: ast.AST) -> list[int]:
    """Lines that name ``session_state`` (as an attribute, a name or an imported name)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "session_state":
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id == "session_state":
            lines.append(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            "session_state" in (a.asname or a.name) for a in node.names
        ):
            lines.append(node.lineno)
    return lines


def _is_constant(node: ast.stmt) -> bool:
    """``NAME = value`` (or annotated) binding UPPER_CASE names only, with no call in the value."""
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign):
        targets, value = [node.target], node.value
    else:
        return False
    names = [t for t in targets if isinstance(t, ast.Name)]
    if len(names) != len(targets) or not all(t.id.isupper() for t in names):
        return False
    return value is None or not any(isinstance(n, ast.Call) for n in ast.walk(value))


def _is_main_call(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "main"
        and not node.value.args
        and not node.value.keywords
    )


def top_level_problems(tree: ast.Module) -> list[str]:
    """What a thin page may not hold at its top level, as 'line N: what'; [] for a thin page."""
    problems = []
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the module docstring
    main_calls = [n for n in body if _is_main_call(n)]
    if len(main_calls) != 1 or not body or main_calls[0] is not body[-1]:
        problems.append("the module must end with exactly one main() call")
    if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in body):
        problems.append("no main() is defined")
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)) or _is_main_call(node):
            continue
        if _is_constant(node):
            continue
        problems.append(f"line {node.lineno}: {type(node).__name__} at the top level")
    return problems


def test_there_are_pages() -> None:
    assert len(PAGES) == 6, [p.name for p in PAGES]


@pytest.mark.parametrize("page", SCRIPTS, ids=lambda p: p.name)
def test_page_never_touches_session_state(page: Path) -> None:
    tree = ast.parse(page.read_text(encoding="utf-8"))
    assert session_state_uses(tree) == [], f"{page.name} uses st.session_state"


@pytest.mark.parametrize("page", SCRIPTS, ids=lambda p: p.name)
def test_page_top_level_is_definitions_and_one_main_call(page: Path) -> None:
    tree = ast.parse(page.read_text(encoding="utf-8"))
    assert top_level_problems(tree) == [], page.name


# The checks themselves: they must catch what today's thin pages no longer do (the pages before issue 10).
SCRIPT_PAGE = '''"""A page as a script."""
import streamlit as st
from softpatch_app.state import get_session

session = get_session()
st.title("Data")
if st.session_state.get("load_train_path"):
    st.write("x")
'''
SEEDING_PAGE = '''"""Widget state set in the page."""
import streamlit as st

KEYS = ("dn_tau",)


def seed(key, value):
    if key not in st.session_state:
        st.session_state[key] = value


def main():
    seed("dn_tau", 0.1)


main()
'''


def test_the_checks_catch_a_script_page() -> None:
    tree = ast.parse(SCRIPT_PAGE)
    assert session_state_uses(tree) == [7]
    problems = top_level_problems(tree)
    assert "the module must end with exactly one main() call" in problems
    assert "no main() is defined" in problems
    assert any(p.startswith("line 5: Assign") for p in problems)
    assert any(p.startswith("line 6: Expr") for p in problems)
    assert any(p.startswith("line 7: If") for p in problems)


def test_the_checks_catch_widget_state_written_inside_functions() -> None:
    tree = ast.parse(SEEDING_PAGE)
    assert top_level_problems(tree) == []  # its shape is thin...
    assert session_state_uses(tree) == [8, 9]  # ...but it keeps state of its own


def test_a_computed_top_level_value_is_not_a_constant() -> None:
    tree = ast.parse('"""x."""\nimport os\nROOT = os.getcwd()\n\n\ndef main():\n    pass\n\n\nmain()\n')
    assert top_level_problems(tree) == ["line 3: Assign at the top level"]
