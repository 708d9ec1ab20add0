"""textio: lines with BOM and bad bytes, and the streaming JSON reader against json.load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_lightning.data.textio import DataError, bad_byte, iter_json_array, load_json, read_lines

RECORDS = [
    {"question": "q1", "answers": ["a", 1.5e3, None, True], "nested": {"x": [1, 2, {"y": "z\n"}]}},
    {"question": 'é "quoted" \\ back', "n": 12345678901234567890, "f": -0.000123},
    [],
    "plain string, with ] and } inside",
    123456789,
]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 4])
def test_iter_json_array_matches_json_load(tmp_path: Path, chunk: int, indent: int | None) -> None:
    p = tmp_path / "a.json"
    p.write_text("\ufeff" + json.dumps(RECORDS, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert [r for _, r in iter_json_array(p, chunk=chunk)] == RECORDS == load_json(p)
    assert [n for n, _ in iter_json_array(p, chunk=chunk)] == [1, 2, 3, 4, 5]
    top = {"Domain": "Web", "Data": RECORDS, "VerifiedEval": True, "Version": 1.0}
    q = tmp_path / "t.json"
    q.write_text(json.dumps(top, indent=indent), encoding="utf-8")
    rest: dict = {}
    assert [r for _, r in iter_json_array(q, "Data", rest=rest, chunk=chunk)] == RECORDS
    assert rest == {"Domain": "Web", "VerifiedEval": True, "Version": 1.0}  # members before and after Data
    empty = tmp_path / "e.json"
    empty.write_text(" [ ] ", encoding="utf-8")
    assert list(iter_json_array(empty, chunk=chunk)) == []


def test_iter_json_array_errors(tmp_path: Path) -> None:
    p = tmp_path / "b.json"
    p.write_text('[\n{"a": 1},\n{"a": 2,,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:3: field '<json>': broken JSON"):
        list(iter_json_array(p, chunk=4))
    p.write_text('[\n{"a": 1}\n{"a": 2}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:3: field '<json>': broken JSON: expected ',]', got '{{'"):
        list(iter_json_array(p))
    p.write_text('{"data": []}', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:1: field '<json>': the file is not a JSON list"):
        list(iter_json_array(p))
    with pytest.raises(DataError, match=rf"^{p}:1: field 'Data': missing field"):
        list(iter_json_array(p, "Data"))
    p.write_bytes(b'[{"a": "ok"},\n {"a": "caf\xe9"}]')
    with pytest.raises(DataError, match=rf"^{p}:2: field '<encoding>': not UTF-8: byte 0xe9 at column 11"):
        list(iter_json_array(p, chunk=5))
    recs = [r for _, r in iter_json_array(p, strict_encoding=False)]  # kept for the readers' field checks
    assert bad_byte(recs[1]["a"]) == (3, 0xE9)


def test_read_lines(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_bytes(b"\xef\xbb\xbfa\r\nb\xff\rc\n")  # BOM; CRLF kept; a lone CR is not a line end
    lines = list(read_lines(p))
    assert [n for n, _ in lines] == [1, 2] and lines[0][1] == "a\r\n"
    assert bad_byte(lines[1][1]) == (1, 0xFF)
