"""Question-set readers: every format, auto detection, bad rows with file:line:field messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rag_lightning.data.readers import (
    DataError,
    detect_format,
    read_questions,
    squad_article_split,
    squad_paragraphs,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Big_Cats",
            "paragraphs": [
                {
                    "context": "Lions live in Africa.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Where do lions live?",
                            "answers": [{"text": "Africa"}, {"text": "Africa"}],
                        },
                        {"id": "q2", "question": "What lives in Africa?", "answers": [{"text": "Lions"}]},
                    ],
                },
                {
                    "context": "Tigers live in Asia.",
                    "qas": [{"id": "q3", "question": "Tigers?", "answers": [{"text": "Asia"}]}],
                },
            ],
        },
        {"title": "Rivers", "paragraphs": [{"context": "The Nile is long.", "qas": []}]},
    ],
}


def test_dpr_csv(tmp_path: Path) -> None:
    p = _write(tmp_path / "nq-dev.csv", "who wrote \"it\"?\t['Stephen King', \"O'Neil\"]\nwhen\t['1988']\n")
    qa = read_questions(p, regex=True)
    assert detect_format(p) == "dpr_csv" and qa.regex and len(qa) == 2
    assert qa[0].question == 'who wrote "it"?'
    assert qa[0].answers == ["Stephen King", "O'Neil"] and (qa[1].line, qa[1].source) == (2, str(p))


def test_nq_open_and_generic_jsonl(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "nq.jsonl",
        '{"question": "q1", "answer": ["a", "b"]}\n\n{"question": "q2", "answer": ["c"]}\n',
    )
    qa = read_questions(p)
    assert [e.answers for e in qa] == [["a", "b"], ["c"]] and qa[1].line == 3
    p2 = _write(tmp_path / "x.jsonl", json.dumps({"q": "why?", "golds": ["because"], "id": 7}) + "\n")
    ex = read_questions(p2, fields={"question": "q", "answers": "golds"})[0]
    assert (ex.question, ex.answers, ex.id) == ("why?", ["because"], "7")


def test_csv_with_header(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "qa.csv",
        'question,answers\nq1,"[""a"", ""b""]"\nq2,"[\'c\', \'d\']"\nq3,single answer\n',
    )
    assert detect_format(p) == "csv"
    assert [e.answers for e in read_questions(p)] == [["a", "b"], ["c", "d"], ["single answer"]]
    t = _write(tmp_path / "qa.tsv", "id\tquery\tgold\n1\twho?\t['x']\n")
    ex = read_questions(t, fields={"question": "query", "answers": "gold"})[0]
    assert (ex.question, ex.answers, ex.line) == ("who?", ["x"], 2)


def test_squad(tmp_path: Path) -> None:
    p = _write(tmp_path / "dev.json", json.dumps(SQUAD))
    qa = read_questions(p)
    assert detect_format(p) == "squad" and len(qa) == 3
    assert qa[0].answers == ["Africa"] and qa[0].id == "q1" and qa[2].gold_ids == ["0-1"]
    paras = list(squad_paragraphs(p))
    assert [x["id"] for x in paras] == ["0-0", "0-1", "1-0"] and paras[0]["title"] == "Big Cats"
    assert len(read_questions(p, articles=[1])) == 0


def test_hf_dataset(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"q": ["a?", "b?"], "answers": [{"text": ["x"], "answer_start": [0]}] * 2}
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    qa = read_questions(tmp_path / "hf", fields={"question": "q"})
    assert detect_format(tmp_path / "hf") == "hf" and [e.answers for e in qa] == [["x"], ["x"]]
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hfd"))
    assert len(read_questions(tmp_path / "hfd", "hf", fields={"question": "q"}, split="validation")) == 2


BAD = [
    (
        "a.jsonl",
        '{"question": "ok", "answers": ["x"]}\n{"question": "q", "answers": [\n',
        2,
        "<json>",
        "broken JSON",
    ),
    ("a.jsonl", '{"answers": ["x"]}\n', 1, "question", "missing field"),
    ("a.jsonl", '{"question": "q"}\n', 1, "answers", "missing field"),
    ("a.jsonl", '{"question": "  ", "answers": ["x"]}\n', 1, "question", "empty question"),
    ("a.jsonl", '{"question": "q", "answers": []}\n', 1, "answers", "empty answer list"),
    ("a.jsonl", '{"question": "q", "answers": 3}\n', 1, "answers", "wrong type int"),
    ("a.jsonl", '{"question": 5, "answers": ["x"]}\n', 1, "question", "wrong type int"),
    ("a.jsonl", '{"question": "q", "answers": [1]}\n', 1, "answers", "wrong type int"),
    ("a.csv", "q1\t['x']\nq2\t['x', \n", 2, "answers", "unparsable answer list"),
    ("a.csv", "q1\t['x']\nq2\t['x']\textra\n", 2, "answers", "expected 2 tab-separated columns, got 3"),
    ("a.csv", "q1\t['x']\nq2\t[]\n", 2, "answers", "empty answer list"),
    ("b.csv", "question,answers\nq,['x']\n,['y']\n", 3, "question", "empty question"),
    ("b.csv", "question,answers\nq,x,extra\n", 2, "question", "expected 2 columns, got 3"),
    ("b.csv", "query,answers\nq,x\n", 1, "question", "missing column in header"),
]


@pytest.mark.parametrize(("name", "text", "line", "field", "what"), BAD)
def test_bad_rows(tmp_path: Path, name: str, text: str, line: int, field: str, what: str) -> None:
    p = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"^{p}:{line}: field '{field}': {what}"):
        read_questions(p)


def test_bad_squad(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(SQUAD))
    bad["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    p = _write(tmp_path / "dev.json", json.dumps(bad))
    with pytest.raises(DataError, match=rf"^{p}:2: field 'answers': empty answer list"):
        read_questions(p)
    p2 = _write(tmp_path / "broken.json", '{"data": [\n')
    with pytest.raises(DataError, match=rf"^{p2}:\d+: field '<json>': broken JSON"):
        read_questions(p2)


def test_skip_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        '{"question": "q1", "answers": ["a"]}',
        "{oops",
        '{"question": "", "answers": ["a"]}',
        '{"question": "q4", "answers": ["b"]}',
    ]
    p = _write(tmp_path / "s.jsonl", "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        qa = read_questions(p, skip_bad_rows=True)
    assert [e.question for e in qa] == ["q1", "q4"] and qa.skipped == 2
    assert qa.skip_messages[0].startswith(f"{p}:2:") and qa.skip_messages[1].startswith(
        f"{p}:3: field 'question'"
    )
    assert "skipped 2 bad rows" in caplog.text


def test_squad_article_split() -> None:
    s = squad_article_split(48)
    assert [len(s[k]) for k in ("train", "val", "test")] == [36, 6, 6]
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(range(48))
    assert not (set(s["train"]) & set(s["test"])) and s == squad_article_split(48)
