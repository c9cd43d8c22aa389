"""Writing CSV files that are safe to open in a spreadsheet.

File and folder names come from users and archives; a name such as ``=HYPERLINK(...)`` or ``@SUM(1)``
would run as a formula when the CSV is opened in Excel, LibreOffice or Google Sheets. Every CSV the app
and the CLI write goes through ``write_csv`` (cells through ``safe_cell``), which prefixes such text with a
single quote, the OWASP rule for CSV injection.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from numbers import Number
from typing import IO

__all__ = ["FORMULA_PREFIXES", "safe_cell", "write_csv"]

# A cell starting with one of these is read as a formula (or a DDE call) by common spreadsheets.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """``value`` as a cell that no spreadsheet evaluates.

    Text (and anything that is not a number, e.g. a ``Path``) starting with ``= + - @``, a tab or a
    carriage return gets a leading ``'``. Numbers we computed stay numbers: ``-0.5`` is a value, never a
    formula, and quoting it would turn it into text. ``None`` becomes an empty cell.
    """
    if value is None:
        return ""
    if isinstance(value, Number) and not isinstance(value, bool):
        return value
    text = str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def write_csv(out: IO[str], rows: Iterable[Mapping[str, object]], fields: Sequence[str]) -> None:
    """Write a header of ``fields`` and one line per row (missing keys: empty cells) to ``out``, every cell
    through ``safe_cell``. ``out`` should be opened with ``newline=""`` (files) or be a ``StringIO``.

    Lines end in ``\r\n`` (RFC 4180): the csv module then quotes every cell holding a ``\r`` or a ``\n``.
    With a bare ``\n`` terminator a name holding ``\r`` stays unquoted, and a spreadsheet would start a new
    row there, whose first cell (``=1+1``) escaped the prefix check.
    """
    writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: safe_cell(row.get(k, "")) for k in fields})
