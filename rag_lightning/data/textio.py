"""Reading text files as published: UTF-8 with or without a BOM, bad bytes reported with file and line.

Files are decoded with ``errors="surrogateescape"``, so an undecodable byte never stops the read: it becomes
a lone surrogate (U+DC80..U+DCFF) that :func:`bad_byte` finds, and the reader reports it as a
:class:`DataError` on that line (or skips the row with ``skip_bad_rows``). A UTF-8 byte-order mark at the
start of a file is dropped. Lines end at ``\\n`` only, so line numbers are those of ``sed -n Np`` and of
editors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BAD = re.compile("[\udc80-\udcff]")
BOM = "\ufeff"


class DataError(ValueError):
    """Bad input data; the message names file, line (or record) and field."""

    def __init__(self, source: str | os.PathLike, line: int, field_name: str, what: str) -> None:
        self.source, self.line, self.field, self.what = str(source), line, field_name, what
        super().__init__(f"{source}:{line}: field '{field_name}': {what}")


def bad_byte(text: str) -> tuple[int, int] | None:
    """``(0-based character index, byte value)`` of the first undecodable byte in ``text``, or None."""
    m = _BAD.search(text)
    return None if m is None else (m.start(), ord(m.group()) - 0xDC00)


def encoding_error(
    src: str | os.PathLike, line: int, field_name: str, text: str, start: int = 0
) -> DataError | None:
    """A DataError for the first undecodable byte of ``text`` (None when the text is clean UTF-8); the column
    is counted from ``start`` (the index in ``text`` where the line begins)."""
    hit = bad_byte(text)
    if hit is None:
        return None
    where = f" at column {hit[0] - start + 1}" if hit[0] >= start else ""
    return DataError(
        src,
        line,
        field_name,
        f"not UTF-8: byte 0x{hit[1]:02x}{where} (re-encode the file as UTF-8, e.g. "
        f"`iconv -f cp1252 -t utf-8`, or pass skip_bad_rows to skip the row)",
    )


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(1-based line number, line with its ending)``; BOM dropped, bad bytes kept as surrogates."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for ln, line in enumerate(f, 1):
            yield ln, (line[1:] if ln == 1 and line.startswith(BOM) else line)


def first_line(path: str | os.PathLike) -> str:
    """The first line without BOM and line ending ('' for an empty file)."""
    return next((s.rstrip("\r\n") for _, s in read_lines(path)), "")


def read_head(path: str | os.PathLike, n: int = 4096) -> str:
    """The first ``n`` characters without BOM."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        head = f.read(n)
    return head[1:] if head.startswith(BOM) else head


def load_json(path: str | os.PathLike, strict_encoding: bool = True) -> Any:
    """Parse a whole JSON file. A bad byte is a DataError at its line (``strict_encoding``) or is kept as a
    surrogate for the reader's per-field checks to skip the records it is in; broken JSON names its line."""
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    text = text[1:] if text.startswith(BOM) else text
    hit = bad_byte(text) if strict_encoding else None
    if hit is not None:
        line_start = text.rfind("\n", 0, hit[0]) + 1
        raise encoding_error(path, text.count("\n", 0, hit[0]) + 1, "<encoding>", text, line_start)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, "<json>", f"broken JSON: {e.msg} at column {e.colno}") from None
