"""Weights & Biases logger that never blocks on a login: offline unless an API key is configured.

Inside a Hydra multirun each job is its own W&B run, grouped by the sweep: `group` defaults to the sweep
dir's name and `name` to `<group>-<job number>`. A run left open by an earlier job in the same process (the
basic launcher runs jobs one after another) is finished first, so a new job never logs into it.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.path.expanduser("~/.netrc")).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode() -> str:
    """WANDB_MODE if set (`dryrun` reads as `offline`), else online with an API key and offline without one."""
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_available() else "offline")
    return "offline" if mode == "dryrun" else mode


def hydra_sweep_info() -> tuple[str, int] | None:
    """(sweep dir name, job number) inside a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hc.sweep.dir)).name, int(hc.job.num)


def finish_active_run(exit_code: int = 1) -> None:
    """Finish a W&B run still open in this process (e.g. one left by an earlier job of a sweep)."""
    import wandb

    if wandb.run is not None:
        log.warning("finishing W&B run %s left open by an earlier job", wandb.run.id)
        wandb.finish(exit_code=exit_code)


def wandb_logger(
    save_dir: str,
    project: str = "rag-lightning",
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    log_model: bool | str = False,
    **kwargs: Any,
) -> WandbLogger:
    """A `WandbLogger` whose run files live under the Hydra output dir (`save_dir/wandb`).

    `kwargs` go to `wandb.init` (entity, job_type, notes, ...); None / "" values are dropped.
    """
    os.makedirs(save_dir, exist_ok=True)
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # wandb rejects an empty WANDB_MODE
    mode = wandb_mode()
    sweep = hydra_sweep_info()
    if sweep is not None:
        group = group or sweep[0]
        name = name or f"{group}-{sweep[1]}"
    if mode == "offline" and log_model:
        log.warning("W&B is offline: log_model=%r ignored (checkpoints cannot be uploaded)", log_model)
        log_model = False
    finish_active_run()
    kwargs = {k: v for k, v in kwargs.items() if v not in (None, "")}
    # offline=False on purpose: Lightning's offline=True sets os.environ["WANDB_MODE"] for the whole process,
    # which would leak into later jobs of a sweep; `mode` goes to wandb.init directly.
    logger = WandbLogger(
        save_dir=save_dir,
        project=project,
        group=group or None,
        name=name or None,
        tags=list(tags) if tags else None,
        log_model=log_model,
        mode=mode,
        **kwargs,
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb>=0.19 warns it is a no-op
    return logger
