"""Learning-rate schedules with a per-parameter-group start step.

`linear_warmup` is transformers' linear warmup + linear decay, except that a param group may carry a
`start_step`: its learning rate is 0 until then and warms up from there (e.g. the retriever starts learning
only once the generator reads its passages: before that, the retrieval gradient is noise).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_decay_factor(
    step: int, num_training_steps: int, num_warmup_steps: int, start_step: int = 0
) -> float:
    """LR multiplier at optimizer step `step`: 0 before `start_step`, then linear from 0 to 1 over
    `num_warmup_steps`, then linear down to 0 at `num_training_steps`."""
    s = step - start_step
    if s < 0:
        return 0.0
    if s < num_warmup_steps:
        return s / max(1, num_warmup_steps)
    left = num_training_steps - step
    return max(0.0, left / max(1, num_training_steps - start_step - num_warmup_steps))


def linear_warmup(
    optimizer: torch.optim.Optimizer, num_training_steps: int, num_warmup_steps: int = 0
) -> LambdaLR:
    """One lambda per param group, honouring each group's optional `start_step`."""
    lambdas = []
    for group in optimizer.param_groups:
        start = int(group.get("start_step", 0) or 0)  # >= num_training_steps: the group never learns
        lambdas.append(
            lambda step, start=start: warmup_decay_factor(step, num_training_steps, num_warmup_steps, start)
        )
    return LambdaLR(optimizer, lambdas)
