"""KILT's answer and provenance scores, as ``kilt/eval_downstream.py`` and ``kilt/eval_retrieval.py`` define
them (facebookresearch/KILT), and KILT's prediction format.

Per example (gold record ``G``, guess record ``P`` whose single output holds ``answer`` and ``provenance``):

- gold answers: the set of ``output[].answer`` that are non-empty after ``strip()``, stripped; the guess
  answer is ``str(answer).strip()``. An empty guess answer scores 0 everywhere (it still counts in the mean).
- ``accuracy``: the stripped guess is one of the gold answers, exactly (FEVER labels, entity titles).
- ``em`` / ``f1``: max over gold answers of the SQuAD-normalized exact match / token F1 (lower case, drop
  ASCII punctuation, drop a / an / the, collapse whitespace; :mod:`rag_lightning.metrics`).
- ``rougel``: max over gold answers of ``Rouge().get_scores(guess, gold, avg=True)["rouge-l"]["f"]`` of the
  ``rouge`` package (pltrdy/rouge 1.0.1, the package KILT calls): no normalization; each text is split into
  sentences at every ``.``, words at single spaces after collapsing whitespace, case kept, punctuation kept
  on words; summary-level union LCS over sets of words; F = 2PR / (P + R + 1e-8) (identical texts score
  0.999999995); a text with no sentence (``""``, ``"..."``) raises inside the package and scores 0.
- ``Rprec`` (page level, R-precision): for each gold output, its distinct provenance ``wikipedia_id``s
  (``str().strip()``; entries without one are skipped), R = their number; the fraction of the first R distinct
  guessed pages that are among them (0 when R = 0); the max over the gold outputs.
- ``recall@5``: each gold output with a ``provenance`` list is an evidence set (the set of its page ids; an
  entry without ``wikipedia_id`` adds the id ``""``; an empty list is an empty set that can never be
  completed); equal sets count once. The guessed pages are walked in order: a page in an evidence set is
  removed from every set that holds it, a set it empties puts ``True`` in the rank, a set left partial puts
  (or moves up) one marker, a page in no set puts ``False``. recall@k = the ``True``s among the first k rank
  entries / the number of distinct evidence sets (0 with no guessed page or no evidence set).
- ``KILT-accuracy`` / ``KILT-em`` / ``KILT-f1`` / ``KILT-rougel``: the example's downstream score when its
  ``Rprec`` is exactly 1, else 0.

Every score is a mean over the gold records (in gold order); guesses are matched by ``str(id).strip()``.
Beyond the official script: a text so long that the ``rouge`` package's recursive LCS needs more than
Python's recursion limit is scored with the limit raised (the official script stops there with
RecursionError); bad input is a :class:`DataError` naming file, line and field instead of an assertion.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_lightning.data.textio import DataError, iter_jsonl
from rag_lightning.metrics import exact_match, f1

DOWNSTREAM = ("accuracy", "em", "f1", "rougel")
KS = (5,)  # recall@k reported (eval_downstream.py reports recall@5)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class KiltGold:
    """What the scores need of a gold record."""

    id: str
    answers: frozenset[str]  # stripped, non-empty
    # per output with pages: its distinct page ids, in order (R-precision)
    page_lists: tuple[tuple[str, ...], ...]
    # the distinct evidence sets of the outputs with a provenance list (recall@k)
    evidence_sets: tuple[frozenset[str], ...]


@dataclass(frozen=True)
class KiltGuess:
    id: str
    answer: str  # stripped
    pages: tuple[str, ...]  # distinct provenance page ids, in rank order


def _distinct(xs: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(xs))


def _pid(prov: Mapping[str, Any]) -> str:
    return str(prov["wikipedia_id"]).strip()


def gold_from_record(rec: Mapping[str, Any]) -> KiltGold:
    """A validated KILT record (see :func:`read_kilt_records`) -> :class:`KiltGold`."""
    outs = rec["output"]
    answers = frozenset(
        o["answer"].strip() for o in outs if isinstance(o.get("answer"), str) and o["answer"].strip()
    )
    lists = tuple(_distinct(_pid(p) for p in o.get("provenance", []) if "wikipedia_id" in p) for o in outs)
    lists = tuple(x for x in lists if x)  # an empty list scores R-precision 0, never the max
    sets: list[frozenset[str]] = []
    for o in outs:
        if "provenance" in o:
            s = frozenset(_pid(p) if "wikipedia_id" in p else "" for p in o["provenance"])
            if s not in sets:
                sets.append(s)
    return KiltGold(str(rec["id"]).strip(), answers, lists, tuple(sets))


def guess_from_record(rec: Mapping[str, Any], src: str = "", line: int = 0) -> KiltGuess:
    outs = rec["output"]
    if len(outs) != 1 or "answer" not in outs[0]:
        what = f"{len(outs)} outputs" if len(outs) != 1 else "no 'answer'"
        raise DataError(
            src, line, "output", f"a guess needs exactly one output holding an answer, got {what}"
        )
    pages = _distinct(_pid(p) for p in outs[0].get("provenance", []) if "wikipedia_id" in p)
    return KiltGuess(str(rec["id"]).strip(), str(outs[0]["answer"]).strip(), pages)


# ----------------------------------------------------------------------------- per-example scores


def rougel(prediction: str, reference: str) -> float:
    """KILT's ``_rougel_score``: the ``rouge`` package's ROUGE-L F of one pair, 0.0 when it finds a text empty."""
    from rouge import Rouge

    need = 2 * (len(prediction.split()) + len(reference.split())) + 200
    old = sys.getrecursionlimit()
    try:
        if need > old:
            sys.setrecursionlimit(need)
        return Rouge().get_scores(prediction, reference, avg=True)["rouge-l"]["f"]
    except ValueError:  # "Hypothesis is empty." / "Reference is empty."
        return 0.0
    finally:
        sys.setrecursionlimit(old)


def downstream_scores(answer: str, gold_answers: Iterable[str]) -> dict[str, float]:
    """accuracy, em, f1, rougel of one stripped guess answer against the stripped gold answers."""
    golds = list(gold_answers)
    if not answer:
        return dict.fromkeys(DOWNSTREAM, 0.0)
    return {
        "accuracy": float(answer in golds),
        "em": exact_match(answer, golds),
        "f1": f1(answer, golds),
        "rougel": max(rougel(answer, g) for g in golds),
    }


def r_precision(pages: Sequence[str], page_lists: Sequence[Sequence[str]]) -> float:
    """Page-level R-precision, the max over the gold outputs' page lists (0 for an empty list)."""
    best = 0.0
    for gold in page_lists:
        r = len(gold)
        best = max(best, sum(p in gold for p in pages[:r]) / r if r else 0.0)
    return best


def evidence_rank(pages: Sequence[str], evidence_sets: Sequence[frozenset[str]]) -> list[Any]:
    """KILT's ``get_rank``: True where a guessed page completes an evidence set, a marker per partly covered
    set (moved to its latest page), False for a page in no set."""
    left = [set(s) for s in evidence_sets]
    rank: list[Any] = []
    for page in pages:
        found = False
        for i, s in enumerate(left):
            if page in s:
                found = True
                marker = f"evidence_set:{i}"
                if marker in rank:
                    rank.remove(marker)
                s.remove(page)
                rank.append(True if not s else marker)
        if not found:
            rank.append(False)
    return rank


def recall_at_k(pages: Sequence[str], evidence_sets: Sequence[frozenset[str]], k: int) -> float:
    """Completed evidence sets among the first k rank entries / distinct evidence sets."""
    if not pages or not evidence_sets:
        return 0.0
    return evidence_rank(pages, evidence_sets)[:k].count(True) / len(evidence_sets)


def example_scores(guess: KiltGuess, gold: KiltGold, ks: Sequence[int] = KS) -> dict[str, float]:
    """Every KILT score of one example (the corpus scores are their means)."""
    if guess.answer and not gold.answers:
        raise ValueError(f"gold record {gold.id!r} has no answer to score against")
    down = downstream_scores(guess.answer, gold.answers)
    rprec = r_precision(guess.pages, gold.page_lists)
    out = dict(down)
    out |= {f"KILT-{k}": v if rprec == 1 else 0.0 for k, v in down.items()}
    out["Rprec"] = rprec
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(guess.pages, gold.evidence_sets, k)
    return out


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Means in KILT's layout ``{"downstream": ..., "kilt": ..., "retrieval": ...}``."""
    n = len(rows)

    def mean(key: str) -> float:
        total = 0
        for r in rows:
            total += r[key]
        return total / n if n else 0.0

    return {
        "downstream": {k: mean(k) for k in DOWNSTREAM},
        "kilt": {f"KILT-{k}": mean(f"KILT-{k}") for k in DOWNSTREAM},
        "retrieval": {"Rprec": mean("Rprec"), **{f"recall@{k}": mean(f"recall@{k}") for k in KS}},
    }


# ----------------------------------------------------------------------------- validation


def recall_ks(eval_ks: Sequence[int] = ()) -> list[int]:
    """The k of the page-level recall@k logged: KILT's 5 and the run's eval_ks."""
    return sorted({*KS, *(int(k) for k in eval_ks)})


def metric_names(eval_ks: Sequence[int] = ()) -> list[str]:
    """Logged at validation / test for sets with KILT provenance over a corpus with pages (``val/KILT-em`` ...)."""
    return [
        *(f"kilt_{k}" for k in DOWNSTREAM),
        *(f"KILT-{k}" for k in DOWNSTREAM),
        "kilt_rprec",
        *(f"kilt_recall@{k}" for k in recall_ks(eval_ks)),
    ]


def batch_scores(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    provenance: Sequence[Sequence[Mapping[str, Any]]],
    page_rows: Sequence[Sequence[str]],
    eval_ks: Sequence[int] = (),
) -> dict[str, list[float]]:
    """KILT's scores (:func:`metric_names`) of a batch: ``page_rows`` (B, K) the pages of the retrieved passages
    in rank order (the guess's provenance, de-duplicated here); NaN for an example without provenance."""
    from rag_lightning.data.kilt import kilt_gold

    names, ks = metric_names(eval_ks), recall_ks(eval_ks)
    out: dict[str, list[float]] = {m: [] for m in names}
    for i, (pred, golds, prov, pages) in enumerate(zip(predictions, answers, provenance, page_rows)):
        if not prov:
            for m in names:
                out[m].append(float("nan"))
            continue
        guess = KiltGuess(str(i), str(pred).strip(), _distinct(p for p in pages if p))
        gold = kilt_gold(str(i), list(prov), [a.strip() for a in golds if a.strip()])
        scores = example_scores(guess, gold, ks)
        for k in DOWNSTREAM:
            out[f"kilt_{k}"].append(scores[k])
            out[f"KILT-{k}"].append(scores[f"KILT-{k}"])
        out["kilt_rprec"].append(scores["Rprec"])
        for k in ks:
            out[f"kilt_recall@{k}"].append(scores[f"recall@{k}"])
    return out


# ----------------------------------------------------------------------------- files


def _check_record(rec: Any, src: str, ln: int, need_answer: bool) -> None:
    if not isinstance(rec, Mapping):
        raise DataError(src, ln, "<json>", f"wrong type {type(rec).__name__}, expected an object")
    if rec.get("id") is None or str(rec["id"]).strip() == "":
        raise DataError(src, ln, "id", "missing field")
    outs = rec.get("output")
    if not isinstance(outs, list) or not outs:
        what = "missing field" if outs is None else "expected a non-empty list"
        raise DataError(src, ln, "output", what)
    for i, o in enumerate(outs):
        if not isinstance(o, Mapping):
            raise DataError(src, ln, f"output[{i}]", f"wrong type {type(o).__name__}, expected an object")
        if need_answer and "answer" in o and not isinstance(o["answer"], str):
            raise DataError(src, ln, f"output[{i}].answer", f"wrong type {type(o['answer']).__name__}")
        provs = o.get("provenance", [])
        if not isinstance(provs, list):
            raise DataError(src, ln, f"output[{i}].provenance", "expected a list")
        for j, p in enumerate(provs):
            if not isinstance(p, Mapping):
                raise DataError(src, ln, f"output[{i}].provenance[{j}]", "expected an object")


def read_kilt_records(path: str | os.PathLike, gold: bool = True) -> list[tuple[int, dict[str, Any]]]:
    """``(line, record)`` of a KILT jsonl file, each checked (``id``, ``output`` objects, provenance lists) and
    ids unique, else DataError naming file, line and field."""
    src, out, seen = str(path), [], {}
    for ln, rec in iter_jsonl(path):
        if isinstance(rec, DataError):
            raise rec
        _check_record(rec, src, ln, need_answer=gold)
        rid = str(rec["id"]).strip()
        if rid in seen:
            raise DataError(src, ln, "id", f"duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = ln
        out.append((ln, rec))
    return out


def evaluate_files(
    guess_path: str | os.PathLike, gold_path: str | os.PathLike
) -> dict[str, dict[str, float]]:
    """KILT's ``eval_downstream.evaluate(gold, guess)``: every gold record needs a guess with its id (extra
    guesses are ignored, as there)."""
    gold = read_kilt_records(gold_path, gold=True)
    guesses = {}
    for ln, rec in read_kilt_records(guess_path, gold=False):
        g = guess_from_record(rec, str(guess_path), ln)
        guesses[g.id] = g
    rows = []
    for ln, rec in gold:
        g = gold_from_record(rec)
        if g.id not in guesses:
            raise DataError(gold_path, ln, "id", f"no prediction for id {g.id!r} in {guess_path}")
        guess = guesses[g.id]
        if guess.answer and not g.answers:
            raise DataError(gold_path, ln, "output[].answer", "no gold answer to score against")
        rows.append(example_scores(guess, g))
    return aggregate(rows)


# ----------------------------------------------------------------------------- predictions


def provenance(page_ids: Sequence[Any], titles: Sequence[str]) -> list[dict[str, str]]:
    """The pages of the retrieved passages, de-duplicated in rank order: ``[{wikipedia_id, title}, ...]``."""
    out, seen = [], set()
    for pid, title in zip(page_ids, titles):
        if pid is None or str(pid) == "" or str(pid) in seen:
            continue
        seen.add(str(pid))
        out.append({"wikipedia_id": str(pid), "title": title})
    return out


def prediction_record(
    rid: Any, answer: str, page_ids: Sequence[Any], titles: Sequence[str]
) -> dict[str, Any]:
    """One line of a KILT guess file."""
    return {"id": rid, "output": [{"answer": answer, "provenance": provenance(page_ids, titles)}]}


def write_predictions(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write a KILT guess file (jsonl) atomically: a temporary file renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
