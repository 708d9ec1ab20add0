"""Question-set readers for the public open-domain QA files as published, plus generic jsonl / csv / json.

Formats (``fmt=``; ``auto`` detects them from the extension and the first line or bytes):

- ``dpr_csv``: DPR's ``*.qa.csv`` / ``retriever/qas/*.csv``: ``question<TAB>['answer', ...]``, no header.
- ``jsonl`` / ``nq_open``: one JSON object per line, ``question`` and ``answers`` (or ``answer``).
- ``csv`` / ``tsv``: a header row; the answers cell is a JSON / Python list literal or one answer.
- ``json``: a JSON list of such objects. ``dpr_json``: DPR's retriever training files (``*-train.json``,
  ``biencoder-*.json``): ``question``, ``answers``, and ``positive_ctxs`` whose ``passage_id`` (or
  ``psg_id``) become ``gold_ids``.
- ``squad``: SQuAD v1.1 json; ``gold_ids`` = ``{article}-{paragraph}``.
- ``curatedtrec``: CuratedTREC as published in brmson/dataset-factoid-curated (``large2180-test.tsv``,
  ``curated-*.tsv``, ...): ``id<TAB>type<TAB>question<TAB>answer_regex``, no header, no quoting; the
  answer is one regular expression (the rest of the line); regex answers are on by default.
- ``triviaqa``: TriviaQA's ``unfiltered-web-*.json`` / ``verified-*.json`` / ``qa/*.json``: top-level
  ``Data`` list, ``Question``, ``QuestionId``, ``Answer.Value`` and ``Answer.Aliases``; answers = Value
  then the Aliases (as FiD takes them; the first answer is the training target). In a ``VerifiedEval``
  file only the questions with ``QuestionPartOfVerifiedEval`` are kept, as the official reader does.
- ``webquestions``: ``webquestions.examples.*.json``: a JSON list of ``{url, targetValue, utterance}``
  with ``targetValue`` = ``(list (description "a") (description b) ...)``.
- ``hf``: a ``datasets`` Dataset saved with ``save_to_disk``.
- ``kilt``: KILT's task files (``*-kilt.jsonl``: ``id``, ``input``, ``output[].answer`` and
  ``output[].provenance``), detected from their first record; see :mod:`rag_lightning.data.kilt`.

Every reader returns a :class:`QASet`. Bad input raises :class:`DataError` ``"{file}:{line}: field
'{field}': {what}"`` at load time: a byte that is not UTF-8 (a BOM is accepted), a missing or empty
field, an unparsable answer list, an invalid answer regex (with ``regex``), and a set with no questions.
For whole-file JSON formats ``line`` is the 1-based record number (broken JSON and bad bytes: the
physical line). With ``skip_bad_rows=True`` bad rows are skipped, counted and logged instead.
"""

from __future__ import annotations

import ast
import csv
import functools
import json
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_lightning.data.textio import (
    DataError,
    encoding_error,
    first_line,
    is_blank,
    iter_json_array,
    iter_jsonl,
    load_json,
    missing_field,
    read_head,
    read_lines,
)
from rag_lightning.metrics import compile_answer_regex, note_answer_source, validate_answer_regex

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)

FORMATS = (
    "auto",
    "dpr_csv",
    "jsonl",
    "nq_open",
    "csv",
    "tsv",
    "json",
    "dpr_json",
    "squad",
    "curatedtrec",
    "triviaqa",
    "webquestions",
    "hf",
    "kilt",
)
REGEX_BY_DEFAULT = {"curatedtrec"}
__all__ = ["FORMATS", "DataError", "QAExample", "QASet", "detect_format", "read_questions"]


@dataclass
class QAExample:
    """One example of any task (``rag_lightning.tasks``): ``question`` is the input text (alias ``input``),
    ``answers`` the gold outputs (alias ``targets``: QA answers, regexes when the set has ``regex=True``;
    generation references; classification ``[label]``)."""

    question: str
    answers: list[str]
    source: str = ""
    line: int = 0
    id: str | None = None
    gold_ids: list[str] = field(default_factory=list)  # corpus "id"s of gold passages, when known
    label: str | None = None  # classification: the gold label (one of the task's labels)
    provenance: list[dict[str, Any]] = field(default_factory=list)  # e.g. KILT pages {wikipedia_id, title}

    @property
    def input(self) -> str:
        return self.question

    @property
    def targets(self) -> list[str]:
        return self.answers


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


# ----------------------------------------------------------------------------- field checks


def _parse_answer_string(s: str, src: str, line: int, fname: str) -> list[Any]:
    """A list literal (JSON or Python, never eval) or, if it does not look like a list, a single answer."""
    t = s.strip()
    if not t.startswith("["):
        return [s]
    try:
        return json.loads(t)
    except (json.JSONDecodeError, RecursionError):  # nested too deeply: literal_eval says so below
        pass
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise DataError(src, line, fname, f"unparsable answer list {t[:60]!r} ({type(e).__name__})") from None


def _check_text(value: str, src: str, line: int, fname: str) -> None:
    err = encoding_error(src, line, fname, value)
    if err is not None:
        raise err


def _check_answers(value: Any, src: str, line: int, fname: str, regex: bool = False) -> list[str]:
    """Normalize an answers value to a non-empty list of non-empty strings (valid patterns with ``regex``)."""
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
        if is_blank(a):  # zero-width / format characters only: matches nothing a reader can write
            raise DataError(src, line, fname, f"empty answer string (only invisible characters {a!r})")
        _check_text(a, src, line, fname)
        if regex:
            try:
                validate_answer_regex(a)
            except ValueError as e:
                raise DataError(src, line, fname, str(e)) from None
            note_answer_source(a, f"{src}:{line}")  # named if the pattern ever exceeds its time budget
            if compile_answer_regex(a) is None:
                log.warning(
                    "%s:%d: field '%s': pattern %r is invalid after Unicode NFD, so it never matches (as in "
                    "DPR and DrQA scoring)",
                    src,
                    line,
                    fname,
                    a,
                )
    return list(value)


def _require_object(rec: Any, src: str, line: int, fname: str) -> None:
    """A record must be a JSON object; the error names the field the reader looked for first."""
    if not isinstance(rec, Mapping):
        raise DataError(src, line, fname, f"wrong type {type(rec).__name__}, expected a JSON object")


def _check_question(value: Any, src: str, line: int, fname: str) -> str:
    if value is None:
        raise DataError(src, line, fname, "missing field")
    if not isinstance(value, str):
        raise DataError(src, line, fname, f"wrong type {type(value).__name__}, expected str")
    if is_blank(value):
        raise DataError(src, line, fname, "empty question")
    _check_text(value, src, line, fname)
    return value.strip()


def _from_record(rec: Any, src: str, line: int, qf: str, af: str | None, regex: bool = False) -> QAExample:
    """Build an example from a dict record; ``af=None`` tries ``answers`` then ``answer``."""
    _require_object(rec, src, line, qf)
    if qf not in rec:
        raise missing_field(src, line, qf, "question", rec)
    names = [af] if af else ["answers", "answer"]
    aname = next((n for n in names if n in rec), None)
    if aname is None:
        raise missing_field(src, line, names[0], "answers", rec)
    question = _check_question(rec[qf], src, line, qf)
    answers = _check_answers(rec[aname], src, line, aname, regex)
    rid = rec.get("id")
    gold = rec.get("gold_ids") or []
    return QAExample(question, answers, src, line, None if rid is None else str(rid), [str(g) for g in gold])


# ----------------------------------------------------------------------------- row generators
# Each yields (line, example-or-DataError) so the driver decides whether to raise or skip. Options every
# generator receives: question_field, answers_field, regex, strict_encoding (False with skip_bad_rows).

Row = Iterator[tuple[int, "QAExample | DataError"]]


def _guard(fn) -> QAExample | DataError:
    try:
        return fn()
    except DataError as e:
        return e


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """csv.reader rows with the physical line they end on (BOM dropped, bad bytes kept as surrogates)."""
    reader = csv.reader((line for _, line in read_lines(path)), delimiter=delimiter)
    for row in reader:
        yield reader.line_num, row


def _bad_cell(row: list[str], names: list[str], src: str, ln: int) -> DataError | None:
    for i, cell in enumerate(row):
        err = encoding_error(src, ln, names[i] if i < len(names) else f"column {i + 1}", cell)
        if err is not None:
            return err
    return None


def _checked_row(
    row: list[str], names: list[str], src: str, ln: int, make: Callable[[list[str], int], QAExample]
) -> QAExample | DataError:
    """A text row's example: its first cell that is not UTF-8 (named by ``names``) is the row's error, else
    ``make(row, ln)`` builds it (a DataError it raises is the row's error)."""
    bad = _bad_cell(row, names, src, ln)
    return bad if bad is not None else _guard(lambda: make(row, ln))


def _rows_dpr_csv(path: Path, regex: bool = False, **_: Any) -> Row:
    """DPR qas file: ``question<TAB>['answer', ...]``, no header (NQ, TriviaQA, WebQuestions, CuratedTREC)."""
    src = str(path)

    def make(row: list[str], ln: int) -> QAExample:
        question = _check_question(row[0], src, ln, "question")
        answers = _check_answers(_parse_answer_string(row[1], src, ln, "answers"), src, ln, "answers", regex)
        return QAExample(question, answers, src, ln)

    for ln, row in _csv_rows(path, "\t"):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2:
            yield ln, DataError(src, ln, "answers", f"expected 2 tab-separated columns, got {len(row)}")
            continue
        yield ln, _checked_row(row, ["question", "answers"], src, ln, make)


_TREC_COLUMNS = ("id", "type", "question", "answer_regex")


def _rows_curatedtrec(path: Path, regex: bool = True, **_: Any) -> Row:
    """brmson/dataset-factoid-curated tsv: ``id, type, question, answer_regex``; no header, no quoting.

    The answer is the rest of the line after the third tab (one published row, large2180-train.tsv:701,
    holds a backslash-escaped tab inside its pattern).
    """
    src = str(path)

    def make(cols: list[str], ln: int) -> QAExample:
        question = _check_question(cols[2], src, ln, "question")
        answers = _check_answers([cols[3]], src, ln, "answer_regex", regex)
        return QAExample(question, answers, src, ln, cols[0].strip() or None)

    for ln, line in read_lines(path):
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        cols = text.split("\t", 3)
        if len(cols) != 4:
            yield (
                ln,
                DataError(
                    src,
                    ln,
                    _TREC_COLUMNS[len(cols)],
                    f"expected 4 tab-separated columns ({', '.join(_TREC_COLUMNS)}), got {len(cols)}",
                ),
            )
            continue
        yield ln, _checked_row(cols, list(_TREC_COLUMNS), src, ln, make)


def _rows_jsonl(
    path: Path,
    question_field: str = "question",
    answers_field: str | None = None,
    regex: bool = False,
    **_: Any,
) -> Row:
    src = str(path)
    for ln, rec in iter_jsonl(path):
        if isinstance(rec, DataError):
            yield ln, rec
            continue
        yield (
            ln,
            _guard(lambda rec=rec, ln=ln: _from_record(rec, src, ln, question_field, answers_field, regex)),
        )


def _rows_csv(
    path: Path,
    question_field: str = "question",
    answers_field: str | None = None,
    delimiter: str | None = None,
    regex: bool = False,
    **_: Any,
) -> Row:
    """CSV/TSV with a header row; the answers column holds a JSON/Python list literal or one answer string."""
    src = str(path)
    delim = delimiter or ("\t" if "\t" in first_line(path) else ",")
    rows = _csv_rows(path, delim)
    header = next(rows, (1, []))[1]
    if not header:
        return  # an empty file: read_questions says so
    bad = _bad_cell(header, [f"header column {i + 1}" for i in range(len(header))], src, 1)
    if bad is not None:
        raise bad
    if question_field not in header:
        raise missing_field(src, 1, question_field, "question", header, "missing column in header")

    def make(row: list[str], ln: int) -> QAExample:
        return _from_record(dict(zip(header, row)), src, ln, question_field, answers_field, regex)

    for ln, row in rows:
        if not row:
            continue
        if len(row) != len(header):
            yield ln, DataError(src, ln, question_field, f"expected {len(header)} columns, got {len(row)}")
            continue
        yield ln, _checked_row(row, header, src, ln, make)


def _json_records(path: Path, make: Callable[[Any, int], QAExample], strict_encoding: bool) -> Row:
    """Each record of a file holding a JSON list, streamed (the files are GBs), through ``make(record, n)``
    (``n``: the 1-based record number, the ``line`` of its errors)."""
    for n, rec in iter_json_array(path, strict_encoding=strict_encoding):
        yield n, rec if isinstance(rec, DataError) else _guard(lambda rec=rec, n=n: make(rec, n))


def _gold_passage_ids(rec: Mapping[str, Any], src: str, n: int) -> list[str]:
    ctxs = rec.get("positive_ctxs") or []
    if not isinstance(ctxs, list):
        raise DataError(src, n, "positive_ctxs", f"wrong type {type(ctxs).__name__}, expected a list")
    ids = []
    for c in ctxs:
        pid = next((c[k] for k in ("passage_id", "psg_id", "id") if isinstance(c, Mapping) and k in c), None)
        if pid is not None:
            ids.append(str(pid))
    return ids


def _rows_json_list(
    path: Path,
    question_field: str = "question",
    answers_field: str | None = None,
    regex: bool = False,
    strict_encoding: bool = True,
    dpr: bool = False,
    **_: Any,
) -> Row:
    """A JSON file holding a list of records (record number = line). ``dpr``: DPR's retriever files
    (``{question, answers, positive_ctxs, negative_ctxs, ...}``): ``answers`` required, ``gold_ids`` from
    the ``positive_ctxs``."""
    src = str(path)
    answers_field = answers_field or ("answers" if dpr else None)

    def make(rec: Any, n: int) -> QAExample:
        ex = _from_record(rec, src, n, question_field, answers_field, regex)
        if dpr:
            ex.gold_ids = _gold_passage_ids(rec, src, n)
        return ex

    return _json_records(path, make, strict_encoding)


_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^\s()"]+))\s*\)')


def webquestions_answers(target: str) -> list[str]:
    """Answers of a WebQuestions ``targetValue``: ``(list (description "A b") (description C))`` ->
    ``["A b", "C"]`` (quoted values unescape ``\\"`` and ``\\\\``); ValueError if it is not such a list."""
    t = target.strip()
    if not (t.startswith("(list") and t.endswith(")")):
        raise ValueError("expected '(list (description ...) ...)'")
    body = t[len("(list") : -1]
    out, pos = [], 0
    for m in _DESCRIPTION.finditer(body):
        if body[pos : m.start()].strip():
            raise ValueError(f"unexpected {body[pos : m.start()].strip()[:40]!r}")
        quoted, bare = m.group(1), m.group(2)
        out.append(re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare)
        pos = m.end()
    if body[pos:].strip():
        raise ValueError(f"unexpected {body[pos:].strip()[:40]!r}")
    return out


def _rows_webquestions(path: Path, regex: bool = False, strict_encoding: bool = True, **_: Any) -> Row:
    """WebQuestions (SEMPRE release): a list of ``{url, targetValue, utterance}``; id = the Freebase url."""
    src = str(path)

    def make(rec: Any, n: int) -> QAExample:
        _require_object(rec, src, n, "utterance")
        question = _check_question(rec.get("utterance"), src, n, "utterance")
        target = rec.get("targetValue")
        if not isinstance(target, str):
            raise DataError(src, n, "targetValue", "missing field" if target is None else "expected a string")
        try:
            answers = webquestions_answers(target)
        except ValueError as e:
            raise DataError(src, n, "targetValue", f"{e} in {target[:80]!r}") from None
        answers = _check_answers(answers, src, n, "targetValue", regex)
        return QAExample(question, answers, src, n, rec.get("url"))

    return _json_records(path, make, strict_encoding)


def _rows_triviaqa(
    path: Path, regex: bool = False, strict_encoding: bool = True, verified_only: bool = True, **_: Any
) -> Row:
    """TriviaQA json (``Data`` list, streamed); a ``VerifiedEval`` file keeps its verified questions only."""
    src = str(path)

    def make(rec: Any, n: int) -> QAExample:
        _require_object(rec, src, n, "Question")
        question = _check_question(rec.get("Question"), src, n, "Question")
        ans = rec.get("Answer")
        if not isinstance(ans, Mapping):
            what = "missing field (a test file without answers?)" if ans is None else "expected an object"
            raise DataError(src, n, "Answer", what)
        value, aliases = ans.get("Value"), ans.get("Aliases") or []
        if not isinstance(aliases, list):
            raise DataError(src, n, "Answer.Aliases", f"wrong type {type(aliases).__name__}, expected a list")
        answers = list(dict.fromkeys(([value] if value is not None else []) + aliases))
        answers = _check_answers(answers, src, n, "Answer.Value" if not aliases else "Answer.Aliases", regex)
        qid = rec.get("QuestionId")
        return QAExample(question, answers, src, n, None if qid is None else str(qid))

    top: dict[str, Any] = {}  # VerifiedEval comes after Data in the published files: decide at the end
    rows = []
    for n, rec in iter_json_array(path, "Data", strict_encoding, rest=top):
        part = not isinstance(rec, Mapping) or rec.get("QuestionPartOfVerifiedEval", True)
        item = rec if isinstance(rec, DataError) else _guard(lambda rec=rec, n=n: make(rec, n))
        rows.append((n, item, bool(part)))
    verified = verified_only and bool(top.get("VerifiedEval"))
    if verified:
        log.info(
            "%s: verified evaluation file, keeping %d of %d questions",
            src,
            sum(p for *_, p in rows),
            len(rows),
        )
    for n, item, part in rows:
        if part or not verified:
            yield n, item


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
    path: Path,
    split: str | None = None,
    split_seed: int = 0,
    articles: list[int] | None = None,
    regex: bool = False,
    strict_encoding: bool = True,
    **_: Any,
) -> Row:
    """SQuAD v1.1: every question with all its gold answers; gold_ids = ``{article_idx}-{para_idx}``.

    ``split`` in {train, val, test} keeps only that part of :func:`squad_article_split` (by article);
    ``articles`` keeps an explicit list of article indices.
    """
    src = str(path)
    data = load_json(path, strict_encoding)
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise DataError(src, 1, "data", "missing field (not a SQuAD file; pass fmt= for another format)")
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
                    ans = _check_answers(answers, src, n, "answers", regex)
                    return QAExample(q, ans, src, n, qa.get("id"), [f"{a}-{p}"])

                yield n, _guard(make)


def squad_paragraphs(path: str | os.PathLike, articles: list[int] | None = None) -> Iterator[dict[str, str]]:
    """Yield SQuAD paragraphs as passages ``{"id": f"{article_idx}-{para_idx}", "title", "text"}``.

    The title is the article title with underscores replaced by spaces.
    """
    data = load_json(Path(path))
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
    regex: bool = False,
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
        yield n, _guard(lambda rec=rec, n=n: _from_record(rec, src, n, question_field, answers_field, regex))


_READERS = {
    "dpr_csv": _rows_dpr_csv,
    "jsonl": _rows_jsonl,
    "nq_open": _rows_jsonl,
    "csv": _rows_csv,
    "tsv": _rows_csv,
    "json": _rows_json_list,
    "dpr_json": functools.partial(_rows_json_list, dpr=True),
    "squad": _rows_squad,
    "curatedtrec": _rows_curatedtrec,
    "triviaqa": _rows_triviaqa,
    "webquestions": _rows_webquestions,
    "hf": _rows_hf,
    "kilt": lambda path, **kw: _kilt_rows(path, **kw),
}


def _kilt_rows(path: Path, **kw: Any) -> Row:
    from rag_lightning.data.kilt import kilt_rows  # it imports QAExample from here

    return kilt_rows(path, **kw)


def _looks_kilt(line: str) -> bool:
    """A KILT record: ``id``, ``input`` and a list ``output``."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(rec, dict) and {"id", "input"} <= rec.keys() and isinstance(rec.get("output"), list)


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format from the extension and the first line / bytes (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    ext = p.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        return "kilt" if _looks_kilt(first_line(p)) else "jsonl"
    if ext == ".json":
        head = read_head(p).lstrip()
        if head.startswith("["):
            if '"targetValue"' in head and '"utterance"' in head:
                return "webquestions"
            return "dpr_json" if '"positive_ctxs"' in head else "json"
        return "triviaqa" if re.search(r'"Data"\s*:\s*\[', head) else "squad"
    if ext in (".csv", ".tsv", ".txt"):
        cols = first_line(p).split("\t")
        if len(cols) == 2 and cols[1].lstrip().startswith(("[", '"[')):
            return "dpr_csv"
        if len(cols) >= 4 and cols[0].strip().isdigit() and re.fullmatch(r"[a-z]+", cols[1]):
            return "curatedtrec"  # id<TAB>type<TAB>question<TAB>answer_regex, no header
        return "csv"
    raise DataError(p, 0, "<format>", f"cannot detect the format of extension {ext!r}; pass fmt=")


# An answer "looks like a pattern" when it holds regex syntax that plain answers (NQ-open, SQuAD) almost
# never do: an escape such as \s \d \. , a character class [..], (?, .* .+ .?, )?, an optional letter
# inside a word (Sept?ember), an alternation a|b, or a ^ / $ anchor. Measured: 54% of CuratedTREC test
# questions (curated-test.tsv) have such an answer, 0.06% of NQ-open (EfficientQA dev), 0.03% of SQuAD dev.
_PATTERN_HINT = re.compile(
    r"\\[sdwbSDWB.()\[\]?*+|$^{}]|\[[^\]\s]+\]|\(\?|\.[*+?]|\)\?|\w\?\w|\S\|\S|^\^|\$$"
)
_PATTERN_WARN_FRACTION = 0.05


def _warn_if_patterns(qa: QASet, path: Path) -> None:
    looks = [e for e in qa if any(_PATTERN_HINT.search(a) for a in e.answers)]
    if len(looks) >= max(1, _PATTERN_WARN_FRACTION * len(qa)):
        ex = looks[0]
        log.warning(
            "%s: %d of %d questions have answers that look like regular expressions (e.g. line %d: %r) but "
            "the set is read with regex=False, so they are compared as strings; pass regex=True (set spec "
            "{path: ..., regex: true}) if they are patterns (CuratedTREC)",
            path,
            len(looks),
            len(qa),
            ex.line,
            next(a for a in ex.answers if _PATTERN_HINT.search(a)),
        )


def read_questions(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    fields: Mapping[str, str] | None = None,
    regex: bool | None = None,
    name: str | None = None,
    skip_bad_rows: bool = False,
    max_logged: int = 5,
    **options: Any,
) -> QASet:
    """Read and validate a question set (every row, at once: errors surface here, not during training).

    Args:
        path: file (or directory for ``fmt="hf"``).
        fmt: one of :data:`FORMATS`; ``auto`` detects from extension and content.
        fields: ``{"question": col, "answers": col}`` for jsonl/csv/json/dpr_json/hf (default ``question``
            and ``answers``, falling back to ``answer``).
        regex: answers are regular expressions (CuratedTREC); ``None`` = the format's default (True for
            ``curatedtrec``, else False). Patterns are compiled here; an invalid one is a DataError.
        skip_bad_rows: skip bad rows, count them, log the count and the first ``max_logged`` messages.
        options: format options (``split``/``split_seed``/``articles`` for squad, ``split`` for hf,
            ``delimiter`` for csv, ``verified_only`` for triviaqa).

    Raises:
        DataError: a bad row (without ``skip_bad_rows``), or no questions at all (empty file, every row
            skipped, or a filter that keeps nothing).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question set not found: {path}")
    fmt = detect_format(path) if fmt in ("auto", None) else fmt
    if fmt not in _READERS:
        raise DataError(
            path, 0, "format", f"unknown question format {fmt!r}; valid formats: {', '.join(FORMATS)}"
        )
    regex = (fmt in REGEX_BY_DEFAULT) if regex is None else bool(regex)
    fields = dict(fields or {})
    kw = dict(
        options,
        question_field=fields.get("question", "question"),
        answers_field=fields.get("answers"),
        regex=regex,
        strict_encoding=not skip_bad_rows,
    )
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
    if not qa.examples:
        why = (
            f"all {qa.skipped} rows were bad and skipped"
            if qa.skipped
            else "the file (or its selection) is empty"
        )
        raise DataError(path, 0, "<questions>", f"no questions read as {fmt!r}: {why}")
    if not regex:
        _warn_if_patterns(qa, path)
    return qa
