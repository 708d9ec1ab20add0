"""A checkpoint's run: its saved config reused (``ckpt_path=``), its weights loaded strictly, its data and model
built as evaluation needs them. ``rag-evaluate``, ``rag-export``, ``rag-eval-retrieval`` and
:class:`rag_lightning.RagPipeline` go through here.

When the checkpoint lies in a run dir ``<run>/checkpoints/*.ckpt`` (or ``<run>/*.ckpt``) with
``<run>/.hydra/config.yaml``, that run's task / data / retriever / index / model / optimizer / scheduler /
trainer / paths nodes replace the freshly composed ones, so the training overrides need not be repeated. The
command line still wins: a group choice (``data=nq``) keeps the freshly composed node, a dotted override
(``model.decoding.num_beams=4``) is applied on top. ``use_run_config=false`` turns this off. The run's config is
data, not code: only this package's and its dependencies' constructors are built from it
(``rag_lightning/safe_config.py``); any other ``_target_`` is refused, naming the key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from rag_lightning.checkpoint_io import verify_checkpoint

log = logging.getLogger(__name__)
RUN_KEYS = ("task", "data", "retriever", "index", "model", "optimizer", "scheduler", "trainer", "paths")


def find_run_config(ckpt_path: str | os.PathLike) -> Path | None:
    """``<run>/.hydra/config.yaml`` for a checkpoint at ``<run>/checkpoints/x.ckpt`` or ``<run>/x.ckpt``."""
    ckpt = Path(ckpt_path).resolve()
    for run_dir in (ckpt.parent.parent, ckpt.parent):
        cfg = run_dir / ".hydra" / "config.yaml"
        if cfg.is_file():
            return cfg
    return None


def merge_run_config(cfg: DictConfig, run_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with RUN_KEYS nodes taken from ``run_cfg``, except groups the user chose in ``overrides``;
    the user's dotted overrides under those keys are re-applied (values taken from ``cfg``)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.key_or_group for o in parsed if not o.is_delete()]
    chosen = {k for k in keys if "." not in k}  # group choices such as `model=tiny`
    out = cfg.copy()
    with open_dict(out):
        for key in RUN_KEYS:
            if key in run_cfg and key not in chosen:
                out[key] = run_cfg[key]
        for key in keys:
            top = key.split(".")[0]
            if "." in key and top in RUN_KEYS and top not in chosen:
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
    return out


def apply_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with the run config next to ``cfg.ckpt_path`` merged in (``merge_run_config``), when there is a
    checkpoint, a run config next to it and ``use_run_config`` is on. A ``_target_`` that is not one of this
    package's or its dependencies' constructors is refused (``safe_config.check_run_config``) before anything
    is built."""
    from rag_lightning.safe_config import check_run_config

    use = cfg.get("ckpt_path") and cfg.get("use_run_config", True)
    run_cfg_path = find_run_config(cfg.ckpt_path) if use else None
    if run_cfg_path is None:
        return cfg
    log.info("using the run config %s (with your overrides on top)", run_cfg_path)
    merged = merge_run_config(cfg, OmegaConf.load(run_cfg_path), overrides)
    check_run_config(merged, RUN_KEYS, run_cfg_path)
    return merged


def load_weights(model: torch.nn.Module, ckpt_path: str) -> dict[str, Any]:
    """Strictly load a Lightning checkpoint's state_dict (weights_only); returns its hyper_parameters."""
    verify_checkpoint(ckpt_path)  # flipped bytes, truncated or empty: CheckpointError naming the file
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"{ckpt_path} does not fit the configured model; pass the retriever / model overrides it was "
            f"trained with (or keep its run dir's .hydra/config.yaml next to it)\n{e}"
        ) from e
    for key, state in ckpt.get("callbacks", {}).items():  # where the run's last refresh saved its index
        if key.startswith("RefreshIndex") and state.get("index_path"):
            model.retriever.known_indexes.append(state["index_path"])
    hp = ckpt.get("hyper_parameters", {})
    for key in ("variant", "decoding"):
        if key in hp and hp[key] != model.hparams.get(key):
            log.warning(
                "model.%s=%r but the checkpoint was trained with %r", key, model.hparams[key], hp[key]
            )
    return hp


def load_run(cfg: DictConfig, stage: str, eval_ks: Iterable[int] | None = None) -> tuple[Any, Any]:
    """(data module set up for ``stage``, RagModule with ``cfg.ckpt_path``'s weights and the corpus).
    ``eval_ks``: the recall@k to compute (``model.eval_ks``), each clamped to the corpus size."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup(stage)
    if eval_ks is not None:
        with open_dict(cfg):  # k > corpus size: the whole list
            cfg.model.eval_ks = sorted({min(int(k), len(datamodule.corpus)) for k in eval_ks})
    model = hydra.utils.instantiate(cfg.model)
    load_weights(model, cfg.ckpt_path)
    model.corpus = datamodule.corpus
    return datamodule, model
