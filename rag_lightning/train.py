"""Build everything from the config, fit, optionally test; return the metric a sweep optimizes."""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...})
from rag_lightning.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries
from rag_lightning.launch import propagate_rank_exit_codes
from rag_lightning.preflight import check_run, preflight
from rag_lightning.summary import print_summary

log = logging.getLogger(__name__)
# a frozen document encoder is in eval mode on purpose (no dropout: index and scores agree)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: not for every run


def _quiet_transformers() -> None:
    """Load reports list every unused checkpoint key (e.g. MiniLM's pooler, the layers a 3-layer copy drops)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` child of a config group (callbacks, logger); `null` entries are skipped."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def train(cfg: DictConfig) -> float | None:
    started = time.time()
    preflight(cfg)
    check_run(
        cfg
    )  # e.g. model.retriever_start_step beyond the run: said now, not after the corpus is embedded
    _quiet_transformers()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("datamodule <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    if hasattr(datamodule, "validate_sets"):
        datamodule.validate_sets()  # bad question files fail here, before the model and the corpus
    if hasattr(datamodule, "prepare_corpus"):  # before any process group: no barrier timeout on conversion
        datamodule.prepare_corpus()
    log.info("model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    propagate_rank_exit_codes()  # a rank that fails (e.g. bad data, exit 2) ends the command with its code
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if trainer.is_global_zero:  # partial writes of killed runs: this run's checkpoint dirs, the resumed one's
        folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if cfg.get("ckpt_path") and os.path.isfile(cfg.ckpt_path):
            folders.append(os.path.dirname(os.path.abspath(cfg.ckpt_path)))
        remove_stale_temporaries(folders, started)
    before: dict[str, float] = {}
    status = "failed"
    fit = cfg.get("train", True)
    eval_ckpt = None if fit else cfg.get("ckpt_path")  # train=false ckpt_path=X: evaluate X's weights
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if cfg.get("validate_before_fit"):
            before = trainer.validate(model, datamodule=datamodule, ckpt_path=eval_ckpt, verbose=False)[0]
        if fit:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        test: dict[str, float] = {}
        if cfg.get("test"):
            ckpt = eval_ckpt
            if fit and trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
                ckpt = "best"
            test = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
        metrics = {**after, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        if trainer.is_global_zero:
            print_summary(cfg, trainer, before, after, test)
            _report(cfg, loggers, before, after, test)
        status = "success"
    finally:
        for lg in loggers:  # close loggers even when the run fails (wandb would otherwise hang on exit)
            finalize = getattr(lg, "finalize", None)
            if finalize is not None:
                finalize(status)
        _finish_wandb(0 if status == "success" else 1)

    name = cfg.get("optimized_metric")
    if name is None or (not fit and name not in metrics):  # evaluation only: nothing to optimize
        return None
    if name not in metrics:
        msg = (
            f"optimized_metric={name!r} was not logged (validation never ran? e.g. trainer.max_steps below "
            f"trainer.val_check_interval); logged: {sorted(metrics)}"
        )
        if _in_multirun():  # a sweep must not rank a trial that has no value
            raise KeyError(msg)
        log.warning(msg)  # a single run trained and checkpointed: not a failure
        return None
    return metrics[name]


def _report(cfg: DictConfig, loggers: list, before: dict, after: dict, test: dict) -> None:
    """`<outputs>/report.png` (rag_lightning.report); a failure to draw it never fails the run."""
    from rag_lightning.report import report_run

    try:
        out = report_run(
            cfg.paths.output_dir, loggers, before, after, test, f"rag-lightning: {cfg.task_name}"
        )
    except Exception as e:  # noqa: BLE001  (a picture is not worth a failed run)
        log.warning("run report not written: %s: %s", type(e).__name__, e)
        return
    if out is not None:
        log.info("report: %s", out)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _finish_wandb(exit_code: int) -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
