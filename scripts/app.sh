#!/usr/bin/env bash
# Start the app on the built-in demo data: ./scripts/app.sh [extra streamlit args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python -m streamlit run app.py "$@"
