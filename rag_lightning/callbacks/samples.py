"""LogSamples: show a few validation predictions (input, gold targets, prediction, top passages).

RagModule fills `pl_module.samples` (list of dicts keyed by its task's `sample_columns`, QA: question,
answers, prediction, top_titles) during evaluation. After each validation (and test) run this callback logs the first `max_rows` of them
as a `wandb.Table` (key `val/samples`, `test/samples`) on every attached WandbLogger, and otherwise as a text
table in the console / the run's log file. It runs after the epoch's metrics are logged, so W&B files the
table under the same `trainer/global_step` as them.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)
COLUMNS = ["step", "question", "answers", "prediction", "top_titles"]


def sample_rows(
    samples: list[dict[str, Any]], step: int, max_rows: int, columns: list[str] = COLUMNS
) -> list[list[Any]]:
    """Rows in ``columns`` order (``step`` first); list fields are joined with ' | '."""

    def cell(value: Any) -> str:
        return " | ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    return [
        [step] + [cell(s.get(c, "")) for c in columns[1:]]
        for s in samples[:max_rows]
    ]  # fmt: skip


def text_table(rows: list[list[Any]], title: str, max_width: int = 60, columns: list[str] = COLUMNS) -> str:
    """A rich-rendered table as plain text (no colors), cells cut to `max_width` characters."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="ellipsis", max_width=max_width)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


class LogSamples(Callback):
    def __init__(self, max_rows: int = 8, log_test: bool = True, max_width: int = 60):
        self.max_rows = max_rows
        self.log_test = log_test
        self.max_width = max_width

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_samples(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_test:
            self.log_samples(trainer, pl_module, "test")

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        samples = getattr(pl_module, "samples", None)
        if not samples or not trainer.is_global_zero:
            return
        task = getattr(pl_module, "task", None)
        columns = list(task.sample_columns) if task is not None else COLUMNS
        rows = sample_rows(samples, trainer.global_step, self.max_rows, columns)
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for lg in wandb_loggers:
            lg.log_table(key=f"{stage}/samples", columns=columns, data=rows)
        if not wandb_loggers:
            title = f"{stage} samples at step {trainer.global_step}"
            log.info("\n%s", text_table(rows, title, self.max_width, columns))
