#!/usr/bin/env python
"""Evaluate a checkpoint: answers, EM / F1 and retrieval recall@k on the test (or val) questions.

    python scripts/evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt [split=val] [key=value ...]

Config: conf/evaluate.yaml (same groups as training). When the checkpoint lies in a run dir
``<run>/checkpoints/*.ckpt`` (or ``<run>/*.ckpt``) with ``<run>/.hydra/config.yaml``, that run's
data / retriever / index / model / optimizer / scheduler nodes replace the defaults, so the training
overrides need not be repeated. Your overrides still win: a group choice (``data=nq``) keeps the freshly
composed node, a dotted override (``model.decoding.num_beams=4``) is applied on top. ``use_run_config=false``
turns this off. The run's config is data, not code: only this package's and its dependencies' constructors
are built from it (``rag_lightning/safe_config.py``); any other ``_target_`` is refused, naming the key.

The run's trainer settings (devices, precision, strategy) and paths are reused too. Under DDP every rank
predicts its share of the questions; the rows are gathered in dataset order and rank 0 writes each file once.

The weights are loaded with ``torch.load(weights_only=True)`` and a strict ``load_state_dict``. The index is
the one whose stamp matches the loaded document encoder (``Retriever.ensure_index`` on predict start): the
prepared one under ``index.root``, or the last refresh's saved index recorded in the checkpoint's
``RefreshIndex`` state; only when neither matches is the corpus embedded with the checkpoint's weights. Each question
retrieves max(n_docs, max(eval_ks)) passages (eval_ks clamped to the corpus size): the first n_docs feed
the generator, recall@k is computed over the first k. Outputs in the Hydra output dir, written atomically:
``predictions.jsonl`` (one line per question) and ``metrics.json`` (means over questions, and count); over a
corpus whose passages know their page (KILT), also ``kilt_predictions.jsonl`` in KILT's format for
``rag-eval-kilt GUESS GOLD`` (docs/kilt.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...})
from rag_lightning.checkpoint_io import CheckpointError, verify_checkpoint
from rag_lightning.preflight import preflight
from rag_lightning.train import instantiate_list

log = logging.getLogger("evaluate")
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
    """``cfg`` with the run config next to ``cfg.ckpt_path`` merged in (``merge_run_config``), when there is one
    and ``use_run_config`` is on. The run's nodes are data: a ``_target_`` that is not one of this package's
    or its dependencies' constructors is refused (``safe_config.check_run_config``) before anything is built."""
    from rag_lightning.safe_config import check_run_config

    run_cfg_path = find_run_config(cfg.ckpt_path) if cfg.get("use_run_config", True) else None
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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def summarize(
    rows: list[dict[str, Any]], eval_ks: list[int], n_passages: int, task: Any = None
) -> dict[str, Any]:
    """Means over examples of every per-example metric the task logged in the rows (a metric an example does
    not define, e.g. gold recall without gold passages, is left out of its mean); ``recall@k`` /
    ``gold_recall@k`` read the row's value at min(k, n_passages); then the task's corpus-level metrics."""
    from rag_lightning.tasks.base import build_task

    task = build_task(task)
    n = len(rows)
    names = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float) and "@" not in k)
    out: dict[str, Any] = {}
    for name in names:
        values = [r[name] for r in rows if name in r]
        out[name] = sum(values) / len(values)
    for prefix in ("recall", "gold_recall"):
        for k in eval_ks:
            values = [r[key] for r in rows if (key := f"{prefix}@{min(k, n_passages)}") in r]
            if values:
                out[f"{prefix}@{k}"] = sum(values) / len(values)
    for name in dict.fromkeys(k for r in rows for k in r if k.startswith("kilt_recall@")):  # KILT's k (pages)
        values = [r[name] for r in rows if name in r]
        out[name] = sum(values) / len(values)
    if task.corpus_level and rows:
        out.update(task.corpus_metrics([r["prediction"] for r in rows], [r["answers"] for r in rows]))
    out["count"] = n
    return out


def evaluate(cfg: DictConfig, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    cfg = apply_run_config(cfg, overrides)
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {cfg.split!r}")
    preflight(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test" if cfg.split == "test" else "validate")
    sets = datamodule.test_sets if cfg.split == "test" else datamodule.val_sets
    if not sets:
        raise ValueError(f"data has no {cfg.split} sets (data.{cfg.split}_sets is empty)")
    n_passages = len(datamodule.corpus)
    eval_ks = [int(k) for k in cfg.eval_ks]
    with open_dict(cfg):
        cfg.model.eval_ks = sorted({min(k, n_passages) for k in eval_ks})  # k > corpus size: whole list

    model = hydra.utils.instantiate(cfg.model)
    load_weights(model, cfg.ckpt_path)
    model.corpus = datamodule.corpus
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")), logger=False, default_root_dir=out_dir
    )
    loaders = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
    batches = trainer.predict(model, dataloaders=loaders)
    if len(sets) == 1:
        batches = [batches]  # one loader: a flat list of batch outputs
    per_set = [[row for batch in b for row in batch] for b in batches]  # this rank's rows, per set
    if trainer.world_size > 1:
        per_set = gather_rows(per_set, trainer.world_size)
    if not trainer.is_global_zero:
        return {}
    rows = [{"set": name, **row} for (name, _), set_rows in zip(sets, per_set) for row in set_rows]
    task = model.task
    result = {
        **summarize(rows, eval_ks, n_passages, task),
        "split": cfg.split,
        "ckpt_path": str(cfg.ckpt_path),
    }
    if len(sets) > 1:
        result["per_set"] = {
            name: summarize([r for r in rows if r["set"] == name], eval_ks, n_passages, task)
            for name, _ in sets
        }
    write_atomic(
        out_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    if rows and "page_ids" in rows[0]:
        write_kilt_predictions(rows, [name for name, _ in sets], out_dir)
    print_table(result, eval_ks, out_dir)
    return result


def write_kilt_predictions(rows: list[dict[str, Any]], set_names: list[str], out_dir: Path) -> list[Path]:
    """KILT guess files for ``rag-eval-kilt GUESS GOLD``: ``kilt_predictions.jsonl`` (one set) or
    ``kilt_predictions.<set>.jsonl``; provenance = the retrieved passages' pages, de-duplicated in rank order."""
    from rag_lightning.tasks.kilt import prediction_record, write_predictions

    paths = []
    for name in set_names:
        records = [
            prediction_record(r["id"], r["prediction"], r["page_ids"], r["titles"])
            for r in rows
            if r["set"] == name
        ]
        file = "kilt_predictions.jsonl" if len(set_names) == 1 else f"kilt_predictions.{name}.jsonl"
        paths.append(write_predictions(out_dir / file, records))
    return paths


def gather_rows(per_set: list[list[dict]], world: int) -> list[list[dict]]:
    """All ranks' rows in dataset order: predict's unrepeated distributed sampler gives rank r the questions
    r, r + world, r + 2 world, ... of each set, so question i is row i // world of rank i % world."""
    import torch.distributed as dist

    everyone: list = [None] * world
    dist.all_gather_object(everyone, per_set)
    out = []
    for s in range(len(per_set)):
        ranks = [everyone[r][s] for r in range(world)]
        out.append([ranks[i % world][i // world] for i in range(sum(map(len, ranks)))])
    return out


def print_table(result: dict[str, Any], eval_ks: list[int], out_dir: Path) -> None:
    """Means over all examples, then one block per set when there are several."""
    print(f"\n{'=' * 44}\nevaluation: {result['split']} split, {result['count']} examples")
    blocks = [("all sets" if "per_set" in result else "", result)] + list(result.get("per_set", {}).items())
    for name, block in blocks:
        if name:
            print(f"-- {name} ({block['count']} examples)")
        for key, value in block.items():
            if isinstance(value, float):
                print(f"{key:14s}{100 * value:8.1f}%")
    print(f"outputs: {out_dir}\n{'=' * 44}")


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rag_lightning.data.textio import DataError
    from rag_lightning.preflight import ConfigError

    hc = HydraConfig.get()
    try:
        evaluate(cfg, list(hc.overrides.task), Path(hc.runtime.output_dir))
    except (
        ConfigError,
        DataError,
        CheckpointError,
    ) as e:  # missing file / bad row: one line naming it, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
