"""Open-domain QA metrics: SQuAD v1.1 EM / F1, answer presence, retrieval recall@k.

``normalize_answer``, ``exact_match`` and ``f1`` follow the official SQuAD v1.1 ``evaluate-v1.1.py``
(lowercase, drop punctuation, drop the articles a / an / the, collapse whitespace; F1 on the bag of
normalized tokens; the max over all gold answers). All scores are FRACTIONS in [0, 1]; the official
script prints percentages (x 100).

``regex=True`` (CuratedTREC-style answers): each gold answer is a regular expression; EM is 1 when the
pattern matches the WHOLE raw prediction (``re.fullmatch``, IGNORECASE) or the whole normalized prediction,
F1 is then EM (a pattern has no tokens), and ``has_answer`` uses ``re.search`` (IGNORECASE) on the raw
passage text. An invalid pattern raises ``ValueError`` naming it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1",
    "has_answer",
    "recall_at_k",
    "em_f1",
    "mean_exact_match",
    "mean_f1",
]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower -> remove punctuation -> remove articles -> collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE)
    except re.error as e:
        raise ValueError(f"invalid regex answer pattern {pattern!r}: {e}") from e


def _em_one(pred: str, gold: str, regex: bool) -> float:
    if regex:
        pat = _compile(gold)
        return float(
            pat.fullmatch(pred.strip()) is not None or pat.fullmatch(normalize_answer(pred)) is not None
        )
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
    """Max over gold answers of normalized string equality (1.0 / 0.0); 0.0 for no answers."""
    return max((_em_one(pred, a, regex) for a in answers), default=0.0)


def f1(pred: str, answers: Sequence[str], regex: bool = False) -> float:
    """Max over gold answers of the SQuAD token-level F1 in [0, 1]; with ``regex`` equals EM."""
    if regex:
        return exact_match(pred, answers, regex=True)
    return max((_f1_one(pred, a) for a in answers), default=0.0)


def has_answer(text: str, answers: Sequence[str], regex: bool = False) -> bool:
    """True if some normalized gold answer occurs in the normalized text as a contiguous token
    sequence (regex: ``re.search`` with IGNORECASE on the raw text). Empty answers never match."""
    if regex:
        return any(_compile(a).search(text) is not None for a in answers)
    toks = normalize_answer(text).split()
    for a in answers:
        ans = normalize_answer(a).split()
        n = len(ans)
        if n and any(toks[i : i + n] == ans for i in range(len(toks) - n + 1)):
            return True
    return False


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
    # rank of the first hit per question (inf when none), so each passage is checked once
    first_hit = []
    for texts, ans in zip(topk_texts, answers):
        first_hit.append(next((r for r, t in enumerate(texts) if has_answer(t, ans, regex)), float("inf")))
    n = len(first_hit)
    return {int(k): sum(h < k for h in first_hit) / n for k in ks}


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
