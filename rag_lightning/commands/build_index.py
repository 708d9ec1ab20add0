"""``rag-build-index``: prepare once, before training: convert the corpus, embed it, save the index under its stamp.

    rag-build-index +experiment=nq paths.data_dir=D [the same overrides as rag-train]

A Hydra app on rag-train's `conf/` (primary config `build_index.yaml` = `train.yaml` + the keys below), so the
overrides that select the corpus, tokenizers, document encoder and index mean the same thing here. Steps:
1. the corpus is converted to its tokenized Arrow cache (`paths.cache_dir`), tokenizing in
   `data.corpus_num_proc` processes, resumable (`Corpus.prepare`); other local ranks wait for it, no timeout;
2. the document encoder embeds it in chunks of `chunk_size` rows (`emb_{start}_{end}.npy`, written atomically,
   skipped when present: a rerun resumes), sharded over processes: chunk i belongs to shard i % S. S and this
   process's shard come from `num_shards` / `shard`, else from torchrun's `WORLD_SIZE` / `RANK`:
       torchrun --nproc-per-node 8 --no-python rag-build-index +experiment=nq paths.data_dir=D
   each rank embeds on `cuda:LOCAL_RANK` (CPU without CUDA);
3. the process that completes the last chunk merges them into `<index.root>/<stamp hash>/vectors.npy` with
   `stamp.json` (corpus fingerprint, document-encoder weights fingerprint, factory, dtype), atomically;
4. with `retriever.mode=bm25|hybrid` or BM25 hard negatives (`model.objective_args.contrastive.bm25_negatives`),
   shard 0 also builds the BM25 index under `<index.root>/bm25-<stamp hash>` (bm25 mode embeds nothing).
`rag-train` and `rag-evaluate` with the same overrides compute the same stamp and load that directory
(`index: loaded <path> (<N> passages, <stamp>)`); nothing is converted or embedded at train time. Outputs (the
log, `results.json`: the shard, the prepared directory and its stamp) under `logs/build_index/runs/<date_time>`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rag_lightning.commands.common import hydra_app, write_results
from rag_lightning.retrieval import embed_chunks, store
from rag_lightning.retrieval.embed import chunk_spans

log = logging.getLogger("build_index")


def shard_of(cfg: DictConfig) -> tuple[int, int]:
    """(shard, num_shards): the config's, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    world = cfg.get("num_shards") or int(os.environ.get("WORLD_SIZE", "1"))
    shard = cfg.get("shard")
    shard = int(os.environ.get("RANK", "0")) if shard is None else shard
    if not 0 <= shard < world:
        raise ValueError(f"shard={shard} must be in [0, num_shards={world})")
    return int(shard), int(world)


def embed_and_merge(
    encoder: torch.nn.Module,
    tokens: Any,
    target: str | os.PathLike,
    stamp: dict[str, Any],
    *,
    dtype: str = "float32",
    chunk_size: int = 100_000,
    num_shards: int = 1,
    shard_id: int = 0,
    stats: dict | None = None,
    verify: str = "full",
    **embed_kwargs: Any,
) -> Path | None:
    """Embed this shard's missing chunks of ``tokens`` into ``<target>.work``; whoever finds every chunk present
    afterwards merges them into the prepared directory ``target`` (under a lock: once) and removes the chunks.
    Returns ``target`` when it is complete, None while other shards are still embedding. An existing ``target``
    is checked first (``verify``: ``index.verify``); a damaged one is said in one line and prepared again."""
    target = Path(target)
    if store.is_prepared(target):
        try:
            store.verify_prepared(target, verify, passages=len(tokens))
            return target
        except store.IntegrityError as e:
            log.warning("%s: preparing %s again", e, target)
            shutil.rmtree(target)
    work = target.parent / f".work-{target.name}"
    done = embed_chunks(
        encoder, tokens, work, chunk_size, num_shards, shard_id, fingerprint=store.stamp_key(stamp), **embed_kwargs
    )  # fmt: skip
    if stats is not None:
        stats["embedded"] = sum(e - s for s, e in done)
    with open(work / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if store.is_prepared(target):
            return target
        try:
            chunk_spans(work, len(tokens))
        except FileNotFoundError as e:
            log.info("shard %d/%d done; waiting for the others to finish (%s)", shard_id, num_shards, e)
            return None
        store.write_prepared(target, work, len(tokens), stamp, dtype)
    shutil.rmtree(work, ignore_errors=True)
    return target


def prepare(cfg: DictConfig) -> Path | None:
    """Convert, embed this process's shard, merge when complete; returns the prepared directory or None."""
    from rag_lightning.data.corpus import Corpus
    from rag_lightning.preflight import preflight
    from rag_lightning.retrieval.index import resolve_device

    preflight(cfg, trainer=False)
    shard, world = shard_of(cfg)
    t0 = time.perf_counter()
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_corpus()  # local rank 0 converts (resumable, in processes); the others wait
    corpus = Corpus.from_file(**datamodule._corpus_kwargs())
    t_corpus = time.perf_counter() - t0
    retriever = hydra.utils.instantiate(cfg.retriever)
    if not retriever.index_root:
        raise ValueError("index.root is not set: where should the prepared index go?")
    negatives = OmegaConf.select(cfg, "model.objective_args.contrastive.bm25_negatives", default=0)
    if (retriever.retrieval_mode != "dense" or negatives) and shard == 0:
        t0 = time.perf_counter()
        retriever.ensure_bm25(corpus)
        log.info("bm25: ready at %s in %.1fs", retriever.bm25_path(corpus), time.perf_counter() - t0)
    if retriever.retrieval_mode == "bm25":
        return retriever.bm25_path(corpus)
    device = resolve_device(cfg.get("device") or "auto")
    retriever.doc_encoder.to(device)
    stamp = retriever.index_stamp(corpus)
    target = retriever.prepared_path(corpus, stamp)
    tok = retriever.doc_encoder.tokenizer
    stats: dict[str, int] = {}
    t0 = time.perf_counter()
    out = embed_and_merge(
        retriever.doc_encoder,
        corpus.doc_token_view(),
        target,
        stamp,
        dtype=stamp["dtype"],
        chunk_size=int(cfg.chunk_size),
        num_shards=world,
        shard_id=shard,
        batch_size=retriever.embed_batch_size,
        device=device,
        amp_dtype=retriever.embed_precision,
        pad_id=tok.pad_token_id or 0,
        progress=shard == 0,
        stats=stats,
        verify=retriever.verify,
    )
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    log.info("shard %d/%d: corpus ready in %.1fs (%d passages); embedded %d passages in %.1fs (%.0f passages/s); "
             "peak RSS %d MB", shard, world, t_corpus, len(corpus), stats.get("embedded", 0), secs,
             stats.get("embedded", 0) / max(secs, 1e-9), rss)  # fmt: skip
    if out is not None:
        log.info("index: prepared %s (%d passages, %s)", out, len(corpus), store.stamp_text(stamp))
    return out


def run(cfg: DictConfig) -> None:
    shard, world = shard_of(cfg)
    out = prepare(cfg)
    result = {"shard": shard, "num_shards": world, "prepared": None if out is None else str(out)}
    if out is not None and (out / "stamp.json").is_file():
        result["stamp"] = json.loads((out / "stamp.json").read_text(encoding="utf-8"))
    write_results(HydraConfig.get().runtime.output_dir, result)


def main() -> None:
    hydra_app("build_index", run)


if __name__ == "__main__":
    main()
