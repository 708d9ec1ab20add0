"""Run configs are data, not code: which `_target_`s may be built from a config found next to a checkpoint.

`rag-evaluate`, `rag-eval-retrieval`, `rag-export` and `RagPipeline` reuse the `<run>/.hydra/config.yaml` of
the run that wrote a checkpoint. That file may come from someone else (a shared or downloaded run directory), and
`hydra.utils.instantiate` calls whatever its `_target_`s name: `torch.load` with `weights_only: false` on a
pickle in the run folder, `os.system`, `builtins.eval`. So before anything is built, every `_target_` in the
run's nodes (after interpolation, so `${oc.create:...}` cannot hide one) must be

- one this package's own configs use (the `_target_`s of `conf/`: RagModule, QADataModule, Retriever,
  `readers.from_pretrained`, `torch.optim.AdamW`, Lightning's Trainer, callbacks, ...), or
- a class of this package, torch or Lightning that is an optimizer, a learning-rate scheduler, a Lightning
  callback, logger, strategy, precision plugin, cluster environment, profiler or the Trainer itself.

Functions (`torch.load`, `pickle.loads`, `eval`, `os.*`, `subprocess.*`, `hydra.utils.get_method`) and any
other module are refused with one line naming the key.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from rag_lightning.preflight import ConfigError

# where a class may come from (a target elsewhere is never imported, so its module's code never runs)
PACKAGES = ("rag_lightning", "torch", "lightning")


_UNRESOLVED = object()  # a `_target_` whose interpolation does not resolve: refused (fail closed)


def _walk_targets(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key of the node, its `_target_` value) for every node that has one, in a plain container or an
    OmegaConf node; interpolations are resolved one node at a time (`${oc.create:...}` included). A node whose
    interpolation fails cannot be instantiated either and is skipped, except a `_target_`."""
    if isinstance(node, DictConfig | dict):
        for k in node:
            try:
                v = node[k]
            except Exception:
                v = _UNRESOLVED
            if k == "_target_":
                yield prefix or "<root>", v
            elif v is not _UNRESOLVED:
                yield from _walk_targets(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, ListConfig | list):
        for i in range(len(node)):
            try:
                v = node[i]
            except Exception:
                continue
            yield from _walk_targets(v, f"{prefix}[{i}]")


@functools.cache
def package_targets() -> frozenset[str]:
    """Every `_target_` this package's own configs name (the config directory the CLI reads)."""
    import yaml

    from rag_lightning.cli import conf_dir

    found: set[str] = set()
    for path in Path(conf_dir()).rglob("*.yaml"):
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                found.update(t for _, t in _walk_targets(doc, "") if isinstance(t, str))
    return frozenset(found)


@functools.cache
def _allowed_bases() -> tuple[type, ...]:
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.profilers import Profiler
    from lightning.pytorch.strategies import Strategy

    return (
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
        pl.Callback,
        Logger,
        Strategy,
        Precision,
        ClusterEnvironment,
        Profiler,
        pl.Trainer,
    )


def _locate_class(target: str) -> type | None:
    """The class `target` names, importing only modules of PACKAGES; None when it is not a class there."""
    if target.split(".")[0] not in PACKAGES:
        return None
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj if inspect.isclass(obj) else None
    return None


def target_allowed(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in package_targets():
        return True
    cls = _locate_class(target)
    return cls is not None and issubclass(cls, _allowed_bases())


def check_run_config(cfg: DictConfig, keys: Iterable[str], source: str | Path) -> None:
    """Raise ConfigError when a node of `cfg` under `keys` (resolved) names a `_target_` that is not allowed;
    `source` (the run config's path) is named in the message."""
    for key in keys:
        if key not in cfg:
            continue
        try:
            node = cfg[key]
        except Exception:  # unresolvable: instantiating it fails the same way, before anything is built
            continue
        for where, target in _walk_targets(node, key):
            if not target_allowed(target):
                shown = "<an interpolation that does not resolve>" if target is _UNRESOLVED else repr(target)
                raise ConfigError(
                    f"{source}: {where}._target_={shown} is not allowed in a run config (only this "
                    f"package's, torch's and Lightning's constructors are built from a run directory; "
                    f"nothing was run). Remove that node, or pass use_run_config=false with the run's "
                    f"overrides on the command line"
                )
