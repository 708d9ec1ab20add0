"""Generation: free text (long-form answers, summaries, questions, dialogue turns, translations).

Examples: an input and one or several reference outputs (``data.pairs``: jsonl / json / tsv / csv / ``datasets``
folders with renamable fields, and transformers' RAG example ``train.source`` / ``train.target`` files).
Predictions: decoded with the RAG marginal (``model.decoding``: ``max_length``, ``min_length``,
``no_repeat_ngram_size``, ``length_penalty``, ``num_beams``). Metrics, from well-kept libraries, as fractions:

- ``rougeL``: ROUGE-L F-measure (``rouge-score``, Porter stemming, its lowercasing tokenizer), the max over
  references, mean over examples;
- ``bleu`` / ``bleu1``: corpus BLEU (``sacrebleu``, 13a tokenization, up to 4-grams / unigrams only), every
  reference of an example counted;
- ``chrf``: corpus chrF (``sacrebleu``);
- ``f1``: SQuAD token F1 (``metrics.f1``), the max over references, mean over examples;
- ``gold_recall@k`` / ``rprec``: retrieval by gold passage id, where the set has ``gold_ids``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rag_lightning import metrics
from rag_lightning.tasks.base import Task, register


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F of ``prediction`` against its best reference (``rouge_score``)."""
    return max(_rouge_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams (None where an example has fewer)."""
    n = max(map(len, references))
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(n)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
    """sacrebleu corpus BLEU (a fraction) with n-grams up to ``max_order`` (1: BLEU-1)."""
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=max_order).corpus_score(list(predictions), _streams(references)).score / 100


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus chrF (a fraction)."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(list(predictions), _streams(references)).score / 100


@register("generation")
class GenerationTask(Task):
    corpus_level = True
    summary_keys = (
        "loss", "rougeL", "bleu", "bleu1", "chrf", "f1", "gold_recall@1", "gold_recall@5", "rprec",
        "p_entropy", "top1_distinct",
    )  # fmt: skip

    def __init__(self, monitor: str = "rougeL", monitor_mode: str = "max") -> None:
        super().__init__(monitor, monitor_mode)

    def read(self, spec: Mapping[str, Any], skip_bad_rows: bool = False):
        from rag_lightning.data.pairs import read_pairs

        opts = {k: v for k, v in spec.items() if k not in ("path", "format", "fields", "name", "regex")}
        return read_pairs(
            spec["path"], spec.get("format", "auto"), need="target", fields=spec.get("fields"),
            name=spec.get("name"), skip_bad_rows=skip_bad_rows, **opts,
        )  # fmt: skip

    def metric_names(self, eval_ks: Sequence[int]) -> list[str]:
        return ["loss", "rougeL", "f1", "p_entropy", *self.gold_metric_names(eval_ks)]

    def predict(self, module: Any, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor):
        preds = module.generate(batch, doc_scores, ids)
        refs = batch["answers"]
        return {
            "predictions": preds,
            "rougeL": torch.tensor([rouge_l(p, r) for p, r in zip(preds, refs)]),
            "f1": torch.tensor([metrics.f1(p, r) for p, r in zip(preds, refs)]),
        }

    def corpus_metrics(self, predictions: list[str], targets: list[list[str]]) -> dict[str, float]:
        return {
            "bleu": corpus_bleu(predictions, targets),
            "bleu1": corpus_bleu(predictions, targets, max_order=1),
            "chrf": corpus_chrf(predictions, targets),
        }
