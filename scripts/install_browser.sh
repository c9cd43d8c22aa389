#!/usr/bin/env bash
# Installs what the real-browser test needs, only if it is missing (safe to run again):
#   - Debian's chromium and chromium-driver (apt; needs root or passwordless sudo)
#   - selenium into the project's virtual environment (pip)
# Usage: scripts/install_browser.sh [path/to/python]   (default: .venv/bin/python next to this script)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

have() { command -v "$1" >/dev/null 2>&1; }

find_chromium() {
    for name in chromium chromium-browser google-chrome; do
        if have "$name"; then echo "$name"; return 0; fi
    done
    return 1
}

if find_chromium >/dev/null && have chromedriver; then
    echo "install_browser: chromium and chromedriver already present"
else
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        if have sudo && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
            echo "install_browser: chromium missing and not root (no passwordless sudo); cannot install" >&2
            exit 2
        fi
    fi
    if ! have apt-get; then
        echo "install_browser: chromium missing and apt-get not available; install chromium + chromedriver by hand" >&2
        exit 2
    fi
    echo "install_browser: installing chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
fi

if "$PY" -c "import selenium" 2>/dev/null; then
    echo "install_browser: selenium already installed"
else
    echo "install_browser: installing selenium into $PY"
    "$PY" -m pip install -q "selenium>=4.20"
fi
echo "install_browser: ready ($(find_chromium), $(command -v chromedriver))"
