"""Classification (FEVER-style verification, any labelled input), scored exactly under the RAG marginal.

Examples: an input and a label from ``labels`` (``data.pairs``; a label outside the set is an error at
load). Each label is a *verbalizer*, a short text the generator is trained to produce (``verbalizers``,
default the label itself), as the RAG paper mapped FEVER's classes to tokens. Prediction scores every
label's verbalizer y_c by its exact log-likelihood under the model's marginal over the K retrieved passages
(``RagModule.choice_logprobs``: RAG-Token sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y_<t), RAG-Sequence
log sum_k p(z_k|x) p(y|x,z_k)) and predicts the argmax: no free decoding, so a prediction is always a label.
Metrics: ``accuracy`` (per example), ``macro_f1`` (torchmetrics, over the labels that occur in the gold
labels or the predictions), the confusion matrix (log, and a W&B table ``{stage}/confusion``), and
retrieval by gold passage id where the set has ``gold_ids``.

A verbalizer of several tokens is scored exactly as well (the log-likelihood of its whole target, EOS
included), so single tokens are not required; the RAG paper's FEVER mapping used single BART tokens, as
``true`` / ``false`` are in BART's vocabulary and in MiniLM's. At setup (:meth:`check_targets`) each
verbalizer's token count is logged, and a verbalizer longer than ``data.max_target_length`` (which would be
trained and scored cut) or two verbalizers with the same target ids stop the run with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rag_lightning.tasks.base import Task, register

log = logging.getLogger(__name__)


@register("classification")
class ClassificationTask(Task):
    corpus_level = True
    summary_keys = (
        "loss", "accuracy", "macro_f1", "gold_recall@1", "gold_recall@5", "rprec", "p_entropy", "top1_distinct",
    )  # fmt: skip

    def __init__(
        self,
        labels: Sequence[str] = (),
        verbalizers: Mapping[str, str] | Sequence[str] | None = None,
        monitor: str = "accuracy",
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(monitor, monitor_mode)
        self.labels = [str(x) for x in labels]
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels must name at least 2 distinct labels, got {self.labels}")
        if verbalizers is None:
            verbalizers = self.labels
        if isinstance(verbalizers, Mapping):
            missing = [x for x in self.labels if x not in verbalizers]
            if missing:
                raise ValueError(f"task.verbalizers has no text for labels {missing}")
            verbalizers = [str(verbalizers[x]) for x in self.labels]
        self.verbalizers = [str(v) for v in verbalizers]
        if len(self.verbalizers) != len(self.labels) or len(set(self.verbalizers)) != len(self.labels):
            raise ValueError(f"task.verbalizers must give one distinct text per label: {self.verbalizers}")

    def read(self, spec: Mapping[str, Any], skip_bad_rows: bool = False):
        from rag_lightning.data.pairs import read_pairs

        opts = {k: v for k, v in spec.items() if k not in ("path", "format", "fields", "name", "regex")}
        return read_pairs(
            spec["path"], spec.get("format", "auto"), need="label", labels=self.labels,
            fields=spec.get("fields"), name=spec.get("name"), skip_bad_rows=skip_bad_rows, **opts,
        )  # fmt: skip

    def query(self, text: str) -> Any:
        example = super().query(text)
        example.answers, example.label = (
            [self.labels[0]],
            self.labels[0],
        )  # a placeholder the collator encodes
        return example

    def target(self, example: Any, choice: Callable[[Sequence[str]], str]) -> str:
        return self.verbalizers[self.labels.index(example.label)]

    def check_targets(self, encode: Callable[..., torch.Tensor], max_length: int) -> None:
        """Each verbalizer whole within ``max_length`` target tokens, and told apart from the others
        (``ConfigError``: one line, exit code 2 from the CLI)."""
        from rag_lightning.preflight import ConfigError

        rows = [
            [t for t in encode([v], max_length=10_000)[0].tolist() if t != -100] for v in self.verbalizers
        ]
        for label, verbalizer, row in zip(self.labels, self.verbalizers, rows):
            if len(row) > max_length:
                raise ConfigError(
                    f"task.verbalizers: {label} -> {verbalizer!r} is {len(row)} generator target tokens (specials "
                    f"included), more than data.max_target_length={max_length}: raise it or shorten the verbalizer"
                )
        if len({tuple(r) for r in rows}) < len(rows):
            raise ConfigError(f"task.verbalizers {self.verbalizers} give identical generator targets: {rows}")
        log.info(
            "verbalizers as generator targets (specials included; several tokens are scored exactly): %s",
            ", ".join(f"{x} -> {v!r}: {len(r)}" for x, v, r in zip(self.labels, self.verbalizers, rows)),
        )

    def collate_extra(self, examples: Sequence[Any], encode: Callable[[list[str]], torch.Tensor]):
        """``choice_labels``: one (1, T_c) generator target row per label, in ``labels`` order."""
        return {"choice_labels": [encode([v]) for v in self.verbalizers]}

    def metric_names(self, eval_ks: Sequence[int]) -> list[str]:
        return ["loss", "accuracy", "p_entropy", *self.gold_metric_names(eval_ks)]

    def predict(self, module: Any, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor):
        lp = module.choice_logprobs(batch, doc_scores, ids, batch["choice_labels"])  # (B, C)
        preds = [self.labels[i] for i in lp.argmax(-1).tolist()]
        gold = [a[0] for a in batch["answers"]]
        return {
            "predictions": preds,
            "accuracy": torch.tensor([float(p == g) for p, g in zip(preds, gold)]),
        }

    def _indices(self, predictions: list[str], targets: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        index = {x: i for i, x in enumerate(self.labels)}
        return torch.tensor([index[p] for p in predictions]), torch.tensor([index[t[0]] for t in targets])

    def corpus_metrics(self, predictions: list[str], targets: list[list[str]]) -> dict[str, float]:
        from torchmetrics.functional.classification import multiclass_f1_score

        p, t = self._indices(predictions, targets)
        return {"macro_f1": float(multiclass_f1_score(p, t, num_classes=len(self.labels), average="macro"))}

    def confusion(self, predictions: list[str], targets: list[list[str]]) -> list[list[int]]:
        """Counts [gold label][predicted label], in ``labels`` order."""
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        p, t = self._indices(predictions, targets)
        return multiclass_confusion_matrix(p, t, num_classes=len(self.labels)).tolist()

    def report(self, module: Any, stage: str, predictions: list[str], targets: list[list[str]]) -> None:
        """The confusion matrix: a text table in the log, and a W&B table on every attached W&B logger."""
        from lightning.pytorch.loggers import WandbLogger

        matrix = self.confusion(predictions, targets)
        columns = ["gold \\ predicted", *self.labels]
        rows = [[label, *counts] for label, counts in zip(self.labels, matrix)]
        width = max(len(c) for c in columns)
        text = "\n".join(" ".join(f"{str(c):>{width}}" for c in r) for r in [columns, *rows])
        log.info("%s confusion matrix (%d examples):\n%s", stage, len(predictions), text)
        trainer = getattr(module, "_trainer", None)
        for lg in trainer.loggers if trainer is not None else []:
            if isinstance(lg, WandbLogger):
                lg.log_table(key=f"{stage}/confusion", columns=columns, data=rows)
