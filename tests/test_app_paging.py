"""AppTest: long lists show one page at a time (the demo's 34 training and 20 test images, small pages).

Only the shown page's thumbnails are made; a page number from the browser that does not exist is clamped.
"""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from softpatch_app import cache
from softpatch_app.keys import DENOISE, LOADERS
from tests.apptest_helpers import APP, button


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def showing(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith("Showing")]


@pytest.fixture
def thumbnails_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the Data page makes thumbnails of, in order."""
    made: list[str] = []
    real = cache.thumbnail_png

    def counting(path, *args, **kwargs):
        made.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache, "thumbnail_png", counting)
    return made


def test_data_page_draws_one_page_of_thumbnails(app_env, thumbnails_made: list[str]) -> None:
    at = AppTest.from_file(APP, default_timeout=180).run()
    clean(at)
    assert [n.label for n in at.number_input] == ["Page (of 2)", "Page (of 2)"]  # train 34 / 24, test 20 / 12
    assert showing(at) == ["Showing 1–24 of 34 images.", "Showing 1–12 of 20 images."]
    assert len(at.get("image")) == 36
    assert len(thumbnails_made) == 36 and len(set(thumbnails_made)) == 36

    thumbnails_made.clear()
    at.number_input(key=LOADERS["train"].thumbnails_page).set_value(2).run()
    clean(at)
    assert showing(at) == ["Showing 25–34 of 34 images.", "Showing 1–12 of 20 images."]
    assert len(at.get("image")) == 10 + 12 and len(thumbnails_made) == 22


def _paged_list() -> None:
    import streamlit as st

    from softpatch_app.ui import page_controls

    span = page_controls("items_page", 34, 12, noun="items")
    st.write(f"span {span.page} {span.start} {span.stop}")


@pytest.mark.parametrize(("hostile", "page"), [(10**9, 3), (-4, 1), ("abc", 1), (float("nan"), 1), ("2", 2), (None, 1)])
def test_a_page_number_that_does_not_exist_is_clamped(hostile: object, page: int) -> None:
    at = AppTest.from_function(_paged_list)
    at.session_state["items_page"] = hostile  # e.g. left over from a longer list, or sent by a browser
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.number_input(key="items_page").value == page
    start = (page - 1) * 12
    assert any(m.value == f"span {page} {start} {min(34, start + 12)}" for m in at.markdown)


def test_denoise_ranking_is_paged(app_env) -> None:
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/2_denoise.py").run()
    button(at, "Fit SoftPatch on 34 training images").click().run()
    clean(at)
    assert showing(at)[0] == "Showing 1–12 of 34 images."
    assert len(at.get("image")) == 12
    assert sum(b.label == "Open" for b in at.button) == 12
    at.number_input(key=DENOISE.page).set_value(3).run()
    clean(at)
    assert showing(at)[0] == "Showing 25–34 of 34 images."
    assert len(at.get("image")) == 10
    ranks = [c.value.split(" ·", 1)[0] for c in at.caption if c.value.startswith("#")]
    assert ranks == [f"#{r}" for r in range(25, 35)]
