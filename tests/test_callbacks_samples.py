"""LogSamples: a W&B table when a WandbLogger is attached, a text table in the log otherwise."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger

from rag_lightning.callbacks.samples import COLUMNS, LogSamples, sample_rows

SAMPLES = [
    {"question": f"who wrote book {i}?", "answers": [f"author {i}", "anon"], "prediction": f"author {i}",
     "top_titles": ["Books", "Authors", "Libraries"]}
    for i in range(5)
]  # fmt: skip


class FakeWandb(WandbLogger):
    def __init__(self) -> None:  # no wandb.init
        self.tables: list[dict[str, Any]] = []

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], **kwargs: Any) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data})


def fake_trainer(loggers: list[Any], sanity: bool = False) -> SimpleNamespace:
    return SimpleNamespace(loggers=loggers, global_step=7, sanity_checking=sanity, is_global_zero=True)


def test_sample_rows_joins_lists_and_caps_rows():
    rows = sample_rows(SAMPLES, step=3, max_rows=2)
    assert len(rows) == 2 and len(rows[0]) == len(COLUMNS)
    assert rows[0] == [3, "who wrote book 0?", "author 0 | anon", "author 0", "Books | Authors | Libraries"]


def test_logs_a_wandb_table(caplog):
    wb = FakeWandb()
    with caplog.at_level(logging.INFO, logger="rag_lightning.callbacks.samples"):
        LogSamples(max_rows=3).on_validation_end(fake_trainer([wb]), SimpleNamespace(samples=SAMPLES))
    assert [t["key"] for t in wb.tables] == ["val/samples"]
    assert wb.tables[0]["columns"] == COLUMNS and len(wb.tables[0]["data"]) == 3
    assert "who wrote" not in caplog.text  # no console table when W&B shows it


def test_text_table_without_wandb(caplog, tmp_path):
    trainer = fake_trainer([CSVLogger(tmp_path)])
    with caplog.at_level(logging.INFO, logger="rag_lightning.callbacks.samples"):
        LogSamples(max_rows=2).on_test_end(trainer, SimpleNamespace(samples=SAMPLES))
    assert "test samples at step 7" in caplog.text
    assert "who wrote book 1?" in caplog.text and "book 2" not in caplog.text
    assert "author 0 | anon" in caplog.text


def test_quiet_during_sanity_check_and_without_samples(caplog):
    wb = FakeWandb()
    cb = LogSamples()
    cb.on_validation_end(fake_trainer([wb], sanity=True), SimpleNamespace(samples=SAMPLES))
    cb.on_validation_end(fake_trainer([wb]), SimpleNamespace(samples=[]))
    cb.on_validation_end(fake_trainer([]), SimpleNamespace())
    assert wb.tables == [] and caplog.text == ""
