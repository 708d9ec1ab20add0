"""KILT files: the task files (``*-kilt.jsonl``) as examples, the knowledge source as 100-word passages.

Task files (one JSON object per line, facebookresearch/KILT): ``id``, ``input``, ``output`` = a list of
``{answer, provenance: [{wikipedia_id, title, start_paragraph_id, end_paragraph_id, ...}]}``. An example's
input is ``input`` (Wizard of Wikipedia: the dialogue history, turns separated by newlines; ``max_turns``
keeps the last N; entity linking's whole documents: ``window`` keeps N words on each side of the
``[START_ENT]`` mention); its targets are the distinct non-empty ``answer``s (stripped, in file order; FEVER:
``SUPPORTS`` / ``REFUTES``, also the ``label``); its ``provenance`` the gold pages, one dict per entry
``{wikipedia_id, title, output: i}`` (``i`` = the output it belongs to), plus ``{output: i}`` for an output
whose provenance list is empty, so that KILT's evidence sets can be rebuilt exactly
(:func:`kilt_gold`). Bad rows are DataErrors naming file, line and field (``output[2].provenance[0]
.wikipedia_id``).

Knowledge source (``kilt_knowledgesource.json``, one page per line: ``wikipedia_id``, ``wikipedia_title``,
``text`` = the page's paragraphs, the first being the title): :func:`iter_kilt_passages` streams it page by
page and cuts each page into passages of ``passage_words`` (100) whitespace-separated words, as DPR cut its
``psgs_w100.tsv``: the paragraphs after the title, without the ``Section::::`` heading lines, are joined and
split into consecutive windows (the page's last one shorter). Each passage keeps ``wikipedia_id`` and the
title; passage ids are 1, 2, ... in file order. :func:`write_passages_tsv` writes them in the layout of
KILT's DPR baseline file ``kilt_w100_title.tsv`` with a page column (header ``id  text  title
wikipedia_id``), which the corpus reader reads like any DPR tsv (keeping ``wikipedia_id``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rag_lightning.data.readers import QAExample
from rag_lightning.data.textio import DataError, encoding_error, iter_jsonl

SECTION = "Section::::"
ENT_START, ENT_END = "[START_ENT]", "[END_ENT]"  # entity linking: the mention marked in a whole document


def mention_window(text: str, words: int) -> str:
    """An entity-linking input's mention ``[START_ENT] ... [END_ENT]`` with ``words`` words on each side (the
    text itself when it has no marker), so that truncation to the encoders' length keeps the mention."""
    toks = text.split()
    start = next((i for i, t in enumerate(toks) if ENT_START in t), None)
    if start is None:
        return text
    end = next((i for i in range(start, len(toks)) if ENT_END in toks[i]), start)
    return " ".join(toks[max(0, start - words) : end + words + 1])


# ----------------------------------------------------------------------------- task files


def _text(value: Any, src: str, ln: int, name: str) -> str:
    if value is None:
        raise DataError(src, ln, name, "missing field")
    if not isinstance(value, str):
        raise DataError(src, ln, name, f"wrong type {type(value).__name__}, expected str")
    err = encoding_error(src, ln, name, value)
    if err is not None:
        raise err
    return value


def _page_id(value: Any, src: str, ln: int, name: str) -> str:
    """A Wikipedia page id (str or int, not empty), stripped."""
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, (str, int))
        or not str(value).strip()
    ):
        raise DataError(src, ln, name, "missing field" if value is None else "expected an id")
    return str(value).strip()


def _provenance(outs: list[Any], src: str, ln: int) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    for i, o in enumerate(outs):
        provs = o.get("provenance")
        if provs is None:
            continue
        if not isinstance(provs, list):
            raise DataError(
                src, ln, f"output[{i}].provenance", f"wrong type {type(provs).__name__}, expected a list"
            )
        if not provs:
            pages.append({"output": i})  # an empty evidence set (KILT counts it)
        for j, p in enumerate(provs):
            name = f"output[{i}].provenance[{j}]"
            if not isinstance(p, Mapping):
                raise DataError(src, ln, name, f"wrong type {type(p).__name__}, expected an object")
            pid = _page_id(p.get("wikipedia_id"), src, ln, f"{name}.wikipedia_id")
            pages.append({"wikipedia_id": pid, "title": str(p.get("title") or ""), "output": i})
    return pages


def kilt_example(
    rec: Any,
    src: str,
    ln: int,
    max_turns: int | None = None,
    labels: Sequence[str] | None = None,
    window: int | None = None,
) -> QAExample:
    """One KILT record -> a :class:`QAExample` (see the module docstring); DataError naming the field."""
    if not isinstance(rec, Mapping):
        raise DataError(src, ln, "<json>", f"wrong type {type(rec).__name__}, expected an object")
    rid = rec.get("id")
    if rid is None or str(rid).strip() == "":
        raise DataError(src, ln, "id", "missing field")
    if "input" not in rec:
        hint = " (TriviaQA's *_id-kilt.jsonl: run KILT's scripts/get_triviaqa_input.py first)"
        raise DataError(src, ln, "input", "missing field" + (hint if "triviaqa" in Path(src).name else ""))
    text = _text(rec["input"], src, ln, "input")
    if max_turns is not None:
        text = "\n".join(text.split("\n")[-max_turns:])
    if window is not None:
        text = mention_window(text, window)
    if not text.strip():
        raise DataError(src, ln, "input", "empty input")
    outs = rec.get("output")
    if not isinstance(outs, list) or not outs:
        what = "missing field (a test file without answers?)" if outs is None else "expected a non-empty list"
        raise DataError(src, ln, "output", what)
    answers: list[str] = []
    for i, o in enumerate(outs):
        if not isinstance(o, Mapping):
            raise DataError(src, ln, f"output[{i}]", f"wrong type {type(o).__name__}, expected an object")
        if "answer" in o:
            a = _text(o["answer"], src, ln, f"output[{i}].answer").strip()
            if a and a not in answers:
                answers.append(a)
    if not answers:
        raise DataError(src, ln, "output[].answer", "no answer (a test file without answers?)")
    label = None
    if labels is not None:  # classification (FEVER): the one answer is the label
        if len(answers) != 1 or answers[0] not in labels:
            what = "several answers" if len(answers) != 1 else f"label {answers[0]!r}"
            raise DataError(
                src, ln, "output[].answer", f"{what}: expected one of the task's labels {list(labels)}"
            )
        label = answers[0]
    prov = _provenance(outs, src, ln)
    return QAExample(text.strip(), answers, src, ln, str(rid).strip(), label=label, provenance=prov)


def kilt_rows(
    path: Path,
    max_turns: int | None = None,
    labels: Sequence[str] | None = None,
    window: int | None = None,
    **_: Any,
) -> Iterator[tuple[int, QAExample | DataError]]:
    """The ``kilt`` question-set format: ``(line, example or DataError)`` per record; with ``labels`` each
    record's answer must be one of them and becomes the example's label; ``window`` keeps that many words on
    each side of an entity-linking mention (:func:`mention_window`)."""
    src = str(path)
    for ln, rec in iter_jsonl(path):
        if isinstance(rec, DataError):
            yield ln, rec
            continue
        try:
            yield ln, kilt_example(rec, src, ln, max_turns, labels, window)
        except DataError as e:
            yield ln, e


def kilt_gold(example_id: str, provenance: list[Mapping[str, Any]], answers: list[str]) -> Any:
    """The :class:`rag_lightning.tasks.kilt.KiltGold` of an example read by :func:`kilt_example`."""
    from rag_lightning.tasks.kilt import KiltGold

    by_output: dict[int, list[str]] = {}
    for p in provenance:
        ids = by_output.setdefault(int(p.get("output", 0)), [])
        if "wikipedia_id" in p:
            ids.append(str(p["wikipedia_id"]))
    lists = tuple(tuple(dict.fromkeys(ids)) for ids in by_output.values() if ids)
    sets: list[frozenset[str]] = []
    for ids in by_output.values():
        if frozenset(ids) not in sets:
            sets.append(frozenset(ids))
    return KiltGold(example_id, frozenset(answers), lists, tuple(sets))


# ----------------------------------------------------------------------------- knowledge source


def _page_words(page: Mapping[str, Any], src: str, ln: int) -> list[str]:
    paras = page.get("text")
    if not isinstance(paras, list):
        raise DataError(
            src, ln, "text", "missing field" if paras is None else "expected a list of paragraphs"
        )
    words: list[str] = []
    for i, p in enumerate(paras[1:], 1):  # paragraph 0 is the title
        if not isinstance(p, str):
            raise DataError(src, ln, f"text[{i}]", f"wrong type {type(p).__name__}, expected str")
        if SECTION not in p:
            words.extend(p.split())
    return words


def iter_kilt_passages(
    path: str | os.PathLike, fields: Mapping[str, str] | None = None, passage_words: int = 100
) -> Iterator[dict[str, Any]]:
    """Stream ``kilt_knowledgesource.json`` as passages ``{id, title, text, wikipedia_id, line}``, one page in
    memory at a time. A page without text after its title gives no passage."""
    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words}")
    src, n = str(path), 0
    for ln, page in iter_jsonl(path):
        if isinstance(page, DataError):
            raise page
        if not isinstance(page, Mapping):
            raise DataError(src, ln, "<json>", f"wrong type {type(page).__name__}, expected an object")
        pid = _page_id(page.get("wikipedia_id"), src, ln, "wikipedia_id")
        title = _text(page.get("wikipedia_title"), src, ln, "wikipedia_title").strip()
        words = _page_words(page, src, ln)
        for s in range(0, len(words), passage_words):
            n += 1
            text = " ".join(words[s : s + passage_words])
            yield {"id": str(n), "title": title, "text": text, "wikipedia_id": pid, "line": ln}


def write_passages_tsv(
    source: str | os.PathLike, out: str | os.PathLike, passage_words: int = 100
) -> tuple[int, Path]:
    """Write the knowledge source's passages as ``id<TAB>text<TAB>title<TAB>wikipedia_id`` with a header
    (streamed; atomic: a temporary file renamed over ``out``). Returns (passages written, path)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, n = out.with_name(out.name + ".tmp"), 0
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title", "wikipedia_id"])
        for p in iter_kilt_passages(source, passage_words=passage_words):
            w.writerow([p["id"], p["text"], p["title"], p["wikipedia_id"]])
            n += 1
    os.replace(tmp, out)
    return n, out
