"""Own data through the demo's data config: a path swapped is read by its extension (`format: auto`), column
names are overridden without Hydra's `+` (`fields` declared with null defaults), the demo's questions scored
against another corpus get a warning, and a missing field lists the keys found and names `fields:`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra.utils import instantiate

from rag_lightning.data.corpus import Corpus
from rag_lightning.data.pairs import read_pairs
from rag_lightning.data.readers import read_questions
from rag_lightning.data.textio import DataError
from rag_lightning.models.tiny import tiny_tokenizer

TINY = ["model=tiny", "retriever=tiny"]
PASSAGES = [
    ("p1", "Warsaw", "Warsaw is the capital of Poland."),
    ("p2", "Vistula", "The Vistula flows north."),
]


def _tsv(path: Path, header: str = "id\tbody\ttitle") -> Path:
    path.write_text(header + "\n" + "".join(f"{i}\t{text}\t{title}\n" for i, title, text in PASSAGES))
    return path


def _questions(path: Path) -> Path:
    rows = [
        {"q": "What is the capital of Poland?", "golds": ["Warsaw"]},
        {"q": "Which way?", "golds": ["north"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _own_sets(q: Path) -> list[str]:
    return [
        o for s in ("train", "val", "test")
        for o in (f"data.{s}_sets.0.path={q}", f"data.{s}_sets.0.name=mine_{s}", f"data.{s}_sets.0.fields.question=q",
                  f"data.{s}_sets.0.fields.answers=golds")
    ]  # fmt: skip


def test_a_tsv_corpus_and_own_columns_through_the_demo_config(tmp_path, cfg_factory, caplog):
    """No `+`, no `format:`: the demo config's declared keys take a tsv corpus whose text column is `body` and
    question files with their own field names."""
    corpus, q = _tsv(tmp_path / "passages.tsv"), _questions(tmp_path / "mine.jsonl")
    cfg = cfg_factory(*TINY, f"data.corpus.path={corpus}", "data.corpus.fields.text=body", *_own_sets(q))
    dm = instantiate(cfg.data)
    with caplog.at_level(logging.WARNING, logger="rag_lightning.data.datamodule"):
        dm.setup("fit")
    assert len(dm.corpus) == 2 and dm.corpus.texts([0, 1]) == [t for _, _, t in PASSAGES]
    assert dm.corpus.titles([1]) == ["Vistula"]
    assert [it.example.question for it in dm.train_items][:1] == ["What is the capital of Poland?"]
    assert dm.val_set_names == ["mine_val"] and dm.test_set_names == ["mine_test"]
    assert "demo's bundled questions" not in caplog.text


def test_demo_questions_on_another_corpus_warn_naming_the_keys(tmp_path, cfg_factory, caplog):
    corpus = _tsv(tmp_path / "passages.tsv", header="id\ttext\ttitle")
    dm = instantiate(cfg_factory(*TINY, f"data.corpus.path={corpus}").data)
    with caplog.at_level(logging.WARNING, logger="rag_lightning.data.datamodule"):
        dm.validate_sets()
    (warning,) = [r.getMessage() for r in caplog.records if "bundled" in r.getMessage()]
    assert warning.startswith("data.train_sets, data.val_sets, data.test_sets: the demo's bundled questions")
    assert f"the corpus is {corpus}: their answers are not in it" in warning
    assert warning.endswith("set them to your own questions (docs/data.md)")

    caplog.clear()  # the demo as shipped: its own questions on its own passages, nothing to say
    with caplog.at_level(logging.WARNING, logger="rag_lightning.data.datamodule"):
        instantiate(cfg_factory(*TINY).data).validate_sets()
    assert "bundled" not in caplog.text


def test_a_missing_question_field_lists_the_keys_found_and_names_fields(tmp_path):
    q = _questions(tmp_path / "mine.jsonl")
    with pytest.raises(DataError) as e:
        read_questions(q)
    assert str(e.value) == (
        f"{q}:1: field 'question': missing field; found 'q', 'golds' (named otherwise? fields: {{question: KEY}})"
    )
    with pytest.raises(
        DataError, match=r":1: field 'answers': missing field; found 'q', 'golds' \(named otherwise"
    ):
        read_questions(q, fields={"question": "q"})
    csv = tmp_path / "mine.csv"
    csv.write_text("query,answers\nq,x\n")
    with pytest.raises(
        DataError, match=r"^.*mine.csv:1: field 'question': missing column in header; found 'query', "
    ):
        read_questions(csv)


def test_a_missing_corpus_field_lists_the_keys_found_and_names_fields(tmp_path):
    tok = tiny_tokenizer()
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"id": "1", "body": "hello", "title": "T"}) + "\n")
    with pytest.raises(DataError) as e:
        Corpus.from_file(jsonl, cache_dir=tmp_path / "c", gen_tokenizer=tok, doc_tokenizer=tok)
    assert str(e.value) == (
        f"{jsonl}:1: field 'text': missing field; found 'id', 'body', 'title' (named otherwise? fields: {{text: KEY}})"
    )
    tsv = _tsv(tmp_path / "p.tsv")
    with pytest.raises(
        DataError, match=r"p.tsv:1: field 'text': missing column in header; found 'id', 'body', "
    ):
        Corpus.from_file(tsv, cache_dir=tmp_path / "c", gen_tokenizer=tok, doc_tokenizer=tok)


def test_a_missing_pair_field_lists_the_keys_found_and_names_fields(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"claim": "q", "verdict": "A"}) + "\n")
    with pytest.raises(DataError) as e:
        read_pairs(p, need="label", labels=["A", "B"])
    assert str(e.value) == (
        f"{p}:1: field 'input / source / question': missing field (the input of a classification example); "
        "found 'claim', 'verdict' (named otherwise? fields: {input: KEY})"
    )
