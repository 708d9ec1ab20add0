"""The few lines a researcher reads at the end of a run: before -> after, and where things are."""

from __future__ import annotations

import os

import lightning as L
from omegaconf import DictConfig

KEYS = ("loss", "em", "f1", "recall@1", "recall@5", "recall@20", "p_entropy", "top1_distinct")
PLAIN = {"loss": "{:6.3f}", "p_entropy": "{:6.3f}", "top1_distinct": "{:6.0f}"}  # the rest are percentages


def _fmt(v: float | None, key: str) -> str:
    if v is None:
        return "   -  "
    return PLAIN[key].format(v) if key in PLAIN else f"{100 * v:5.1f}%"


def print_summary(cfg: DictConfig, trainer: L.Trainer, before: dict, after: dict, test: dict) -> None:
    lines = ["", "=" * 60, f"rag-lightning run summary ({cfg.model.get('variant', '?')} marginalization)"]
    lines.append(f"{'metric':<14}{'before':>10}{'after':>10}" + (f"{'test':>10}" if test else ""))
    for k in KEYS:
        b, a, t = before.get(f"val/{k}"), after.get(f"val/{k}"), test.get(f"test/{k}")
        if a is None and b is None and t is None:
            continue
        row = f"{'val/' + k:<14}{_fmt(b, k):>10}{_fmt(a, k):>10}"
        lines.append(row + (f"{_fmt(t, k):>10}" if test else ""))
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        lines.append(f"checkpoint: {ckpt.best_model_path}")
    lines.append(f"outputs:    {os.path.abspath(cfg.paths.output_dir)}")
    lines.append("=" * 60)
    print("\n".join(lines), flush=True)
