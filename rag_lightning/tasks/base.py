"""The task axis: what an example holds, how it is read, collated, predicted and scored, what is monitored.

A task is a small object (a subclass of :class:`Task`, registered by name with :func:`register`) that the
data module and ``RagModule`` both hold (config group ``conf/task/``, chosen by each data config). Neither of
them knows which task runs; they ask it:

- **Examples**: every reader returns :class:`rag_lightning.data.readers.QAExample` rows: ``input`` (alias
  ``question``) the text the retriever and the generator read; ``targets`` (alias ``answers``) the gold
  outputs (QA: answer strings; generation: references; classification: ``[label]``); optional ``gold_ids``
  (corpus ids of gold passages: SQuAD paragraphs, DPR ``positive_ctxs``, KILT provenance), ``label`` and
  ``provenance`` (KILT pages). :meth:`Task.read` reads one set spec, :meth:`Task.check` validates a row.
- **Collation**: ``data.collate.QACollator`` builds the task-independent batch keys (``q_input_ids``,
  ``q_attention_mask``, ``g_question``, ``labels``, ``label_positions``, ``questions``, ``answers``, ``ids``,
  ``gold_ids``, ``set_names``, ``regex``) from :meth:`Task.target` (the training target text of an example)
  and adds :meth:`Task.collate_extra` (e.g. the label choices' token ids).
- **Prediction and scoring**: :meth:`Task.predict` (per batch: ``predictions`` and per-example metric
  tensors, using ``RagModule.generate`` or ``RagModule.choice_logprobs``), :meth:`Task.retrieval_metrics`
  (per example; gold-passage recall@k and R-precision by id wherever gold ids exist),
  :meth:`Task.corpus_metrics` (over a whole set: corpus BLEU, macro-F1) and :meth:`Task.report` (e.g. a
  confusion matrix in the log and in W&B).
- **Monitoring**: ``monitor`` / ``monitor_mode`` (``optimized_metric: val/${task.monitor}``, early stopping
  and the Optuna direction read them), ``summary_keys`` (rows of the run summary) and ``sample_columns``
  (the samples table; :meth:`Task.sample` fills a row).

Per-example metrics are means over examples (``MeanMetric``, pooled over sets and ranks); a per-example
value that is NaN means "not defined for this example" (e.g. gold recall without gold ids) and is left out
of the mean; a metric no example defines is not logged. Adding a task: one file here (a subclass with
``@register("name")``), one ``conf/task/name.yaml`` and its tests (docs/tasks.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from rag_lightning.data.readers import QAExample, QASet

TASKS: dict[str, type[Task]] = {}
NAN = float("nan")


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: ``@register("qa")`` makes the task buildable by name (:func:`build_task`)."""

    def deco(cls: type[Task]) -> type[Task]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} registered twice ({TASKS[name].__name__}, {cls.__name__})")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def build_task(spec: Task | str | Mapping[str, Any] | None) -> Task:
    """A Task from a Task (returned as is), a registered name, a ``{name: ..., **kwargs}`` dict or None (QA)."""
    if isinstance(spec, Task):
        return spec
    _load_builtin()
    if spec is None:
        return TASKS["qa"]()
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", "qa")
    spec.pop("_target_", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name](**spec)


BUILTIN = (
    "qa",
    "generation",
    "classification",
)  # modules of rag_lightning.tasks that register the built-in tasks


def _load_builtin() -> None:
    import importlib

    for name in BUILTIN:
        importlib.import_module(f"rag_lightning.tasks.{name}")


class Task:
    """Base class of a task; the defaults are those every task shares (see the module docstring).

    Args:
        monitor: the validation metric (without ``val/``) checkpoints, early stopping and sweeps read.
        monitor_mode: ``max`` or ``min`` for it.
    """

    name: str = "task"
    corpus_level: bool = False  # True: the module keeps (set, prediction, targets) for corpus_metrics
    summary_keys: tuple[str, ...] = ("loss", "p_entropy", "top1_distinct")
    sample_columns: tuple[str, ...] = ("step", "input", "targets", "prediction", "top_titles")

    def __init__(self, monitor: str = "loss", monitor_mode: str = "min") -> None:
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"task.monitor_mode must be min or max, got {monitor_mode!r}")
        self.monitor, self.monitor_mode = monitor, monitor_mode

    def __repr__(self) -> str:
        return f"{type(self).__name__}(monitor={self.monitor!r})"

    # ------------------------------------------------------------------ examples
    def read(self, spec: Mapping[str, Any], skip_bad_rows: bool = False) -> QASet:
        """One resolved set spec (``{path, format, fields, regex, name, ...}``) -> its examples, checked."""
        raise NotImplementedError

    def check(self, example: QAExample) -> None:
        """Raise ``DataError`` (file, line, field) when a row lacks what the task needs."""

    def query(self, text: str) -> QAExample:
        """An input without a gold output (``RagPipeline.answer``): the placeholder target collates (its loss
        and metrics are not read)."""
        from rag_lightning.data.readers import QAExample

        return QAExample(question=text, answers=[""], source="<query>")

    def target(self, example: QAExample, choice: Callable[[Sequence[str]], str]) -> str:
        """The text the generator is trained (and scored, ``val/loss``) on. ``choice`` picks one of several
        targets (``data.train_answer``: the first, or a random one at training time)."""
        return choice(example.answers)

    def collate_extra(self, examples: Sequence[QAExample], encode: Callable[[list[str]], torch.Tensor]):
        """Extra batch keys; ``encode(texts)`` -> (N, T) generator target ids as the collator makes labels."""
        return {}

    def check_targets(self, encode: Callable[..., torch.Tensor], max_length: int) -> None:
        """Called once the generator's tokenizer is loaded (``QADataModule.setup``): raise ``ConfigError`` when
        the task's fixed targets cannot be trained or scored as configured. ``encode(texts, max_length=None)``
        -> (N, T) target ids, padding -100, as the collator makes labels (``max_length`` default: the data's)."""

    # ------------------------------------------------------------------ prediction and scoring
    def metric_names(self, eval_ks: Sequence[int]) -> list[str]:
        """Per-example metrics :meth:`predict` and :meth:`retrieval_metrics` may return (declared up front)."""
        return ["loss", "p_entropy", *self.gold_metric_names(eval_ks)]

    @staticmethod
    def gold_metric_names(eval_ks: Sequence[int]) -> list[str]:
        from rag_lightning.tasks import kilt

        return [f"gold_recall@{k}" for k in eval_ks] + ["rprec", *kilt.metric_names(eval_ks)]

    def predict(self, module: Any, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor):
        """``{"predictions": list[str], metric: (B,) tensor, ...}`` for one batch. ``doc_scores`` / ``ids``
        (B, K): the passages the generator reads."""
        raise NotImplementedError

    def retrieval_metrics(
        self, corpus: Any, batch: dict[str, Any], ids: torch.Tensor, eval_ks: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Provenance scores by passage id (B,) each, NaN for an example without gold ids:
        ``gold_recall@k`` = a gold passage among the first k retrieved; ``rprec`` = R-precision, the fraction
        of the first R retrieved that are gold, R = the number of the example's gold passages in the corpus."""
        rows = ids.tolist()  # (B, kmax)
        gold_rows = [_rows_of(corpus, g) for g in batch.get("gold_ids") or [[]] * len(rows)]
        out = {f"gold_recall@{k}": [] for k in eval_ks} | {"rprec": []}
        for row, gold in zip(rows, gold_rows):
            first = next((i for i, r in enumerate(row) if r in gold), math.inf) if gold else NAN
            for k in eval_ks:
                out[f"gold_recall@{k}"].append(NAN if not gold else float(first < k))
            r = len(gold)
            out["rprec"].append(NAN if not gold else sum(x in gold for x in row[:r]) / r)
        return {k: torch.tensor(v, dtype=torch.float) for k, v in out.items()}

    def provenance_metrics(
        self,
        corpus: Any,
        batch: dict[str, Any],
        ids: torch.Tensor,
        predictions: Sequence[str],
        eval_ks: Sequence[int] = (),
    ) -> dict[str, torch.Tensor]:
        """KILT's scores by page (B,) each (``kilt_em``, ``KILT-em``, ``kilt_rprec``, ``kilt_recall@k`` for k in
        5 and ``eval_ks``; definitions in :mod:`rag_lightning.tasks.kilt`, as ``rag-eval-kilt`` computes them)
        for the examples with KILT provenance, when the corpus knows its passages' pages; NaN for the others.
        The guess's provenance is the pages of the ``ids`` (B, kmax) retrieved passages."""
        prov = batch.get("provenance") or []
        if not any(prov) or corpus is None or not getattr(corpus, "has_pages", False):
            return {}
        from rag_lightning.tasks.kilt import batch_scores

        pages = [corpus.page_ids(row) for row in ids.tolist()]  # (B, kmax)
        scores = batch_scores(predictions, batch["answers"], prov, pages, eval_ks)
        return {k: torch.tensor(v, dtype=torch.float) for k, v in scores.items()}

    def corpus_metrics(self, predictions: list[str], targets: list[list[str]]) -> dict[str, float]:
        """Metrics over a whole set (not means of per-example values); only with ``corpus_level``."""
        return {}

    def report(self, module: Any, stage: str, predictions: list[str], targets: list[list[str]]) -> None:
        """Anything beyond scalars, after the epoch's metrics (rank 0 only; e.g. a confusion matrix)."""

    def sample(self, batch: dict[str, Any], i: int, prediction: str, titles: list[str]) -> dict[str, Any]:
        """One row of the samples table, keyed by ``sample_columns`` (without ``step``)."""
        return {
            "input": batch["questions"][i],
            "targets": batch["answers"][i],
            "prediction": prediction,
            "top_titles": titles,
        }


def _rows_of(corpus: Any, ext_ids: Sequence[str]) -> set[int]:
    """Corpus rows of the gold passage ids that are in the corpus."""
    rows = set()
    for g in ext_ids:
        with contextlib.suppress(KeyError):
            rows.add(corpus.id_to_row(g))
    return rows
