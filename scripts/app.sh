#!/usr/bin/env bash
# Start the app on the built-in demo data: ./scripts/app.sh [extra streamlit args]
# Listens on this machine only (127.0.0.1) unless an address is given, e.g. --server.address 0.0.0.0 to serve
# a team; then server folders are off until SOFTPATCH_SERVER_ROOTS names the folders to share (SECURITY.md).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
address=(--server.address 127.0.0.1)
for arg in "$@"; do
  case "$arg" in
    --server.address | --server.address=*) address=() ;;
  esac
done
if [ -n "${STREAMLIT_SERVER_ADDRESS:-}" ]; then
  address=()  # Streamlit's own environment variable for the same option
fi
exec python -m streamlit run app.py ${address[@]+"${address[@]}"} "$@"  # (the +-form: empty arrays under set -u in old bash)
