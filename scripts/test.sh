#!/usr/bin/env bash
# Run the whole test suite: ./scripts/test.sh [extra pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ -f scripts/install_browser.sh ]; then
  # The real-browser test needs Debian's chromium; the script is idempotent and quiet when present.
  bash scripts/install_browser.sh || echo "softpatch: chromium could not be installed; the browser test will skip" >&2
fi
mkdir -p artifacts
exec python -m pytest "$@"
