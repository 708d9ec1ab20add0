"""Input / output pairs for the generation and classification tasks (``rag_lightning.tasks``).

Formats (``fmt=``; ``auto`` detects them from the path):

- ``jsonl``: one JSON object per line; ``json``: a JSON list of such objects.
- ``tsv`` / ``csv``: a header row (``tsv`` splits on tabs, ``csv`` on commas); a targets cell that holds a
  JSON list (``["a", "b"]``) is several references.
- ``hf``: a ``datasets`` Dataset saved with ``save_to_disk`` (a DatasetDict with ``split``).
- ``source_target``: transformers' RAG example layout, ``{split}.source`` and ``{split}.target`` line files
  (line i of one pairs with line i of the other); ``path`` is either file or their common prefix
  (``data/train``). Line = the line in both files.
- ``kilt``: KILT's task files (also detected in a ``.jsonl``), read by :mod:`rag_lightning.data.kilt`: the
  answers are the references; for classification (FEVER) the one answer is the label.

Fields (``fields:`` renames them): ``input`` (default: the first present of ``input``, ``source``,
``question``), ``target`` (generation: ``target``, ``targets``, ``output``, ``answers``, ``answer``; a string
or a list of references), ``label`` (classification: ``label``), optional ``id`` and ``gold_ids`` (corpus ids
of gold passages). Every error is a :class:`DataError` ``"{file}:{line}: field '{field}': {what}"`` at load:
a bad byte, broken JSON, a missing or empty input or target, a label outside the task's label set, a set
without the field its task needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rag_lightning.data.readers import QAExample, QASet, detect_format, read_questions
from rag_lightning.data.textio import (
    DataError,
    encoding_error,
    iter_json_array,
    iter_jsonl,
    missing_field,
    read_lines,
)

log = logging.getLogger(__name__)
PAIR_FORMATS = ("auto", "jsonl", "json", "tsv", "csv", "hf", "source_target", "kilt")
DEFAULT_FIELDS = {
    "input": ("input", "source", "question"),
    "target": ("target", "targets", "output", "answers", "answer"),
    "label": ("label",),
}
Records = Iterator[tuple[int, Mapping[str, Any] | DataError]]


def detect_pair_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    if path.suffix in (".source", ".target") or (not path.exists() and _line_files(path)[0].exists()):
        return "source_target"
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext in (".json", ".tsv", ".csv"):
        return ext[1:]
    raise DataError(path, 0, "<format>", f"cannot detect the format of extension {ext!r}; pass format:")


def _line_files(path: Path) -> tuple[Path, Path]:
    stem = path.with_suffix("") if path.suffix in (".source", ".target") else path
    return Path(f"{stem}.source"), Path(f"{stem}.target")


def _records_source_target(path: Path, **_: Any) -> Records:
    src, tgt = _line_files(path)
    for p in (src, tgt):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (source_target needs {src.name} and {tgt.name})")
    a, b = list(read_lines(src)), list(read_lines(tgt))
    if len(a) != len(b):
        raise DataError(
            tgt, min(len(a), len(b)) + 1, "target", f"{src.name} has {len(a)} lines, {len(b)} here"
        )
    for (ln, s), (_, t) in zip(a, b):
        for p, field, text in ((src, "input", s), (tgt, "target", t)):
            err = encoding_error(p, ln, field, text)
            if err is not None:
                yield ln, err
                break
        else:
            yield ln, {"input": s.rstrip("\r\n"), "target": t.rstrip("\r\n")}


def _records_json(path: Path, strict_encoding: bool = True, **_: Any) -> Records:
    yield from iter_json_array(path, strict_encoding=strict_encoding)


def _records_table(path: Path, delimiter: str, **_: Any) -> Records:
    import csv

    reader = csv.reader((line for _, line in read_lines(path)), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        return
    for row in reader:
        ln = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            yield ln, DataError(path, ln, header[min(len(row), len(header) - 1)], f"expected {len(header)} "
                                f"columns ({', '.join(header)}), got {len(row)}")  # fmt: skip
            continue
        bad = next((e for c, v in zip(header, row) if (e := encoding_error(path, ln, c, v))), None)
        yield ln, bad if bad is not None else dict(zip(header, row))


def _records_hf(path: Path, split: str | None = None, **_: Any) -> Records:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise DataError(path, 1, "split", f"DatasetDict needs a split, one of {list(ds)}")
        ds = ds[split]
    yield from enumerate(ds, 1)


_RECORDS = {
    "source_target": _records_source_target,
    "jsonl": lambda path, **_: iter_jsonl(path),
    "json": _records_json,
    "tsv": lambda path, **kw: _records_table(path, "\t", **kw),
    "csv": lambda path, **kw: _records_table(path, ",", **kw),
    "hf": _records_hf,
}


def _field(rec: Mapping[str, Any], role: str, fields: Mapping[str, str], src: Path, ln: int) -> str | None:
    """The record's key for ``role`` (renamed by ``fields``, else the first default present), None if none."""
    if role in fields:
        return fields[role] if fields[role] in rec else None
    return next((k for k in DEFAULT_FIELDS[role] if k in rec), None)


def _text(value: Any, src: Path, ln: int, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(src, ln, name, f"wrong type {type(value).__name__}, expected a string")
    if not value.strip():
        raise DataError(src, ln, name, f"empty {what}")
    return value.strip()


def _targets(value: Any, src: Path, ln: int, name: str) -> list[str]:
    if isinstance(value, str) and value.strip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):  # else: a target that starts with a bracket
            value = json.loads(value)
    refs = value if isinstance(value, list | tuple) else [value]
    if not refs:
        raise DataError(src, ln, name, "empty target list")
    return [_text(r, src, ln, name, "target") for r in refs]


def _example(
    rec: Any, src: Path, ln: int, fields: Mapping[str, str], need: str, labels: Sequence[str] | None
) -> QAExample:
    if not isinstance(rec, Mapping):
        raise DataError(
            src, ln, fields.get("input", "input"), f"wrong type {type(rec).__name__}, expected an object"
        )
    names = {role: _field(rec, role, fields, src, ln) for role in ("input", need)}
    for role, key in names.items():
        if key is None:
            want = fields.get(role) or " / ".join(DEFAULT_FIELDS[role])
            kind = "classification" if need == "label" else "generation"
            raise missing_field(src, ln, want, role, rec, f"missing field (the {role} of a {kind} example)")
    text = _text(rec[names["input"]], src, ln, names["input"], "input")
    label = None
    if need == "label":
        label = str(rec[names["label"]]).strip()
        if labels is not None and label not in labels:
            raise DataError(
                src, ln, names["label"], f"label {label!r} is not one of the task's labels {list(labels)}"
            )
        targets = [label]
    else:
        targets = _targets(rec[names["target"]], src, ln, names["target"])
    rid = rec.get(fields.get("id", "id"))
    gold = rec.get(fields.get("gold_ids", "gold_ids")) or []
    if not isinstance(gold, list):
        raise DataError(src, ln, fields.get("gold_ids", "gold_ids"), "expected a list of passage ids")
    return QAExample(
        text, targets, str(src), ln, None if rid is None else str(rid), [str(g) for g in gold], label
    )


def read_pairs(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    need: str = "target",
    labels: Sequence[str] | None = None,
    fields: Mapping[str, str] | None = None,
    name: str | None = None,
    skip_bad_rows: bool = False,
    max_logged: int = 5,
    **options: Any,
) -> QASet:
    """Read and check every row of an input / output set (see the module docstring).

    Args:
        need: ``target`` (generation: one or several references) or ``label`` (classification).
        labels: the label set; a label outside it is a DataError.
        fields: ``{"input": col, "target": col, "label": col, "id": col, "gold_ids": col}`` renames.
        options: ``split`` for ``hf``.
    """
    path = Path(path)
    fmt = detect_pair_format(path) if fmt in ("auto", None) else fmt
    if fmt == "kilt" or (fmt == "jsonl" and path.is_file() and detect_format(path) == "kilt"):
        return read_questions(  # KILT task files (data/kilt.py): FEVER's answer is the label
            path, "kilt", name=name, skip_bad_rows=skip_bad_rows, max_logged=max_logged,
            labels=labels if need == "label" else None, **options,
        )  # fmt: skip
    if fmt not in _RECORDS:
        raise ValueError(f"unknown format {fmt!r} for a {need} set; expected one of {PAIR_FORMATS}")
    if fmt != "source_target" and not path.exists():
        raise FileNotFoundError(f"set not found: {path}")
    fields = dict(fields or {})
    out = QASet([], name=name or path.stem)
    for ln, rec in _RECORDS[fmt](path, strict_encoding=not skip_bad_rows, **options):
        try:
            if isinstance(rec, DataError):
                raise rec
            out.examples.append(_example(rec, path, ln, fields, need, labels))
        except DataError as e:
            if fmt == "source_target" and e.field in ("input", "target"):  # name the file the field is in
                e = DataError(_line_files(path)[e.field == "target"], e.line, e.field, e.what)
            if not skip_bad_rows:
                raise e from None
            out.skipped += 1
            if len(out.skip_messages) < max_logged:
                out.skip_messages.append(str(e))
    if out.skipped:
        log.warning(
            "%s: skipped %d bad rows (kept %d); first: %s",
            path,
            out.skipped,
            len(out),
            "; ".join(out.skip_messages),
        )
    if not out.examples:
        raise DataError(path, 0, "<examples>", f"no examples read as {fmt!r}")
    return out
