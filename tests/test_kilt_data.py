"""KILT data: task files as examples (provenance kept exactly), bad rows, and the knowledge source cut into
100-word passages that keep their page (streamed), through the corpus conversion and as a tsv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_lightning.data.corpus import Corpus, detect_corpus_format
from rag_lightning.data.kilt import iter_kilt_passages, kilt_gold, write_passages_tsv
from rag_lightning.data.readers import detect_format, read_questions
from rag_lightning.data.registry import resolve_corpus, resolve_set
from rag_lightning.data.textio import DataError
from rag_lightning.tasks.kilt import gold_from_record


def _prov(pid, title="T"):
    return {
        "wikipedia_id": pid,
        "title": title,
        "start_paragraph_id": 2,
        "end_paragraph_id": 3,
        "bleu_score": 1,
    }


RECORDS = [
    {
        "id": "nq1",
        "input": "who wrote hamlet",
        "output": [{"answer": "Shakespeare", "provenance": [_prov("1")]}],
    },
    {
        "id": 7,
        "input": "Hamlet is a play.",
        "output": [
            {"answer": "SUPPORTS", "provenance": [_prov(2, "Hamlet"), _prov("3")]},
            {"answer": "SUPPORTS", "provenance": [_prov("4")]},
        ],
    },
    {  # Wizard of Wikipedia: the dialogue history, one turn per line
        "id": "wow1",
        "input": "I love dogs\nMe too, they are loyal\nWhich breed is oldest?",
        "output": [{"answer": " The Saluki is among the oldest. ", "provenance": [_prov("5", "Saluki")]}],
    },
    {  # ELI5-like: several answers, one without provenance, one with an empty list, one without an answer
        "id": "e1",
        "input": "why is the sky blue",
        "output": [
            {"answer": "Rayleigh scattering.", "provenance": [_prov("6"), _prov("6"), _prov("7")]},
            {"answer": "Because of scattering."},
            {"answer": "Rayleigh scattering.", "provenance": []},
            {"provenance": [_prov("8")]},
        ],
    },
]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reader_examples_and_provenance(tmp_path: Path):
    path = _write(tmp_path / "x-dev-kilt.jsonl", RECORDS)
    assert detect_format(path) == "kilt"
    qa = read_questions(path)
    assert [e.id for e in qa] == ["nq1", "7", "wow1", "e1"] and [e.line for e in qa] == [1, 2, 3, 4]
    nq, fever, wow, eli5 = qa.examples
    assert (nq.question, nq.answers) == ("who wrote hamlet", ["Shakespeare"])
    assert nq.provenance == [{"wikipedia_id": "1", "title": "T", "output": 0}]
    assert fever.answers == ["SUPPORTS"] and [p["wikipedia_id"] for p in fever.provenance] == ["2", "3", "4"]
    assert wow.question.split("\n") == ["I love dogs", "Me too, they are loyal", "Which breed is oldest?"]
    assert wow.answers == ["The Saluki is among the oldest."]
    assert eli5.answers == ["Rayleigh scattering.", "Because of scattering."]
    # the provenance keeps KILT's evidence structure: the scores rebuilt from it equal those of the record
    for ex, rec in zip(qa, RECORDS):
        assert kilt_gold(ex.id, ex.provenance, ex.answers) == gold_from_record(rec)
    last = read_questions(path, "kilt", max_turns=1).examples[2]
    assert last.question == "Which breed is oldest?"


def test_registry_names(tmp_path: Path):
    assert resolve_set("kilt_nq_dev", tmp_path)["path"] == f"{tmp_path}/kilt/nq-dev-kilt.jsonl"
    assert resolve_set("kilt_zsre_train", tmp_path)["path"].endswith(
        "/kilt/structured_zeroshot-train-kilt.jsonl"
    )
    assert resolve_set("kilt_fever_dev", tmp_path)["task"] == "classification"
    assert resolve_set("kilt_wow_train", tmp_path)["task"] == "generation"
    assert resolve_set("kilt_cweb_dev", tmp_path)["format"] == "kilt"
    assert resolve_corpus("kilt_ks", tmp_path)["path"] == f"{tmp_path}/kilt/kilt_knowledgesource.json"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "a", "output": [{"answer": "x"}]}, r":1: field 'input': missing field"),
        ({"id": "a", "input": "q"}, r":1: field 'output': missing field \(a test file without answers\?\)"),
        ({"id": "a", "input": "q", "output": {"answer": "x"}}, r"field 'output': expected a non-empty list"),
        ({"id": "a", "input": "q", "output": [{"answer": 5}]}, r"field 'output\[0\].answer': wrong type int"),
        ({"id": "a", "input": "q", "output": [{"answer": " "}]}, r"field 'output\[\].answer': no answer"),
        (
            {
                "id": "a",
                "input": "q",
                "output": [{"answer": "x"}, {"answer": "y", "provenance": [{"title": "T"}]}],
            },
            r"field 'output\[1\].provenance\[0\].wikipedia_id': missing field",
        ),
        ({"input": "q", "output": [{"answer": "x"}]}, r":1: field 'id': missing field"),
        ('{"id": "a", "input": ', r":1: field '<json>': broken JSON"),
    ],
)
def test_reader_bad_rows(tmp_path: Path, row, message):
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=f"bad.jsonl{message}" if message.startswith(":") else message):
        read_questions(path, "kilt")


def test_triviaqa_id_file_hint(tmp_path: Path):
    path = _write(
        tmp_path / "triviaqa-dev_id-kilt.jsonl", [RECORDS[0], {"id": "tq", "output": [{"answer": "a"}]}]
    )
    with pytest.raises(DataError, match=r"triviaqa-dev_id-kilt.jsonl:2: field 'input'.*get_triviaqa_input"):
        read_questions(path, "kilt")
    qa = read_questions(path, "kilt", skip_bad_rows=True)
    assert len(qa) == 1 and qa.skipped == 1


def _words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


PAGES = [
    {  # 60 + 170 words after the title; the section heading is not text -> windows of 100, 100, 30
        "_id": "x",
        "wikipedia_id": "12",
        "wikipedia_title": "Alpha",
        "text": ["Alpha\n", _words("a", 60) + "\n", "Section::::History.\n", _words("b", 170) + "\n"],
        "anchors": [],
    },
    {"wikipedia_id": "13", "wikipedia_title": "Empty", "text": ["Empty\n"]},  # title only: no passage
    {"wikipedia_id": 14, "wikipedia_title": "Beta", "text": ["Beta\n", "one  two\tthree\n"]},
]


def test_chunker_windows_titles_pages(tmp_path: Path):
    ks = _write(tmp_path / "kilt_knowledgesource.json", PAGES)
    ps = list(iter_kilt_passages(ks))
    assert [p["id"] for p in ps] == ["1", "2", "3", "4"]
    assert [len(p["text"].split()) for p in ps] == [100, 100, 30, 3]
    assert [(p["title"], p["wikipedia_id"], p["line"]) for p in ps] == [
        ("Alpha", "12", 1),
        ("Alpha", "12", 1),
        ("Alpha", "12", 1),
        ("Beta", "14", 3),
    ]
    all_words = " ".join(p["text"] for p in ps[:3]).split()
    assert all_words == (_words("a", 60) + " " + _words("b", 170)).split()  # in order, nothing lost
    assert "Section::::History." not in " ".join(p["text"] for p in ps) and ps[3]["text"] == "one two three"
    assert [len(p["text"].split()) for p in iter_kilt_passages(ks, passage_words=50)] == [50] * 4 + [30, 3]


def test_chunker_streams_and_names_bad_pages(tmp_path: Path):
    ks = _write(tmp_path / "ks.json", [PAGES[0], PAGES[2], '{"wikipedia_id": "9", broken'])
    it = iter_kilt_passages(ks)
    assert [next(it)["id"] for _ in range(4)] == ["1", "2", "3", "4"]  # yielded before the bad line is read
    with pytest.raises(DataError, match=r"ks.json:3: field '<json>'"):
        next(it)
    bad = _write(tmp_path / "ks2.json", [{"wikipedia_id": "9", "wikipedia_title": "T", "text": ["T", 5]}])
    with pytest.raises(DataError, match=r"ks2.json:1: field 'text\[1\]'"):
        list(iter_kilt_passages(bad))
    bad = _write(tmp_path / "ks3.json", [{"wikipedia_title": "T", "text": ["T", "x"]}])
    with pytest.raises(DataError, match=r"ks3.json:1: field 'wikipedia_id': missing field"):
        list(iter_kilt_passages(bad))


def test_knowledge_source_and_tsv_as_corpus(tmp_path: Path, minilm_tokenizer):
    ks = _write(tmp_path / "kilt_knowledgesource.json", PAGES)
    assert detect_corpus_format(ks) == "kilt"
    kw = dict(cache_dir=tmp_path / "cache", gen_tokenizer=minilm_tokenizer, max_passage_tokens=16)
    c = Corpus.from_file(ks, **kw)
    assert len(c) == 4 and c.has_pages
    assert c.page_ids([3, 0, -1]) == ["14", "12", ""] and c.titles([3]) == ["Beta"]
    assert c.gen_tokens([3]) == [
        minilm_tokenizer("Beta / one two three", add_special_tokens=False)["input_ids"]
    ]
    n, tsv = write_passages_tsv(ks, tmp_path / "out" / "kilt_w100_title.tsv")
    assert n == 4 and tsv.read_text().splitlines()[0] == "id\ttext\ttitle\twikipedia_id"
    t = Corpus.from_file(tsv, **kw)
    assert t.page_ids(range(4)) == c.page_ids(range(4)) and t.texts(range(4)) == c.texts(range(4))
    assert t.ext_ids(range(4)) == c.ext_ids(range(4)) and t.titles(range(4)) == c.titles(range(4))
    plain = tmp_path / "plain.jsonl"
    _write(plain, [{"id": "p1", "title": "T", "text": "x"}])
    p = Corpus.from_file(plain, **kw)
    assert not p.has_pages and p.dataset.column_names[:4] == ["id", "title", "text", "line"]
    with pytest.raises(KeyError, match="wikipedia_id"):
        p.page_ids([0])


def test_kilt_sets_for_the_generation_and_classification_tasks(tmp_path: Path):
    from rag_lightning.tasks.base import build_task

    fever = _write(
        tmp_path / "fever-dev-kilt.jsonl", [RECORDS[1], {**RECORDS[0], "output": [{"answer": "REFUTES"}]}]
    )
    cls = build_task({"name": "classification", "labels": ["SUPPORTS", "REFUTES"]})
    got = cls.read({"path": str(fever), "format": "kilt", "name": "fever"})
    assert [e.label for e in got] == ["SUPPORTS", "REFUTES"] and got.examples[0].provenance
    bad = _write(tmp_path / "bad-kilt.jsonl", [{**RECORDS[0], "output": [{"answer": "NOT ENOUGH INFO"}]}])
    with pytest.raises(
        DataError, match=r"bad-kilt.jsonl:1: field 'output\[\].answer': label 'NOT ENOUGH INFO'"
    ):
        cls.read({"path": str(bad)})  # auto-detected as KILT
    gen = build_task("generation").read({"path": str(_write(tmp_path / "eli5-dev-kilt.jsonl", RECORDS[3:]))})
    assert gen.examples[0].answers == ["Rayleigh scattering.", "Because of scattering."]
    assert {p.get("wikipedia_id") for p in gen.examples[0].provenance} == {"6", "7", "8", None}


def test_entity_linking_inputs_keep_a_window_around_the_mention(tmp_path: Path):
    doc = _words("w", 200) + " [START_ENT] Germany [END_ENT] " + _words("v", 200)
    rec = {"id": "el1", "input": doc, "output": [{"answer": "Germany", "provenance": [_prov("11867")]}]}
    path = _write(tmp_path / "aidayago2-dev-kilt.jsonl", [rec])
    (ex,) = read_questions(path, "kilt", window=3)
    assert ex.question == "w197 w198 w199 [START_ENT] Germany [END_ENT] v0 v1 v2"
    assert resolve_set("kilt_aidayago2_dev", tmp_path)["window"] == 32
    assert "window" not in resolve_set("kilt_nq_dev", tmp_path)
    assert read_questions(path, "kilt").examples[0].question == doc  # no window: the whole document
