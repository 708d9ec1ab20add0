"""ModelCheckpoint whose `save_last: link` never points `last.ckpt` at an older step.

Lightning's `save_last="link"` links `last.ckpt` to the last file the callback saved. With a monitored top-k,
a validation that is not among the best saves no file, so the link would keep pointing at an older step's
checkpoint and a resume from `last.ckpt` would go back in time. Here `last.ckpt` is a link (relative, in the
same folder) when a checkpoint of the current step exists, and a full checkpoint otherwise (written through
the trainer's checkpoint IO: atomically with `AtomicCheckpointIO`, replacing the link, not its target).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint


class ModelCheckpoint(_ModelCheckpoint):
    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.save_last == "link" and self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = ""  # nothing of this step to link to: write last.ckpt in full
        super()._save_last_checkpoint(trainer, monitor_candidates)
