"""Fail fast, before any model is built, when a model or data file named in the config is not reachable.

Offline, `from_pretrained("facebook/bart-large")` fails deep inside transformers after retries; a research
run should instead stop at once and say which config key to point at a local copy.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """A config value names something that is not there; the message says how to fix it."""


def _offline() -> bool:
    return any(
        os.environ.get(v, "0").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


@functools.cache  # asked once per process (the entry point and train() both run the preflight)
def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_model(name_or_path: str, key: str = "model") -> None:
    """Local dir, `tiny:*`, a cached Hub id, or (online) any Hub id; else a ConfigError naming `key`."""
    problem = model_problem(name_or_path, key)
    if problem:
        raise ConfigError(problem)


def model_problem(name_or_path: str, key: str) -> str | None:
    if name_or_path.startswith("tiny:") or os.path.isdir(name_or_path) or _cached(name_or_path):
        return None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        return f"{key}={name_or_path!r}: no such directory"
    if _offline() or not _hub_reachable():
        return (
            f"{key}={name_or_path!r} is a Hugging Face Hub id, it is not in the local cache and the Hub cannot "
            f"be reached (offline). Download it where there is network, e.g. `hf download {name_or_path} "
            f"--local-dir /models/{name_or_path.split('/')[-1]}`, then run with "
            f"`{key}=/models/{name_or_path.split('/')[-1]}`."
        )
    return None


def require_files(items: Iterable[tuple[str, str]]) -> None:
    """Each (config key, path) must exist; report all missing ones at once."""
    problem = files_problem(items)
    if problem:
        raise ConfigError(problem)


def files_problem(items: Iterable[tuple[str, str]]) -> str | None:
    missing = [(k, p) for k, p in items if not os.path.exists(p)]
    if not missing:
        return None
    lines = "\n".join(f"  {k}={p!r}" for k, p in missing)
    kilt = [p for _, p in missing if p.endswith("-kilt.jsonl") or os.path.basename(p).startswith("kilt_")]
    hint = (
        "\nKILT's files are published by facebookresearch/KILT (scripts/download_all_kilt_data.py, the knowledge "
        "source kilt_knowledgesource.json; TriviaQA's questions come from its scripts/get_triviaqa_input.py); "
        "docs/kilt.md lists them."
        if kilt
        else ""
    )
    return (
        f"missing data file(s):\n{lines}\nPoint `paths.data_dir=...` at the folder that holds them, or set "
        f"the keys above to their paths.{hint}"
    )


def _walk(node: Any, prefix: str):
    """Yield (dotted key, value) for every leaf of a config, resolving interpolations."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        for k in node:
            yield from _walk(node[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def data_files(data_cfg: Any) -> list[tuple[str, str]]:
    """(config key, path) of every question set and the corpus a QADataModule config names."""
    from rag_lightning.data.registry import resolve_corpus, resolve_set

    data_dir = data_cfg.get("data_dir")
    out = []
    for group in ("train_sets", "val_sets", "test_sets"):
        for i, spec in enumerate(data_cfg.get(group) or []):
            out.append((f"data.{group}[{i}]", resolve_set(spec, data_dir)["path"]))
    if data_cfg.get("corpus") is not None:
        out.append(("data.corpus", resolve_corpus(data_cfg.corpus, data_dir)["path"]))
    return out


def task_problem(cfg: Any) -> str | None:
    """The task config builds (e.g. a classification task names its labels) and what is monitored is one of
    the task's validation metrics."""
    node = cfg.get("task")
    if node is None:
        return None
    import hydra
    from omegaconf import OmegaConf

    try:
        task = hydra.utils.instantiate(node)
    except Exception as e:  # missing `???` keys, bad labels: the underlying message, one line
        cause = e.__cause__ or e
        return f"task ({node.get('_target_', '?')}): {str(cause).splitlines()[0]}"
    metric = cfg.get("optimized_metric")
    names = [*task.metric_names(OmegaConf.select(cfg, "model.eval_ks") or [1]), *task.summary_keys]
    if metric and metric.startswith("val/") and metric.split("/")[-1] not in names:  # val/[set/]name
        return (
            f"optimized_metric={metric!r} is not a metric of the {task.name} task (e.g. val/{task.monitor})"
        )
    return None


def device_problem(trainer_cfg: Any) -> str | None:
    """A GPU trainer (trainer=gpu / ddp / fsdp, or an experiment that picks one) on a machine without CUDA:
    say which CPU trainer to use instead of Lightning's "No supported gpu backend found!"."""
    if trainer_cfg is None:
        return None
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda"):
        return None
    import torch

    if torch.cuda.is_available() or (accelerator == "gpu" and torch.backends.mps.is_available()):
        return None
    return (
        f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: add `trainer=cpu` (one process) "
        f"or `trainer=ddp_sim` (DDP over 2 CPU processes) to the command line"
    )


_warned: set[tuple[int, int]] = set()


def start_step_warning(start: int, steps: int, why: str) -> None:
    """`model.retriever_start_step` at or beyond the run's last optimizer step: the retriever's learning rate
    stays 0 for the whole run. A warning (once per process), not an error: short debug runs are legitimate."""
    if start < steps or steps <= 0 or (start, steps) in _warned:
        return
    _warned.add((start, steps))
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        log.warning(
            "model.retriever_start_step=%d >= the %d optimizer step(s) of this run (%s): the retriever never "
            "trains (its learning rate stays 0); set model.retriever_start_step=0 to train it from the start",
            start, steps, why,
        )  # fmt: skip


def run_length(trainer_cfg: Any) -> tuple[int, str] | None:
    """(optimizer steps, the key that sets them) when the trainer config alone fixes the run's length: a
    fast_dev_run (N batches) or max_steps (an upper bound; max_epochs may stop a run sooner). None when the
    length depends on the data (max_steps=-1)."""
    if trainer_cfg is None:
        return None
    fdr = trainer_cfg.get("fast_dev_run", False)
    if fdr:
        return (1 if fdr is True else int(fdr)), f"trainer.fast_dev_run={fdr}"
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps is not None and int(max_steps) > 0:
        return int(max_steps), f"trainer.max_steps={max_steps}"
    return None


def check_run(cfg: Any) -> None:
    """Warnings a config deserves before anything is built (the data-dependent length is checked again in
    RagModule.configure_optimizers)."""
    from omegaconf import OmegaConf

    start = int(OmegaConf.select(cfg, "model.retriever_start_step", default=None) or 0)
    length = run_length(cfg.get("trainer"))
    if start and length is not None and cfg.get("train", True):
        start_step_warning(start, *length)


def preflight(cfg: Any, trainer: bool = True) -> None:
    """Check the task, the device, every data file and model the config names, before anything heavy is built.
    ``trainer``: the command builds the config's Trainer (rag-build-index does not: it embeds on CUDA when there
    is one and on the CPU otherwise, whatever `trainer` says)."""
    problems = [task_problem(cfg), device_problem(cfg.get("trainer")) if trainer else None]
    if cfg.get("data") is not None and str(cfg.data.get("_target_", "")).endswith("QADataModule"):
        problems.append(files_problem(data_files(cfg.data)))
    for key, val in _walk(cfg.get("model", {}), "model"):
        if key.endswith("name_or_path") and isinstance(val, str):
            problems.append(model_problem(val, key.replace("model.retriever.", "retriever.")))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("\n".join(problems))
