"""NonFiniteGuard: an optimizer step whose loss or gradients hold NaN / Inf is skipped, counted and logged.

Decided in ``on_before_optimizer_step``: after backward (and the fp16 scaler's unscale), before gradient
clipping, which therefore never hides a NaN (clipping a NaN gradient gives NaN; an Inf norm zeroes every
gradient). A skipped step sets every gradient of the optimizer to ``None``: ``torch.optim`` optimizers
(AdamW included) leave a parameter without a gradient untouched, weight decay and moment estimates and
step counts included, so the weights and the optimizer state are exactly those of the last finite step.
The step still counts as a step (``global_step``, the LR schedule, as AMP's GradScaler does when it skips).

Under DDP / FSDP every rank must take the same decision: the count of ranks that saw a non-finite value is
summed over all of them (one all-reduce per step, which every rank reaches) and every rank skips alike.
After ``max_consecutive`` skipped steps in a row the run stops with :class:`NonFiniteTrainingError` naming
the step. Weights that hold NaN / Inf when a checkpoint is built stop the run on every rank alike
(``on_save_checkpoint``; ``AtomicCheckpointIO`` refuses them too), so ``last.ckpt`` and the best checkpoint
stay the last finite ones.

Logged: ``train/nonfinite_steps`` (skipped steps so far, every step).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class NonFiniteTrainingError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (the check is then reduced over the ranks), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """0-dim bool tensor: every gradient of the optimizer's parameters is finite (no host sync)."""
    flags = [
        torch.isfinite(_local(p.grad)).all()
        for g in optimizer.param_groups
        for p in g["params"]
        if p.grad is not None
    ]
    return torch.stack(flags).all() if flags else torch.tensor(True)


class NonFiniteGuard(Callback):
    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # in all
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self._loss_ok: torch.Tensor | None = None  # 0-dim bool, over the micro-batches of this step

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True)
        self._loss_ok = None
        grad_ok = grads_finite(optimizer)
        device = grad_ok.device
        bad = torch.stack([~loss_ok.to(device), ~grad_ok]).any().float().reshape(1)
        bad_ranks = trainer.strategy.reduce(bad, reduce_op="sum")  # every rank, every step: one decision
        step = trainer.global_step
        if float(bad_ranks.item()) > 0:
            for group in optimizer.param_groups:  # no update at all: the optimizer skips grad-less params
                for p in group["params"]:
                    p.grad = None
            self.skipped += 1
            self.consecutive += 1
            self.first_bad_step = step if self.consecutive == 1 else self.first_bad_step
            log.warning("step %d: non-finite %s on %d rank(s): optimizer step skipped (%d in a row, %d in all)",
                        step, "loss" if not bool(loss_ok) else "gradient", int(bad_ranks.item()),
                        self.consecutive, self.skipped)  # fmt: skip
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"step {step}: {self.consecutive} optimizer steps in a row (since step {self.first_bad_step}) had a "
                f"non-finite loss or gradient; stopping (max_consecutive={self.max_consecutive}, "
                f"callbacks.nonfinite_guard.max_consecutive). The weights are those of step {self.first_bad_step} "
                "and no checkpoint was written from a non-finite state: lower optimizer.lr, or resume from "
                "last.ckpt"
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Every rank builds the checkpoint (rank 0 writes it): all of them refuse non-finite weights alike,
        rather than rank 0 alone failing in the writer while the others wait at the save's barrier."""
        flags = [torch.isfinite(_local(p)).all() for p in pl_module.parameters()]
        ok = torch.stack(flags).all() if flags else torch.tensor(True)
        bad = trainer.strategy.reduce((~ok).float().reshape(1), reduce_op="sum")
        if float(bad.item()) > 0:
            raise NonFiniteTrainingError(
                f"step {trainer.global_step}: the weights hold NaN / Inf on {int(bad.item())} rank(s): no checkpoint "
                "is written from them; the last one on disk is the last finite one"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "first_bad_step": self.first_bad_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state.get("skipped", 0)
        self.consecutive = state.get("consecutive", 0)
        self.first_bad_step = state.get("first_bad_step")
