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
import unicodedata
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


def missing_field(
    source: str | os.PathLike, line: int, field_name: str, role: str, found: Any, what: str = "missing field"
) -> DataError:
    """A row (or header) without ``field_name``: the error lists the keys it has and names ``fields:``, which maps
    the reader's ``role`` (question, answers, text, ...) to another key of the user's files."""
    keys = [str(k) for k in found]
    shown = ", ".join(repr(k) for k in keys[:12]) + (", ..." if len(keys) > 12 else "")
    return DataError(
        source,
        line,
        field_name,
        f"{what}; found {shown or 'no keys'} (named otherwise? fields: {{{role}: KEY}})",
    )


# characters that show nothing: format controls (zero-width space / joiners, BOM, soft hyphen, bidi marks: Cf),
# control characters (Cc), separators (Zs, Zl, Zp) and the fillers Unicode lists as letters or symbols
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """True when ``text`` has no visible character (empty, whitespace, or only invisible ones like "\\u200b")."""
    return all(c in _FILLERS or c.isspace() or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


def json_loads(text: str, src: str | os.PathLike, line: int, field_name: str = "<json>") -> Any:
    """``json.loads`` whose failures (broken JSON, nesting too deep for the parser) are DataErrors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(src, line, field_name, f"broken JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError(src, line, field_name, TOO_DEEP) from None


TOO_DEEP = "JSON nested too deeply to parse"


def bad_byte(text: str) -> tuple[int, int] | None:
    """``(0-based character index, byte value)`` of the first undecodable byte in ``text``, or None."""
    m = _BAD.search(text)
    return None if m is None else (m.start(), ord(m.group()) - 0xDC00)


def encoding_error(
    src: str | os.PathLike, line: int, field_name: str, text: str, start: int | None = None
) -> DataError | None:
    """A DataError for the first undecodable byte of ``text`` (None when the text is clean UTF-8). With
    ``start`` (the index in ``text`` where the line begins) the message gives the byte's column; without,
    ``text`` is one field's value and the field names the place."""
    hit = bad_byte(text)
    if hit is None:
        return None
    where = f" at column {hit[0] - start + 1}" if start is not None and hit[0] >= start else ""
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
    except RecursionError:
        raise DataError(path, 1, "<json>", TOO_DEEP) from None


class _Stream:
    """A text buffer over a file that keeps only the unparsed tail, with the line count of what it dropped."""

    def __init__(self, path: str | os.PathLike, strict_encoding: bool, chunk: int) -> None:
        self.path, self.strict, self.chunk = path, strict_encoding, chunk
        self.f = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 (closed in close())
        self.buf, self.pos, self.dropped_lines, self.eof = "", 0, 0, False
        self.more()
        if self.buf.startswith(BOM):
            self.pos = 1

    def close(self) -> None:
        self.f.close()

    def line_of(self, i: int) -> int:
        return self.dropped_lines + self.buf.count("\n", 0, i) + 1

    def more(self) -> bool:
        """Read the next chunk (as large as the buffer, so a long record costs O(size)); False at EOF."""
        new = self.f.read(max(self.chunk, len(self.buf) - self.pos))
        if not new:
            self.eof = True
            return False
        self.dropped_lines += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :] + new, 0
        hit = bad_byte(new) if self.strict else None
        if hit is not None:
            i = len(self.buf) - len(new) + hit[0]
            raise encoding_error(
                self.path, self.line_of(i), "<encoding>", self.buf, self.buf.rfind("\n", 0, i) + 1
            )
        return True

    def peek(self) -> str:
        """The next non-space character ('' at EOF), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            got = repr(c) if c else "end of file"
            raise DataError(
                self.path, self.line_of(self.pos), "<json>", f"broken JSON: expected {chars!r}, got {got}"
            )
        self.pos += 1
        return c

    def value(self, record: bool = False) -> Any:
        """The next JSON value. ``record``: one nested too deeply for the parser is skipped and returned as
        its DataError (a bad row, which ``skip_bad_rows`` may skip), else raised."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.more():
                    continue
                raise DataError(self.path, self.line_of(e.pos), "<json>", f"broken JSON: {e.msg}") from None
            except RecursionError:
                err = DataError(self.path, self.line_of(self.pos), "<json>", TOO_DEEP)
                if not record:
                    raise err from None
                self.skip_value()
                return err
            if end == len(self.buf) and self.more():  # a number may go on in the next chunk
                continue
            self.pos = end
            return obj

    def skip_value(self) -> None:
        """Move past the list or object at ``pos`` without decoding it (iteratively: any depth)."""
        depth, in_str, escaped, i = 0, False, False, self.pos
        while True:
            if i == len(self.buf):
                offset = i - self.pos
                if not self.more():
                    raise DataError(
                        self.path, self.line_of(self.pos), "<json>", "broken JSON: unexpected end"
                    )
                i = self.pos + offset
            c, i = self.buf[i], i + 1
            if in_str:
                escaped, in_str = (False, True) if escaped else (c == "\\", c != '"')
            elif c == '"':
                in_str = True
            elif c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    self.pos = i
                    return


_DECODER = json.JSONDecoder()


def iter_json_array(
    path: str | os.PathLike,
    key: str | None = None,
    strict_encoding: bool = True,
    rest: dict[str, Any] | None = None,
    chunk: int = 1 << 20,
) -> Iterator[tuple[int, Any]]:
    """``(1-based record number, record)`` for each item of a JSON file's top-level list, or of the list
    under the top-level object's ``key`` (TriviaQA's ``Data``), holding one record at a time in memory
    (DPR's biencoder-nq-train.json is several GB). The object's other members go into ``rest`` (those after
    the list once it is exhausted). Broken JSON and bad bytes are DataErrors at their physical line."""
    s = _Stream(path, strict_encoding, chunk)
    try:
        if key is not None:
            s.expect("{")
            while True:
                if s.peek() == "}":
                    raise DataError(path, s.line_of(s.pos), key, "missing field")
                name = s.value()
                s.expect(":")
                if name == key:
                    break
                value = s.value()
                if rest is not None:
                    rest[name] = value
                if s.expect(",}") == "}":
                    raise DataError(path, s.line_of(s.pos - 1), key, "missing field")
        if s.peek() != "[":
            what = f"the value of {key!r}" if key else "the file"
            raise DataError(path, s.line_of(s.pos), key or "<json>", f"{what} is not a JSON list of records")
        s.pos += 1
        n = 0
        if s.peek() == "]":
            s.pos += 1
        else:
            while True:
                n += 1
                rec = s.value(record=True)
                if isinstance(rec, DataError):  # nested too deeply: this record's error, at its number
                    rec = DataError(path, n, rec.field, f"{rec.what} (the record starts on line {rec.line})")
                yield n, rec
                if s.expect(",]") == "]":
                    break
        if key is not None:
            while s.expect(",}") == ",":
                name = s.value()
                s.expect(":")
                value = s.value()
                if rest is not None:
                    rest[name] = value
    finally:
        s.close()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line, parsed object or DataError)`` for each non-blank line of a JSON-lines file: a bad byte or
    broken JSON is that line's DataError (field ``<encoding>`` / ``<json>``), the caller raises or skips it."""
    src = str(path)
    for ln, text in read_lines(path):
        if not text.strip():
            continue
        bad = encoding_error(src, ln, "<encoding>", text, start=0)
        if bad is not None:
            yield ln, bad
            continue
        try:
            yield ln, json_loads(text, src, ln)
        except DataError as e:  # broken, or nested too deeply: this line's error
            yield ln, e
