"""The few lines a researcher reads at the end of a run: before -> after, per set, and where things are."""

from __future__ import annotations

import logging
import os

import lightning as L
from omegaconf import DictConfig

from rag_lightning.readers import FUSION

KEYS = ("loss", "em", "f1", "recall@1", "recall@5", "recall@20", "p_entropy", "top1_distinct")  # QA's rows
PLAIN = {"loss": "{:6.3f}", "p_entropy": "{:6.3f}", "top1_distinct": "{:6.0f}"}  # the rest are percentages


def _fmt(v: float | None, key: str) -> str:
    if v is None:
        return "   -  "
    return PLAIN[key].format(v) if key in PLAIN else f"{100 * v:5.1f}%"


def set_names(metrics: dict, stage: str) -> list[str]:
    """Set names in per-set keys ``{stage}/{set name}/{metric}``, in first-seen order."""
    names: list[str] = []
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == stage and parts[1] not in names:
            names.append(parts[1])
    return names


def _rows(prefix: str, columns: list[dict], label: str, keys: tuple[str, ...] = KEYS) -> list[str]:
    out = []
    for k in keys:
        values = [c.get(f"{prefix}/{k}") for c in columns]
        if all(v is None for v in values):
            continue
        out.append(f"{label + k:<14}" + "".join(f"{_fmt(v, k):>10}" for v in values))
    return out


def reader_title(variant: str) -> str:
    """How the summary names the reader: ``token marginalization`` for the marginal readers, ``fid reader`` for
    the fusion readers (they read all passages at once and marginalize nothing)."""
    return f"{variant} reader" if variant in FUSION else f"{variant} marginalization"


def print_summary(cfg: DictConfig, trainer: L.Trainer, before: dict, after: dict, test: dict) -> None:
    """Pooled val (before / after) and test metrics, then one block per set when there are several; the rows
    are the task's ``summary_keys`` (the model's task; QA: :data:`KEYS`)."""
    task = getattr(getattr(trainer, "lightning_module", None), "task", None)
    keys = tuple(task.summary_keys) if task is not None else KEYS
    lines = ["", "=" * 60, f"rag-lightning run summary ({reader_title(cfg.model.get('variant', '?'))})"]
    lines.append(f"{'metric':<14}{'before':>10}{'after':>10}" + (f"{'test':>10}" if test else ""))
    for k in keys:
        b, a, t = before.get(f"val/{k}"), after.get(f"val/{k}"), test.get(f"test/{k}")
        if a is None and b is None and t is None:
            continue
        row = f"{'val/' + k:<14}{_fmt(b, k):>10}{_fmt(a, k):>10}"
        lines.append(row + (f"{_fmt(t, k):>10}" if test else ""))
    val_sets, test_sets = set_names({**before, **after}, "val"), set_names(test, "test")
    if val_sets or test_sets:
        lines.append("(rows above: all sets pooled)")
    for name in val_sets:
        lines.append(f"-- val set {name}: before, after")
        lines += _rows(f"val/{name}", [before, after], "   ", keys)
    for name in test_sets:
        lines.append(f"-- test set {name}")
        lines += _rows(f"test/{name}", [test], "   ", keys)
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        lines.append(f"checkpoint: {ckpt.best_model_path}")
    lines.append(f"outputs:    {os.path.abspath(cfg.paths.output_dir)}")
    lines.append("=" * 60)
    text = "\n".join(lines)
    print(text, flush=True)
    log_to_files(text)


def log_to_files(text: str) -> None:
    """`text` as one INFO record to the root logger's file handlers only (the run's `train.log`): the console
    already has it from print, so stdout stays as it was."""
    record = logging.LogRecord(__name__, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
