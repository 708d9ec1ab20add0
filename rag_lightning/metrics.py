r"""Open-domain QA metrics, each defined as the papers' evaluation code defines it. Scores are FRACTIONS in
[0, 1] (the official scripts print percentages, x 100).

String answers, reader EM / F1 -- the official SQuAD v1.1 ``evaluate-v1.1.py``:
    ``normalize_answer``: lowercase, drop ASCII punctuation, drop the words a / an / the, collapse
    whitespace. EM = normalized strings equal; F1 = harmonic mean of precision and recall of the bag
    (multiset) of normalized tokens. Both are the max over the gold answers.

Regex answers, reader EM -- DrQA's ``regex_match_score`` as ``scripts/pipeline/eval.py`` calls it
(CuratedTREC): prediction and pattern are Unicode-NFD normalized (DrQA's ``normalize``), the pattern is
compiled with IGNORECASE | UNICODE | MULTILINE (the ``regex`` package, as DrQA imports it) and must
``match`` at the START of the raw prediction (no SQuAD normalization, not anchored at the end: pattern
``18\d\d`` scores 1 on "1889 or so" and 0 on "in 1889"). F1 of a regex answer is its EM.

Answer presence, retrieval recall@k -- DPR's ``has_answer`` (``dpr/data/qa_validation.py``), used for the
top-k accuracy of DPR, RAG, FiD and Atlas:
    string answers: passage and answer are NFD normalized and split by DPR's ``SimpleTokenizer`` (tokens
    are runs of letters / digits / combining marks ``[\p{L}\p{N}\p{M}]+`` or any other single
    character that is neither a separator nor a control ``[^\p{Z}\p{C}]``), lowercased; the passage has
    the answer when the answer's token sequence occurs contiguously in the passage's. So "Par" is not
    in "Paris", "U.S." is the tokens ``u . s .``, and an answer with no tokens (only whitespace) is in
    every passage (readers reject such answers).
    regex answers: the NFD pattern, IGNORECASE | UNICODE | MULTILINE, ``search``-ed anywhere in the NFD
    passage.
recall@k = fraction of questions with an answer-bearing passage among the first k retrieved.

DPR and DrQA score a pattern that fails to compile as "no match". Here a pattern that is invalid as
written raises ``ValueError`` naming it (readers reject such patterns at load, with file and line); one
that is valid as written but not after NFD (``Sn\ě\žka``: NFD turns ``\ě`` into the bad escape ``\e``
plus a caron; 3 of the 694 CuratedTREC test patterns) never matches, exactly as in DPR and DrQA.

Every regex answer runs under a time budget (``regex``'s ``timeout=``, ``data.regex_timeout_s`` seconds per
match, ``set_regex_timeout``): a pattern that exceeds it (catastrophic backtracking, ``(a|aa)+$`` against a long
run of one letter) scores "no match" there and from then on in this process, and is logged once with the file
and line it was read from (readers record them with ``note_answer_source``). Evaluation never hangs, on any
rank, and a signal (SIGTERM) is handled within one budget.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import regex  # the engine DPR and DrQA tokenize and match answer patterns with (SQuAD's script uses `re`)

__all__ = [
    "normalize_answer",
    "dpr_tokens",
    "compile_answer_regex",
    "validate_answer_regex",
    "note_answer_source",
    "regex_timeouts",
    "set_regex_timeout",
    "exact_match",
    "f1",
    "has_answer",
    "first_hit",
    "recall_at_k",
    "em_f1",
    "mean_exact_match",
    "mean_f1",
]

log = logging.getLogger(__name__)
REGEX_TIMEOUT_S = 0.5  # seconds per match of one answer pattern against one text
_SOURCES: dict[str, str] = {}  # pattern -> "file:line" where a reader first read it
_TIMED_OUT: dict[str, int] = {}  # pattern -> how many matches it was counted as "no match" without running

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=_FLAGS)  # DPR's SimpleTokenizer


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower -> remove punctuation -> remove articles -> collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


def dpr_tokens(text: str) -> list[str]:
    """DPR ``SimpleTokenizer`` words of the NFD text, uncased."""
    return [m.group().lower() for m in _DPR_TOKEN.finditer(_nfd(text))]


def validate_answer_regex(pattern: str) -> None:
    """``ValueError`` naming the pattern when it does not compile as written (readers call this at load)."""
    try:
        regex.compile(pattern, flags=_FLAGS)
    except (regex.error, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"invalid regex answer pattern {pattern!r}: {e}") from None


@lru_cache(maxsize=8192)
def compile_answer_regex(pattern: str) -> regex.Pattern | None:
    """The NFD pattern compiled as DPR / DrQA compile it, or None when only its NFD form is invalid (a
    backslash before an accented letter: ``Sn\\ě\\žka`` becomes ``Sn\\e`` + caron), which DPR and DrQA
    score as no match. ``ValueError`` when the pattern is invalid as written."""
    validate_answer_regex(pattern)
    try:
        return regex.compile(_nfd(pattern), flags=_FLAGS)
    except (regex.error, ValueError, OverflowError, RecursionError):
        return None


def set_regex_timeout(seconds: float) -> None:
    """The time budget of one answer-pattern match (seconds, > 0)."""
    global REGEX_TIMEOUT_S
    if not seconds > 0:
        raise ValueError(f"the regex time budget must be > 0 seconds, got {seconds}")
    REGEX_TIMEOUT_S = float(seconds)


def note_answer_source(pattern: str, where: str) -> None:
    """Record where a regex answer was read (``file:line``; the first place wins), for the timeout message."""
    _SOURCES.setdefault(pattern, where)


def regex_timeouts() -> dict[str, int]:
    """Patterns that exceeded the time budget -> matches they were then scored as "no match" for (first: 0)."""
    return dict(_TIMED_OUT)


def _match(pattern: str, text: str, search: bool) -> bool:
    if pattern in _TIMED_OUT:  # exceeded the budget once: never run again, so the cost stays bounded
        _TIMED_OUT[pattern] += 1
        return False
    p = compile_answer_regex(pattern)
    if p is None:
        return False
    try:
        found = p.search(text, timeout=REGEX_TIMEOUT_S) if search else p.match(text, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        _TIMED_OUT[pattern] = 0
        where = _SOURCES.get(pattern, "source unknown")
        log.warning("%s: regex answer %r exceeded its %gs time budget against a %d-character text: scored as no "
                    "match from now on", where, pattern, REGEX_TIMEOUT_S, len(text))  # fmt: skip
        return False
    return found is not None


def _em_one(pred: str, gold: str, regex: bool) -> float:
    if regex:
        return float(_match(gold, _nfd(pred), search=False))
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1_one(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, answers: Sequence[str], regex: bool = False) -> float:
    """Max over gold answers of SQuAD normalized equality (regex: DrQA's start-anchored match), 1.0 / 0.0;
    0.0 for no answers."""
    return max((_em_one(pred, a, regex) for a in answers), default=0.0)


def f1(pred: str, answers: Sequence[str], regex: bool = False) -> float:
    """Max over gold answers of the SQuAD token-level F1 in [0, 1]; with ``regex`` equals EM."""
    if regex:
        return exact_match(pred, answers, regex=True)
    return max((_f1_one(pred, a) for a in answers), default=0.0)


def has_answer(text: str, answers: Sequence[str], regex: bool = False) -> bool:
    """DPR's ``has_answer``: some gold answer's token sequence occurs in the text's (regex: the pattern is
    found anywhere in the text). See the module docstring."""
    return first_hit([text], answers, regex) == 0


def first_hit(texts: Sequence[str], answers: Sequence[str], regex: bool = False) -> float:
    """Rank of the first text that has a gold answer (DPR ``has_answer``), ``inf`` when none does.

    The answers are tokenized (or compiled) once for all texts; each text is tokenized once.
    """
    if regex:
        for rank, text in enumerate(texts):
            t = _nfd(text)
            if any(_match(a, t, search=True) for a in answers):
                return rank
        return float("inf")
    golds = [dpr_tokens(a) for a in answers]
    for rank, text in enumerate(texts):
        toks = dpr_tokens(text)
        for ans in golds:
            n = len(ans)
            if any(toks[i : i + n] == ans for i in range(len(toks) - n + 1)):
                return rank
    return float("inf")


def recall_at_k(
    topk_texts: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
    ks: Sequence[int] = (1, 5, 20, 100),
    regex: bool = False,
) -> dict[int, float]:
    """Fraction of questions with an answer-bearing passage among the first k retrieved, for each k.

    ``topk_texts[i]`` is question i's ranked passage texts; a k beyond the list length uses the whole
    list. Returns {k: fraction in [0, 1]} (0.0 for every k when there are no questions).
    """
    if len(topk_texts) != len(answers):
        raise ValueError(f"{len(topk_texts)} passage lists but {len(answers)} answer lists")
    if not topk_texts:
        return {int(k): 0.0 for k in ks}
    hits = [first_hit(texts, ans, regex) for texts, ans in zip(topk_texts, answers)]
    n = len(hits)
    return {int(k): sum(h < k for h in hits) / n for k in ks}


def em_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]], regex: bool = False) -> dict:
    """Corpus-level mean EM and F1 (fractions in [0, 1]) and the count of questions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "count": 0}
    em = sum(exact_match(p, a, regex) for p, a in zip(predictions, answers)) / n
    f = sum(f1(p, a, regex) for p, a in zip(predictions, answers)) / n
    return {"em": em, "f1": f, "count": n}


def mean_exact_match(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], regex: bool = False
) -> float:
    return em_f1(predictions, answers, regex)["em"]


def mean_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]], regex: bool = False) -> float:
    return em_f1(predictions, answers, regex)["f1"]
