"""``rag-evaluate``: a checkpoint's answers, EM / F1 and retrieval recall@k on the test (or val) questions.

    rag-evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt [split=val] [key=value ...]

Config: conf/evaluate.yaml (train.yaml plus the keys below it). The run's config next to the checkpoint is
reused, your overrides on top (``rag_lightning.commands.run_config``), its trainer settings (devices,
precision, strategy) and paths too. Under DDP every rank predicts its share of the questions; the rows are
gathered in dataset order and rank 0 writes each file once.

The weights are loaded with ``torch.load(weights_only=True)`` and a strict ``load_state_dict``. The index is
the one whose stamp matches the loaded document encoder (``Retriever.ensure_index`` on predict start): the
prepared one under ``index.root``, or the last refresh's saved index recorded in the checkpoint's
``RefreshIndex`` state; only when neither matches is the corpus embedded with the checkpoint's weights. Each
question retrieves max(n_docs, max(eval_ks)) passages (eval_ks clamped to the corpus size): the first n_docs
feed the generator, recall@k is computed over the first k. Outputs in ``logs/evaluate/runs/<date_time>``,
written atomically: ``predictions.jsonl`` (one line per question) and ``results.json`` (means over questions,
and count); over a corpus whose passages know their page (KILT), also ``kilt_predictions.jsonl`` in KILT's
format for ``rag-eval-kilt GUESS GOLD`` (docs/kilt.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rag_lightning.checkpoint_io import CheckpointError
from rag_lightning.commands.common import fail, hydra_app, write_atomic, write_results
from rag_lightning.commands.run_config import apply_run_config, load_run
from rag_lightning.preflight import preflight
from rag_lightning.train import instantiate_list


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

    datamodule, model = load_run(cfg, "test" if cfg.split == "test" else "validate", cfg.eval_ks)
    sets = datamodule.test_sets if cfg.split == "test" else datamodule.val_sets
    if not sets:
        raise ValueError(f"data has no {cfg.split} sets (data.{cfg.split}_sets is empty)")
    n_passages = len(datamodule.corpus)
    eval_ks = [int(k) for k in cfg.eval_ks]
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
    if rows and "page_ids" in rows[0]:
        write_kilt_predictions(rows, [name for name, _ in sets], out_dir)
    print_table(result, eval_ks, out_dir)
    write_results(out_dir, result)
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


def run(cfg: DictConfig) -> None:
    from rag_lightning.data.textio import DataError
    from rag_lightning.preflight import ConfigError

    hc = HydraConfig.get()
    try:
        evaluate(cfg, list(hc.overrides.task), Path(hc.runtime.output_dir))
    except (ConfigError, DataError, CheckpointError) as e:  # missing file / bad row: one line naming it
        fail(e)


def main() -> None:
    hydra_app("evaluate", run)


if __name__ == "__main__":
    main()
