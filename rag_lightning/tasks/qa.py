"""Open-domain QA: short answers decoded by the RAG marginal, scored by SQuAD EM / F1 and DPR recall@k.

Examples: ``question`` + gold ``answers`` (strings, or regexes for CuratedTREC) from every format of
``data.readers`` (DPR csv, NQ-open, SQuAD, TriviaQA, WebQuestions, CuratedTREC, jsonl / csv / json / hf).
Metrics per question: ``em``, ``f1`` (official SQuAD v1.1; DrQA regex match), ``recall@k`` (DPR's
``has_answer``: an answer string in one of the top-k passages), and where the set has gold passages
(SQuAD, DPR ``positive_ctxs``) ``gold_recall@k`` and ``rprec`` by passage id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rag_lightning import metrics
from rag_lightning.tasks.base import Task, register

_SET_KEYS = ("path", "format", "fields", "regex", "name")


@register("qa")
class QATask(Task):
    summary_keys = ("loss", "em", "f1", "recall@1", "recall@5", "recall@20", "p_entropy", "top1_distinct")
    sample_columns = ("step", "question", "answers", "prediction", "top_titles")

    def __init__(self, monitor: str = "em", monitor_mode: str = "max") -> None:
        super().__init__(monitor, monitor_mode)

    def read(self, spec: Mapping[str, Any], skip_bad_rows: bool = False):
        from rag_lightning.data.readers import read_questions

        opts = {k: v for k, v in spec.items() if k not in _SET_KEYS}
        return read_questions(
            spec["path"],
            spec.get("format", "auto"),
            fields=spec.get("fields"),
            regex=spec.get("regex"),  # None: the format's default (on for curatedtrec)
            name=spec.get("name"),
            skip_bad_rows=skip_bad_rows,
            **opts,
        )

    def metric_names(self, eval_ks: Sequence[int]) -> list[str]:
        return [
            "loss",
            "em",
            "f1",
            "p_entropy",
            *[f"recall@{k}" for k in eval_ks],
            *self.gold_metric_names(eval_ks),
        ]

    def predict(self, module: Any, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor):
        preds = module.generate(batch, doc_scores, ids)
        regex = bool(batch.get("regex", False))
        answers = batch["answers"]
        return {
            "predictions": preds,
            "em": torch.tensor([metrics.exact_match(p, a, regex=regex) for p, a in zip(preds, answers)]),
            "f1": torch.tensor([metrics.f1(p, a, regex=regex) for p, a in zip(preds, answers)]),
        }

    def retrieval_metrics(
        self, corpus: Any, batch: dict[str, Any], ids: torch.Tensor, eval_ks: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """``recall@k`` (an answer string in the top k, DPR's ``has_answer``) and the provenance scores."""
        regex = bool(batch.get("regex", False))
        texts = [corpus.texts(row) for row in ids.tolist()]
        first_hit = torch.tensor(
            [metrics.first_hit(t, a, regex=regex) for t, a in zip(texts, batch["answers"])]
        )  # (B,) rank of the first passage with an answer, inf if none
        out = {f"recall@{k}": (first_hit < k).float() for k in eval_ks}
        return out | super().retrieval_metrics(corpus, batch, ids, eval_ks)

    def sample(self, batch: dict[str, Any], i: int, prediction: str, titles: list[str]) -> dict[str, Any]:
        return {
            "question": batch["questions"][i],
            "answers": batch["answers"][i],
            "prediction": prediction,
            "top_titles": titles,
        }
