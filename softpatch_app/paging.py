"""Paged lists: which slice of a long list (ranking, thumbnails, review table, gallery) one page shows.

Pure arithmetic, no Streamlit: the page number comes from the browser, so it is treated as hostile and
clamped to the pages that exist (a number that is no number at all gives the first page).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

PAGE_SIZES = (12, 24, 48, 96)  # offered where the user picks how many items one page holds
MAX_PAGE_SIZE = max(PAGE_SIZES)


@dataclass(frozen=True)
class PageSpan:
    """One page of a list of ``n_items``: items ``start`` to ``stop - 1`` (0-based) on page ``page`` (1-based)."""

    page: int
    pages: int
    page_size: int
    n_items: int
    start: int
    stop: int

    def take(self, items: Sequence[T]) -> Sequence[T]:
        """This page's items of ``items`` (which has ``n_items`` entries)."""
        return items[self.start : self.stop]

    @property
    def count(self) -> int:
        return self.stop - self.start

    def describe(self, noun: str = "items") -> str:
        """'1–24 of 10,000 images' (or 'no images')."""
        if self.n_items == 0:
            return f"no {noun}"
        return f"{self.start + 1:,}–{self.stop:,} of {self.n_items:,} {noun}"


def _as_int(value: object, default: int) -> int:
    """An integer from a browser value (int, float or text); ``default`` for anything else (nan, inf, bool, junk)."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    try:
        number = float(str(value).strip()) if not isinstance(value, float) else value
    except (TypeError, ValueError):
        return default
    return int(number) if math.isfinite(number) else default


def page_size_of(requested: object, *, default: int = PAGE_SIZES[1]) -> int:
    """A page size from the browser, kept within 1 and ``MAX_PAGE_SIZE``."""
    return min(max(1, _as_int(requested, default)), MAX_PAGE_SIZE)


def page_span(n_items: int, page_size: int, requested: object) -> PageSpan:
    """The page ``requested`` (1-based, any hostile value) of ``n_items`` items shown ``page_size`` at a time.

    There is always at least one page (empty when ``n_items`` is 0); a page number below 1 gives the first
    page, one past the end the last.
    """
    n = max(0, int(n_items))
    size = max(1, int(page_size))
    pages = max(1, math.ceil(n / size))
    page = min(max(1, _as_int(requested, 1)), pages)
    start = (page - 1) * size
    return PageSpan(page=page, pages=pages, page_size=size, n_items=n, start=start, stop=min(n, start + size))
