"""Paged lists: page count, bounds, and a hostile page number from the browser clamped to a page that exists."""

from __future__ import annotations

import pytest

from softpatch_app.paging import MAX_PAGE_SIZE, page_size_of, page_span


@pytest.mark.parametrize(("n", "size", "pages"), [(0, 24, 1), (1, 24, 1), (24, 24, 1), (25, 24, 2), (10_000, 24, 417)])
def test_page_count(n: int, size: int, pages: int) -> None:
    assert page_span(n, size, 1).pages == pages


def test_every_item_is_on_exactly_one_page() -> None:
    items = list(range(103))
    seen = []
    span = page_span(len(items), 10, 1)
    for page in range(1, span.pages + 1):
        seen += list(page_span(len(items), 10, page).take(items))
    assert seen == items
    last = page_span(len(items), 10, 11)
    assert (last.start, last.stop, last.count) == (100, 103, 3)
    assert last.describe("images") == "101–103 of 103 images"


@pytest.mark.parametrize(
    ("requested", "page"),
    [
        (0, 1),
        (-7, 1),
        (10**12, 5),  # past the end: the last page
        ("3", 3),
        (" 4 ", 4),
        (2.9, 2),
        ("2.5", 2),
        (float("nan"), 1),
        (float("inf"), 1),
        ("1e400", 1),
        ("'; DROP TABLE", 1),
        (None, 1),
        (True, 1),  # a bool is no page number
        ([3], 1),
        ({"page": 3}, 1),
    ],
)
def test_a_hostile_page_number_gives_a_page_that_exists(requested: object, page: int) -> None:
    span = page_span(50, 10, requested)
    assert span.page == page
    assert 0 <= span.start <= span.stop <= 50 and span.count == (10 if page <= 5 else 0)


def test_an_empty_list_has_one_empty_page() -> None:
    span = page_span(0, 12, 9)
    assert (span.page, span.pages, span.start, span.stop) == (1, 1, 0, 0)
    assert span.take([]) == [] and span.describe("images") == "no images"


@pytest.mark.parametrize(
    ("requested", "size"), [(12, 12), ("48", 48), (0, 1), (-3, 1), (10**9, MAX_PAGE_SIZE), ("x", 24)]
)
def test_page_size_is_kept_in_bounds(requested: object, size: int) -> None:
    assert page_size_of(requested, default=24) == size
