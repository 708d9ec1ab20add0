"""Corpus: every source format, cached conversion, token columns, bad rows, duplicate ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_lightning.data import corpus as corpus_mod
from rag_lightning.data.corpus import Corpus
from rag_lightning.data.readers import DataError

PASSAGES = [
    {"id": "p1", "title": "Lion", "text": "Lions live in Africa."},
    {"id": "p2", "title": "Tiger", "text": 'Tigers "big cats" live in Asia.'},
    {"id": "p3", "title": "", "text": "An untitled passage about rivers and lakes."},
]


def _tsv(path: Path, rows: list[dict]) -> Path:
    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    path.write_text("id\ttext\ttitle\n" + "".join(f"{r['id']}\t{q(r['text'])}\t{r['title']}\n" for r in rows))
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path: Path, tmp_path: Path, tok, **kw) -> Corpus:
    kw.setdefault("max_passage_tokens", 16)
    return Corpus.from_file(path, cache_dir=tmp_path / "cache", gen_tokenizer=tok, doc_tokenizer=tok, **kw)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "arrow"])
def test_formats_and_tokens(tmp_path: Path, minilm_tokenizer, fmt: str) -> None:
    tok = minilm_tokenizer
    if fmt == "tsv":
        src = _tsv(tmp_path / "psgs.tsv", PASSAGES)
    elif fmt == "jsonl":
        src = _jsonl(tmp_path / "psgs.jsonl", PASSAGES)
    else:
        import datasets

        src = tmp_path / "psgs_arrow"
        datasets.Dataset.from_list(PASSAGES).save_to_disk(str(src))
    c = _load(src, tmp_path, tok)
    assert len(c) == 3 and c.ext_ids([2, 0]) == ["p3", "p1"] and c.titles([1]) == ["Tiger"]
    assert c.texts([1]) == [PASSAGES[1]["text"]]
    want_gen = tok("Lion / Lions live in Africa.", add_special_tokens=False)["input_ids"]
    assert c.gen_tokens([0]) == [want_gen]
    assert c.gen_tokens([2])[0] == tok(PASSAGES[2]["text"], add_special_tokens=False)["input_ids"]  # no title
    assert c.doc_tokens([0]) == [tok("Lion", "Lions live in Africa.")["input_ids"]]
    assert c.doc_tokens([2]) == [tok(PASSAGES[2]["text"])["input_ids"]]
    long = _load(src, tmp_path, tok, max_passage_tokens=6)
    assert long.fingerprint != c.fingerprint
    assert all(len(x) <= 6 for x in long.gen_tokens([0, 1, 2]) + long.doc_tokens([0, 1, 2]))
    assert long.doc_tokens([1])[0][0] == tok.cls_token_id and long.doc_tokens([1])[0][-1] == tok.sep_token_id
    view = c.doc_token_view()
    assert len(view) == 3 and view[[1, 0]] == c.doc_tokens([1, 0])
    assert c.id_to_row("p2") == 1


def test_squad_source(tmp_path: Path, minilm_tokenizer) -> None:
    para = {"context": "Lions live in Africa.", "qas": []}
    squad = {
        "data": [{"title": "Big_Cats", "paragraphs": [para, para]}, {"title": "Rivers", "paragraphs": [para]}]
    }
    src = tmp_path / "dev.json"
    src.write_text(json.dumps(squad))
    c = _load(src, tmp_path, minilm_tokenizer)
    assert c.ext_ids([0, 1, 2]) == ["0-0", "0-1", "1-0"] and c.titles([0]) == ["Big Cats"]


def test_converted_once(tmp_path: Path, minilm_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _jsonl(tmp_path / "psgs.jsonl", PASSAGES)
    c1 = _load(src, tmp_path, minilm_tokenizer)
    meta = c1.path / "corpus_meta.json"
    mtime = meta.stat().st_mtime_ns
    monkeypatch.setattr(corpus_mod, "_write_raw", lambda *a, **k: pytest.fail("converted twice"))
    c2 = _load(src, tmp_path, minilm_tokenizer)
    assert c2.path == c1.path and c2.fingerprint == c1.fingerprint and meta.stat().st_mtime_ns == mtime
    assert c2.gen_tokens([1]) == c1.gen_tokens([1])
    # no tmp dirs left; .digests remembers the source's content digest by path, size and mtime
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".digests", c1.fingerprint]


def test_duplicate_ids(tmp_path: Path, minilm_tokenizer) -> None:
    rows = [*PASSAGES, {"id": "p2", "title": "Again", "text": "dup"}]
    src = _tsv(tmp_path / "dup.tsv", rows)
    with pytest.raises(DataError, match=rf"^{src}:5: field 'id': duplicate passage id 'p2' \(lines 3, 5\)"):
        _load(src, tmp_path, minilm_tokenizer)
    assert not any((tmp_path / "cache").iterdir())  # failed conversion leaves nothing behind


BAD = [
    ("tsv", "id\ttext\ttitle\n1\thello\tT\n2\t\tT\n", 3, "text", "empty text"),
    ("tsv", "id\ttext\ttitle\n1\thello\tT\n2\thello\n", 3, "text", "expected 3 columns, got 2"),
    ("tsv", "id\tbody\ttitle\n1\thello\tT\n", 1, "text", "missing column in header"),
    ("jsonl", '{"id": "1", "text": "a"}\n{"id": "2", "title": "t"}\n', 2, "text", "missing field"),
    ("jsonl", '{"id": "1", "text": "a"}\n{"id": [2], "text": "b"}\n', 2, "id", "wrong type list"),
    (
        "jsonl",
        '{"id": "1", "text": "a"}\n{"id": "2", "text": "b", "title": 3}\n',
        2,
        "title",
        "wrong type int",
    ),
    ("jsonl", '{"id": "1", "text": "a"}\n{"id": "2", "te\n', 2, "<json>", "broken JSON"),
]


@pytest.mark.parametrize(("ext", "text", "line", "field", "what"), BAD)
def test_bad_rows(
    tmp_path: Path, minilm_tokenizer, ext: str, text: str, line: int, field: str, what: str
) -> None:
    src = tmp_path / f"bad.{ext}"
    src.write_text(text)
    with pytest.raises(DataError, match=rf"^{src}:{line}: field '{field}': {what}"):
        _load(src, tmp_path, minilm_tokenizer)


def test_gen_token_rows_matches_lists_over_chunks() -> None:
    """The padded numpy gather of generator tokens equals gen_tokens, across Arrow chunks and for empty rows."""
    import datasets
    import torch

    rows = [[5, 6, 7], [], [8], [9, 10, 11, 12], [13, 14]]
    parts = [
        datasets.Dataset.from_dict(
            {"gen_ids": r}, features=datasets.Features({"gen_ids": datasets.List(datasets.Value("int32"))})
        )
        for r in (rows[:2], rows[2:3], rows[3:])
    ]
    c = Corpus(datasets.concatenate_datasets(parts))
    assert c._table.column("gen_ids").num_chunks == 3
    ids = torch.tensor([3, 0, 1, 4, 2, 3])
    toks, lens = c.gen_token_rows(ids)
    assert toks.dtype == torch.int64 and toks.shape == (6, 4)
    for r, i in enumerate(ids.tolist()):
        assert toks[r, : lens[r]].tolist() == c.gen_tokens([i])[0] == rows[i]
        assert (toks[r, lens[r] :] == 0).all()
    with pytest.raises(IndexError, match="out of range"):
        c.gen_token_rows(torch.tensor([5]))
