"""Weights & Biases logger that never blocks on a login: offline unless an API key is configured."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.path.expanduser("~/.netrc")).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode() -> str:
    """WANDB_MODE if set, else online with an API key and offline without one."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_available() else "offline")


def wandb_logger(save_dir: str, project: str = "rag-lightning", **kwargs: Any) -> WandbLogger:
    """A `WandbLogger` whose run files live under the Hydra output dir (`save_dir/wandb`)."""
    os.makedirs(save_dir, exist_ok=True)
    mode = wandb_mode()
    kwargs = {k: v for k, v in kwargs.items() if v not in (None, "")}
    if "tags" in kwargs:
        kwargs["tags"] = list(kwargs["tags"])
    return WandbLogger(save_dir=save_dir, project=project, offline=mode == "offline", mode=mode, **kwargs)
