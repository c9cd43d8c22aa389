# Sourced by app.sh and test.sh: create or reuse .venv and install whatever is missing.
# Re-installs only when requirements*.txt or pyproject.toml change (a hash stamp in the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3}"

if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
  echo "softpatch: needs Python 3.10+ ($PYTHON_BIN not found)" >&2
  exit 1
fi
if ! "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "softpatch: needs Python 3.10+, found $("$PYTHON_BIN" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "softpatch: creating virtual environment in $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.softpatch-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "softpatch: installing dependencies (first run downloads torch, a few GB)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$WANT" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
