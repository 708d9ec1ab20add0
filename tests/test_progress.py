"""ProgressBar: readable description for step-bounded runs."""

from __future__ import annotations

from types import SimpleNamespace

from rag_lightning.callbacks import ProgressBar


def _desc(**trainer) -> str:
    bar = ProgressBar()
    bar._trainer = SimpleNamespace(**trainer)
    return bar._get_train_description(0).strip()


def test_description_without_negative_epochs() -> None:
    assert _desc(max_epochs=-1, max_steps=300, global_step=5) == "Epoch 0 step 5/300"
    assert _desc(max_epochs=3, max_steps=-1, global_step=5) == "Epoch 0/2"
    assert _desc(max_epochs=None, max_steps=None, global_step=0) == "Epoch 0"
