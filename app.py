"""SoftPatch app: vet a noisy training folder, tune the denoising, review, explore, detect and deploy.

Run with ``streamlit run app.py``. The pages live in ``pages/``; this file sets up navigation, the
per-session state and the sidebar (device, backbone and weights, dataset) shown on every page.
"""

import logging

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import StopException

from softpatch_app.guard import user_errors
from softpatch_app.project import save_project
from softpatch_app.state import get_session
from softpatch_app.ui import PAGES, sidebar

PAGE_TITLE = "SoftPatch – vet your training images"


def _navigation():
    """The pages, in the order of the workflow; returns the one to run."""
    return st.navigation(
        [
            st.Page(PAGES["data"], title="Data", icon=":material/folder_open:", default=True),
            st.Page(PAGES["denoise"], title="Denoise", icon=":material/tune:"),
            st.Page(PAGES["review"], title="Review", icon=":material/fact_check:"),
            st.Page(PAGES["coreset"], title="Coreset", icon=":material/scatter_plot:"),
            st.Page(PAGES["detect"], title="Detect", icon=":material/troubleshoot:"),
            st.Page(PAGES["deploy"], title="Deploy", icon=":material/rocket_launch:"),
        ]
    )


def main() -> None:
    st.set_page_config(page_title=PAGE_TITLE, page_icon=":material/healing:", layout="wide")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("softpatch_app").setLevel(logging.INFO)
    page = _navigation()
    session = None
    with user_errors("start this session"):
        session = get_session()
    if session is None:
        return
    sidebar_slot = st.sidebar.container()
    try:
        with user_errors():
            page.run()
    except StopException:
        pass  # a page ended early with st.stop(): the sidebar below is still drawn
    finally:
        # Also when a page reruns itself (st.rerun): what it just changed is on disk before a refresh can come.
        save_project(session)
    # Drawn after the page, so it shows what the page just did (a fit, a new folder).
    with sidebar_slot, user_errors("draw the sidebar"):
        sidebar(session)


main()
