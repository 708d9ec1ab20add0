"""Rich progress bar that reads well for step-bounded runs (max_epochs=-1, max_steps=N)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's bar prints "Epoch 0/-2" when epochs are unbounded; this one prints "Epoch 0" then, and
    the optimizer step out of ``max_steps`` when a step budget is set."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        desc = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            desc += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            desc += f" step {trainer.global_step}/{trainer.max_steps}"
        return f"{desc:{len(self.validation_description)}}"
