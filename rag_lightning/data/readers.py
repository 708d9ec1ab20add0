"""Question-set readers: DPR qas csv, NQ-open / generic jsonl, csv with header, SQuAD v1.1 json, HF datasets.

Every reader returns a :class:`QASet` (a sequence of :class:`QAExample`). Bad input raises :class:`DataError`
with the message ``"{file}:{line}: field '{field}': {what}"``; for JSON and Arrow sources ``line`` is the
1-based record number. With ``skip_bad_rows=True`` bad rows are skipped, counted and logged instead.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import random
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)

FORMATS = ("auto", "dpr_csv", "jsonl", "nq_open", "csv", "tsv", "json", "squad", "hf")


class DataError(ValueError):
    """Bad input data; the message names file, line (or record) and field."""

    def __init__(self, source: str | os.PathLike, line: int, field_name: str, what: str) -> None:
        self.source, self.line, self.field, self.what = str(source), line, field_name, what
        super().__init__(f"{source}:{line}: field '{field_name}': {what}")


@dataclass
class QAExample:
    """One question with its gold answers (regexes when the set has ``regex=True``)."""

    question: str
    answers: list[str]
    source: str = ""
    line: int = 0
    id: str | None = None
    gold_ids: list[str] = field(default_factory=list)  # corpus "id"s of gold passages, when known


@dataclass
class QASet:
    """A list of examples plus the set's name, regex flag and skip report (sequence protocol)."""

    examples: list[QAExample]
    name: str = ""
    regex: bool = False
    skipped: int = 0
    skip_messages: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[QAExample]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> QAExample:
        return self.examples[i]


# ----------------------------------------------------------------------------- field parsing


def _parse_answer_string(s: str, src: str, line: int, fname: str) -> list[Any]:
    """A list literal (JSON or Python, never eval) or, if it does not look like a list, a single answer."""
    t = s.strip()
    if not t.startswith("["):
        return [s]
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise DataError(src, line, fname, f"unparsable answer list {t[:60]!r} ({type(e).__name__})") from None


def _check_answers(value: Any, src: str, line: int, fname: str) -> list[str]:
    """Normalize an answers value to a non-empty list of non-empty strings."""
    if isinstance(value, Mapping) and "text" in value:  # SQuAD / HF style {"text": [...], ...}
        value = value["text"]
    if isinstance(value, str):
        value = _parse_answer_string(value, src, line, fname)
    if not isinstance(value, (list, tuple)):
        raise DataError(src, line, fname, f"wrong type {type(value).__name__}, expected a list of strings")
    if len(value) == 0:
        raise DataError(src, line, fname, "empty answer list")
    for a in value:
        if not isinstance(a, str):
            raise DataError(src, line, fname, f"wrong type {type(a).__name__} in answer list, expected str")
        if not a.strip():
            raise DataError(src, line, fname, "empty answer string")
    return list(value)


def _check_question(value: Any, src: str, line: int, fname: str) -> str:
    if value is None:
        raise DataError(src, line, fname, "missing field")
    if not isinstance(value, str):
        raise DataError(src, line, fname, f"wrong type {type(value).__name__}, expected str")
    if not value.strip():
        raise DataError(src, line, fname, "empty question")
    return value.strip()


def _from_record(rec: Any, src: str, line: int, qf: str, af: str | None) -> QAExample:
    """Build an example from a dict record; ``af=None`` tries ``answers`` then ``answer``."""
    if not isinstance(rec, Mapping):
        raise DataError(src, line, qf, f"wrong type {type(rec).__name__}, expected a JSON object")
    if qf not in rec:
        raise DataError(src, line, qf, "missing field")
    names = [af] if af else ["answers", "answer"]
    aname = next((n for n in names if n in rec), None)
    if aname is None:
        raise DataError(src, line, names[0], "missing field")
    question = _check_question(rec[qf], src, line, qf)
    answers = _check_answers(rec[aname], src, line, aname)
    rid = rec.get("id")
    gold = rec.get("gold_ids") or []
    return QAExample(question, answers, src, line, None if rid is None else str(rid), [str(g) for g in gold])


# ----------------------------------------------------------------------------- row generators
# Each yields (line, example-or-DataError) so the driver decides whether to raise or skip.

Row = Iterator[tuple[int, "QAExample | DataError"]]


def _guard(fn) -> QAExample | DataError:
    try:
        return fn()
    except DataError as e:
        return e


def _rows_dpr_csv(path: Path, **_: Any) -> Row:
    """DPR qas file: ``question<TAB>['answer', ...]``, no header (NQ, TriviaQA, WebQuestions, CuratedTREC)."""
    src = str(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        for row in reader:
            ln = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                yield ln, DataError(src, ln, "answers", f"expected 2 tab-separated columns, got {len(row)}")
                continue
            yield (
                ln,
                _guard(
                    lambda row=row, ln=ln: QAExample(
                        _check_question(row[0], src, ln, "question"),
                        _check_answers(_parse_answer_string(row[1], src, ln, "answers"), src, ln, "answers"),
                        src,
                        ln,
                    )
                ),
            )


def _rows_jsonl(
    path: Path, question_field: str = "question", answers_field: str | None = None, **_: Any
) -> Row:
    src = str(path)
    with open(path, encoding="utf-8") as f:
        for ln, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield ln, DataError(src, ln, "<json>", f"broken JSON: {e.msg} at column {e.colno}")
                continue
            yield ln, _guard(lambda rec=rec, ln=ln: _from_record(rec, src, ln, question_field, answers_field))


def _rows_csv(
    path: Path,
    question_field: str = "question",
    answers_field: str | None = None,
    delimiter: str | None = None,
    **_: Any,
) -> Row:
    """CSV/TSV with a header row; the answers column holds a JSON/Python list literal or one answer string."""
    src = str(path)
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        delim = delimiter or ("\t" if "\t" in first else ",")
        f.seek(0)
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None) or []
        if question_field not in header:
            raise DataError(src, 1, question_field, f"missing column in header {header}")
        for row in reader:
            ln = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                yield (
                    ln,
                    DataError(src, ln, question_field, f"expected {len(header)} columns, got {len(row)}"),
                )
                continue
            rec = dict(zip(header, row))
            yield ln, _guard(lambda rec=rec, ln=ln: _from_record(rec, src, ln, question_field, answers_field))


def _rows_json_list(
    path: Path, question_field: str = "question", answers_field: str | None = None, **_: Any
) -> Row:
    """A JSON file holding a list of records (record number = line)."""
    src = str(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(src, 1, "<json>", "expected a list of records or a SQuAD file with 'data'")
    for n, rec in enumerate(data, 1):
        yield n, _guard(lambda rec=rec, n=n: _from_record(rec, src, n, question_field, answers_field))


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, "<json>", f"broken JSON: {e.msg} at column {e.colno}") from None


def squad_article_split(
    n_articles: int, sizes: tuple[int, int, int] = (36, 6, 6), seed: int = 0
) -> dict[str, list[int]]:
    """Deterministic split of article indices into train/val/test (seeded shuffle; sizes scaled if needed)."""
    order = list(range(n_articles))
    random.Random(seed).shuffle(order)
    total = sum(sizes)
    n_val = round(sizes[1] * n_articles / total)
    n_test = round(sizes[2] * n_articles / total)
    n_train = n_articles - n_val - n_test
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def _rows_squad(
    path: Path, split: str | None = None, split_seed: int = 0, articles: list[int] | None = None, **_: Any
) -> Row:
    """SQuAD v1.1: every question with all its gold answers; gold_ids = ``{article_idx}-{para_idx}``.

    ``split`` in {train, val, test} keeps only that part of :func:`squad_article_split` (by article);
    ``articles`` keeps an explicit list of article indices.
    """
    src = str(path)
    data = _load_json(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise DataError(src, 1, "data", "missing field (not a SQuAD file)")
    keep: set[int] | None = set(articles) if articles is not None else None
    if split is not None:
        keep = set(squad_article_split(len(data["data"]), seed=split_seed)[split])
    n = 0
    for a, art in enumerate(data["data"]):
        for p, para in enumerate(art.get("paragraphs", [])):
            for qa in para.get("qas", []):
                n += 1
                if keep is not None and a not in keep:
                    continue
                answers = [x.get("text") if isinstance(x, Mapping) else x for x in qa.get("answers", [])]
                answers = list(dict.fromkeys(answers))  # dedupe, order kept

                def make(qa=qa, answers=answers, n=n, a=a, p=p) -> QAExample:
                    q = _check_question(qa.get("question"), src, n, "question")
                    ans = _check_answers(answers, src, n, "answers")
                    return QAExample(q, ans, src, n, qa.get("id"), [f"{a}-{p}"])

                yield n, _guard(make)


def squad_paragraphs(path: str | os.PathLike, articles: list[int] | None = None) -> Iterator[dict[str, str]]:
    """Yield SQuAD paragraphs as passages ``{"id": f"{article_idx}-{para_idx}", "title", "text"}``.

    The title is the article title with underscores replaced by spaces.
    """
    data = _load_json(Path(path))
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise DataError(path, 1, "data", "missing field (not a SQuAD file)")
    for a, art in enumerate(data["data"]):
        if articles is not None and a not in articles:
            continue
        title = str(art.get("title", "")).replace("_", " ")
        for p, para in enumerate(art.get("paragraphs", [])):
            yield {"id": f"{a}-{p}", "title": title, "text": para["context"]}


def _rows_hf(
    path: Path,
    question_field: str = "question",
    answers_field: str | None = None,
    split: str | None = None,
    **_: Any,
) -> Row:
    """A ``datasets`` Dataset (or DatasetDict + ``split``) saved with ``save_to_disk``; record number = row + 1."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise DataError(path, 1, "split", f"DatasetDict needs a split, one of {list(ds)}")
        ds = ds[split]
    src = str(path)
    for n, rec in enumerate(ds, 1):
        yield n, _guard(lambda rec=rec, n=n: _from_record(rec, src, n, question_field, answers_field))


_READERS = {
    "dpr_csv": _rows_dpr_csv,
    "jsonl": _rows_jsonl,
    "nq_open": _rows_jsonl,
    "csv": _rows_csv,
    "tsv": _rows_csv,
    "json": _rows_json_list,
    "squad": _rows_squad,
    "hf": _rows_hf,
}


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format from the extension and the first line / bytes."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    ext = p.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".json":
        with open(p, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith("[") else "squad"
    if ext in (".csv", ".tsv", ".txt"):
        with open(p, encoding="utf-8") as f:
            first = f.readline()
        cols = first.rstrip("\r\n").split("\t")
        if len(cols) == 2 and cols[1].lstrip().startswith(("[", '"[')):
            return "dpr_csv"
        return "csv"
    raise DataError(p, 0, "<format>", f"cannot detect the format of extension {ext!r}; pass fmt=")


def read_questions(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    fields: Mapping[str, str] | None = None,
    regex: bool = False,
    name: str | None = None,
    skip_bad_rows: bool = False,
    max_logged: int = 5,
    **options: Any,
) -> QASet:
    """Read a question set.

    Args:
        path: file (or directory for ``fmt="hf"``).
        fmt: one of :data:`FORMATS`; ``auto`` detects from extension and content.
        fields: ``{"question": col, "answers": col}`` for jsonl/csv/json/hf (default ``question`` and
            ``answers``, falling back to ``answer``).
        regex: answers are regular expressions (CuratedTREC).
        skip_bad_rows: skip bad rows, count them, log the count and the first ``max_logged`` messages.
        options: format options (``split``/``split_seed``/``articles`` for squad, ``split`` for hf,
            ``delimiter`` for csv).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question set not found: {path}")
    fmt = detect_format(path) if fmt in ("auto", None) else fmt
    if fmt not in _READERS:
        raise ValueError(f"unknown question format {fmt!r}; expected one of {FORMATS}")
    fields = dict(fields or {})
    kw = dict(options, question_field=fields.get("question", "question"), answers_field=fields.get("answers"))
    qa = QASet([], name=name or path.stem, regex=regex)
    for _, item in _READERS[fmt](path, **kw):
        if isinstance(item, DataError):
            if not skip_bad_rows:
                raise item
            qa.skipped += 1
            if len(qa.skip_messages) < max_logged:
                qa.skip_messages.append(str(item))
            continue
        qa.examples.append(item)
    if qa.skipped:
        log.warning(
            "%s: skipped %d bad rows (kept %d); first: %s",
            path,
            qa.skipped,
            len(qa),
            "; ".join(qa.skip_messages),
        )
    return qa
