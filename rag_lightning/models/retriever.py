"""Dense retriever: query encoder, document encoder and the index over the corpus they define.

Retrieval is a non-differentiable top-K search with the detached query; the retrieval scores that the
generation loss sees are then recomputed with gradient, `scores[b, k] = q_b . d_{b,k} / temperature` (float32,
outside any autocast), so the loss trains the query encoder (and, with `train_doc_encoder`, the document
encoder, by re-encoding the K passages). Passage id -1 (fewer than K hits) scores -inf. `similarity: cosine`
makes both encoders return unit vectors (the index then searches cosine by inner product); the temperature is
fixed, or learned as CLIP does (a log-scale parameter, clamped).

The retriever owns the index lifecycle, and is the only place the index version is written:
`ensure_index` (load the prepared index whose stamp matches, else build, and keep what it built under
`index.root` when the document encoder is frozen: `keep_vectors`), `load_index`, `refresh_index`
(re-embed, build aside, swap on every rank or on none), `save_index`. Every decision is the same on all DDP
ranks: the candidate path is rank 0's, and a load or refresh that fails on any rank fails on all of them
(an all-reduce after the local work, which every rank reaches), so the old index stays everywhere.

Candidates (`mode`): `dense` (the index above), `bm25` (retrieval/bm25.py over the question texts) or `hybrid`
(both lists fused, retrieval/fusion.py). Whatever proposes them, the K scores are the trainable dense ones.
`rerank_k: K'` retrieves K' candidates and keeps the K best by the current document encoder (re-encoding them
without gradient when the document side trains, so a stale index still yields fresh top-K passages).
`shared_encoder: true` uses the query tower for passages too (one module; `doc_encoder` then only states the
passage side's conventions: prefix, pooling, normalize, max_length).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rag_lightning import integrity
from rag_lightning.integrity import IntegrityError
from rag_lightning.models.encoders import Encoder
from rag_lightning.models.sharding import gathered
from rag_lightning.preflight import ConfigError
from rag_lightning.retrieval import fusion, store
from rag_lightning.retrieval.bm25 import BM25Index, passage_texts
from rag_lightning.retrieval.embed import RowSlice, amp_dtype_for, embed_passages, pad_batch
from rag_lightning.retrieval.index import DenseIndex, resolve_device, resolve_store_dtype
from rag_lightning.retrieval.sharded import (
    ShardedIndex,
    all_ranks_ok,
    broadcast_from_zero,
    rank_world,
    shard_range,
)

log = logging.getLogger(__name__)
SIMILARITIES = ("dot", "cosine")
MODES = ("dense", "bm25", "hybrid")
BM25_DEFAULTS = {"k1": 0.9, "b": 0.4, "method": "lucene", "stopwords": "en"}  # Pyserini's k1, b
DOC_CACHE_ROWS = 200_000  # frozen document vectors kept for BM25 / hybrid candidates (768-d: 600 MB)
HYBRID_DEFAULTS = {"fusion": "rrf", "rrf_k": 60.0, "dense_weight": 0.5, "depth": None}
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: a learned temperature never goes below 0.01


class BM25NotBuiltError(ConfigError):
    """A multi-process run needs a BM25 index that is not built (scripts/build_index.py builds it)."""


class IndexRefreshError(RuntimeError):
    """A refresh failed on at least one rank; every rank keeps its old index."""


class Retriever(nn.Module):
    def __init__(
        self,
        query_encoder: Encoder,
        doc_encoder: Encoder | Mapping[str, Any] | None = None,
        n_docs: int = 5,
        train_query_encoder: bool = True,
        train_doc_encoder: bool = False,
        index: dict[str, Any] | None = None,
        embed_batch_size: int = 128,
        embed_precision: str = "auto",
        similarity: str = "dot",
        temperature: float = 1.0,
        learn_temperature: bool = False,
        shared_encoder: bool = False,
        mode: str = "dense",
        rerank_k: int | None = None,
        bm25: Mapping[str, Any] | None = None,
        hybrid: Mapping[str, Any] | None = None,
    ):
        """`doc_encoder=None` uses a copy of the query encoder (DPR-style two towers from one checkpoint).
        shared_encoder: one tower for both sides (trained by both sides' gradients when the query side trains);
        `doc_encoder` is then None or the passage side's conventions {prefix, pooling, normalize, max_length}.
        mode: dense | bm25 | hybrid candidates; bm25: {k1, b, method, stopwords}; hybrid: {fusion: rrf |
        weighted, rrf_k, dense_weight, depth (candidates per list, default the number kept)}.
        rerank_k: retrieve this many and keep the n_docs (or k) best by the current document encoder.

        embed_precision: autocast dtype for re-embedding the corpus, "auto" (bf16 on CUDA and on CPUs with
        native bf16, else fp32), "bf16", "fp16" or "fp32"; vectors are stored in ``index.store_dtype``.
        index: DenseIndex kwargs plus ``mode`` (auto | sharded | replicated) and ``root`` (prepared indexes).
        similarity: "dot" (raw inner product) or "cosine" (both towers L2-normalize their vectors).
        temperature: p(z|x) = softmax(similarity / temperature); `learn_temperature` makes log(1/temperature)
        a trained parameter (clamped to 1/temperature <= 100).
        """
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"retriever.similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not temperature > 0:
            raise ValueError(f"retriever.temperature must be > 0, got {temperature}")
        if mode not in MODES:
            raise ValueError(f"retriever.mode must be one of {MODES}, got {mode!r}")
        self.query_encoder = query_encoder
        self.shared_encoder = shared_encoder
        if shared_encoder:
            if isinstance(doc_encoder, nn.Module):
                raise ValueError(
                    "retriever.shared_encoder: give retriever.doc_encoder as the passage side's conventions "
                    "{prefix, pooling, normalize, max_length} (or null), not a second model"
                )
            # the same tower under the passage side's conventions; kept out of _modules: one copy of the weights
            # in the state_dict, the optimizer and on the device (it moves with query_encoder)
            conventions = dict(doc_encoder or {})
            unknown = sorted(set(conventions) - {"prefix", "pooling", "normalize", "max_length"})
            if unknown:
                raise ValueError(f"retriever.doc_encoder with shared_encoder: unknown keys {unknown}; expected "
                                 "prefix, pooling, normalize, max_length")  # fmt: skip
            self.__dict__["doc_encoder"] = query_encoder.sibling(**conventions)
            train_doc_encoder = train_query_encoder  # one tower: the passage side trains iff it does
        elif isinstance(doc_encoder, Mapping):
            raise ValueError("retriever.doc_encoder is conventions only: set retriever.shared_encoder=true")
        else:
            self.doc_encoder = doc_encoder if doc_encoder is not None else copy.deepcopy(query_encoder)
        self.n_docs = n_docs
        self.train_doc_encoder = train_doc_encoder
        self.retrieval_mode = mode
        if rerank_k is not None and rerank_k < 1:
            raise ValueError(f"retriever.rerank_k must be >= 1 (or null), got {rerank_k}")
        self.rerank_k = rerank_k
        self.bm25_kwargs = {**BM25_DEFAULTS, **dict(bm25 or {})}
        self.hybrid = {**HYBRID_DEFAULTS, **dict(hybrid or {})}
        if self.hybrid["fusion"] not in fusion.FUSIONS:
            raise ValueError(
                f"retriever.hybrid.fusion must be one of {fusion.FUSIONS}, got {self.hybrid['fusion']!r}"
            )
        self.use_bm25 = mode != "dense"  # also set by RagModule for BM25 hard negatives
        self.bm25: BM25Index | None = None
        self._frozen_vectors: dict[int, torch.Tensor] = {}  # row -> vector of the frozen document encoder
        self.index_kwargs = dict(index or {})
        # sharded | replicated | auto (sharded when the world size is above 1)
        self.mode = self.index_kwargs.pop("mode", "auto")
        self.index_root = self.index_kwargs.pop("root", None)  # prepared indexes: <root>/<stamp hash>
        self.verify = integrity.check_level(self.index_kwargs.pop("verify", "full"))  # checks on loading
        # keep an index built with a frozen document encoder under root, as build_index.py prepares one
        self.keep = bool(self.index_kwargs.pop("keep", True))
        self.embed_batch_size = embed_batch_size
        self.embed_precision = embed_precision
        self.similarity = similarity
        for enc in (self.query_encoder, self.doc_encoder):
            enc.normalize = enc.normalize or similarity == "cosine"
        scale = torch.tensor(-math.log(temperature), dtype=torch.float32)  # log(1 / temperature)
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale, persistent=False)
        self.query_encoder.requires_grad_(train_query_encoder)
        if not shared_encoder:
            self.doc_encoder.requires_grad_(train_doc_encoder)
        if not train_doc_encoder:
            self.doc_encoder.eval()
        self.index: ShardedIndex | None = None  # not a parameter: built or loaded, never in state_dict
        self.index_version = 0
        self.index_source: dict[str, Any] = {}  # {"path": where it was loaded from / saved to, "stamp": ...}
        self.known_indexes: list[
            str
        ] = []  # more places a matching index may be (e.g. a checkpoint's refresh)

    def train(self, mode: bool = True) -> Retriever:
        super().train(mode)
        if not self.train_doc_encoder:
            self.doc_encoder.eval()  # frozen: no dropout, so index and scores agree
        return self

    @property
    def doc_encoder_changes(self) -> bool:
        """Whether re-embedding the corpus can give anything new (nothing to re-embed with BM25 alone)."""
        return self.train_doc_encoder and self.retrieval_mode != "bm25"

    @property
    def index_mode(self) -> str:
        """The resolved mode: "auto" is sharded under DDP (world size > 1), replicated otherwise."""
        if self.mode == "auto":
            return "sharded" if rank_world()[1] > 1 else "replicated"
        return self.mode

    # ---------------------------------------------------------------- stamps
    def _doc_device(self) -> torch.device:
        return next(self.doc_encoder.parameters()).device

    def index_stamp(self, corpus) -> dict[str, Any]:
        """What the vectors depend on: corpus (its text, tokenizer, passage prefix and length), document-encoder
        weights and conventions (pooling, normalize), factory, dtypes."""
        amp = amp_dtype_for(self._doc_device(), self.embed_precision)
        device = resolve_device(self.index_kwargs.get("device", "auto"))
        store_dtype = resolve_store_dtype(device, self.index_kwargs.get("store_dtype", "auto"))
        return {
            "corpus": getattr(corpus, "fingerprint", None),
            "doc_encoder": store.weights_fingerprint(self.doc_encoder),
            "factory": self.index_kwargs.get("factory", "Flat"),
            "dtype": store_dtype,
            "embed": str(amp or torch.float32).removeprefix("torch."),
            "similarity": self.similarity,
            "pooling": self.doc_encoder.pooling,
            "normalize": bool(self.doc_encoder.normalize),
        }

    def prepared_path(self, corpus, stamp: dict[str, Any] | None = None) -> Path | None:
        """Where scripts/build_index.py puts the index of this corpus and document encoder."""
        if not self.index_root:
            return None
        return store.prepared_path(self.index_root, stamp or self.index_stamp(corpus))

    # ---------------------------------------------------------------- lifecycle
    def _install(self, index: ShardedIndex, version: int, source: dict[str, Any]) -> None:
        """Swap ``index`` in at ``version``: the one place the version is written."""
        index.version = version
        index.meta.update(version=version, stamp=source.get("stamp"), passages=source.get("passages"))
        self.index, self.index_version, self.index_source = index, version, dict(source)

    def ensure_index(self, corpus, progress: bool = True, match_weights: bool = False) -> None:
        """Have an index: keep the current one (unless ``match_weights`` and the document encoder's weights
        changed since it was made), else load a prepared / known one whose stamp matches, else build one (and,
        with a frozen document encoder and ``index.keep``, write it to the store: ``keep_vectors``)."""
        if self.use_bm25:
            self.ensure_bm25(corpus)
        if self.retrieval_mode == "bm25" or (self.index is not None and not match_weights):
            return
        stamp = self.index_stamp(corpus)
        if self.index is not None and self.index_source.get("stamp") == stamp:
            return
        path = None
        if rank_world()[0] == 0:
            candidates = [self.prepared_path(corpus, stamp), *map(Path, self.known_indexes)]
            path = next((str(p) for p in candidates if p is not None and _stamp_of(p) == stamp), None)
        path = broadcast_from_zero(path)
        if path is not None and self.load_index(path, version=0, stamp=stamp, passages=len(corpus)):
            return
        keep = self.keep and bool(self.index_root) and not self.doc_encoder_changes
        self.refresh_index(corpus, progress=progress, version=0, keep=keep)

    def load_index(
        self,
        path: str | os.PathLike,
        version: int = 0,
        stamp: dict | None = None,
        passages: int | None = None,
    ) -> bool:
        """Load a prepared directory (memory-mapped vectors, this rank's rows) or one saved by
        ``save_index``; with ``stamp``, only if it matches; with ``passages`` (the corpus's length), only if it
        holds that many rows. Files are checked first (``index.verify``, docs/integrity.md). All ranks or none:
        False keeps the old index (the warning names the file and what is wrong with it)."""
        t0, index, err = time.perf_counter(), None, None
        try:
            found = _stamp_of(path)
            if stamp is not None and found != stamp:
                raise store.IndexStampError(f"{path} has stamp {found}, wanted {stamp}")
            if store.is_prepared(path):
                n = store.verify_prepared(path, self.verify, passages)
                vectors = store.open_vectors(path)  # (N, d) memory-mapped
                index = ShardedIndex.from_embeddings(vectors, self.index_mode, **self.index_kwargs)
            else:
                kw = {
                    k: v for k, v in self.index_kwargs.items() if k in ("device", "num_threads", "chunk_rows")
                }
                index = ShardedIndex.load(path, self.index_mode, verify=self.verify, **kw)
                n = index.meta.get("passages")
                _check_rows(path, index, n, passages)
        except Exception as e:  # noqa: BLE001 - any rank's failure is every rank's: decided below
            err = e
        if not all_ranks_ok(err is None):
            log.warning("index: could not load %s on every rank (here: %s)", path, err or "ok")
            return False
        self._install(index, version, {"path": str(path), "stamp": found, "passages": n})
        log.info("index: loaded %s (%s passages, %s) in %.1fs", path, n, store.stamp_text(found),
                 time.perf_counter() - t0)  # fmt: skip
        return True

    def refresh_index(
        self, corpus, progress: bool = True, version: int | None = None, keep: bool = False
    ) -> dict[str, float]:
        """Re-embed the corpus with the current document encoder, build the new index aside and swap it in
        on every rank at ``version`` (default: current + 1), or on none: a failure on any rank (exception,
        out of memory, non-finite embeddings) raises IndexRefreshError on every rank, the old index stays.
        ``keep``: also write the vectors to the prepared-index store (``keep_vectors``); only for a frozen
        document encoder, whose vectors do not depend on the step."""
        stats: dict[str, Any] = {}
        t0, new, emb, err = time.perf_counter(), None, None, None
        try:
            stamp = self.index_stamp(corpus)
            new, emb = self._embed_shard(corpus, progress, stats)
        except Exception as e:  # noqa: BLE001 - decided below, on every rank alike
            err = e
            log.exception("index build failed on rank %d", rank_world()[0])
        if not all_ranks_ok(err is None):
            raise IndexRefreshError(
                f"index build failed on at least one rank (here: {err or 'ok'}); "
                f"keeping index v{self.index_version}"
            ) from err
        version = (self.index_version + 1 if self.index is not None else 0) if version is None else version
        self._install(new, version, {"path": None, "stamp": stamp, "passages": len(corpus)})
        stats["seconds"] = time.perf_counter() - t0
        log.info("index: built v%d (%d passages, %s) in %.1fs", version, len(corpus),
                 store.stamp_text(stamp), stats["seconds"])  # fmt: skip
        if keep:
            self.keep_vectors(emb, new.start, len(corpus), stamp)
        return stats

    def keep_vectors(self, emb: torch.Tensor, start: int, n: int, stamp: dict[str, Any]) -> Path | None:
        """Write the (rows, d) vectors this rank embedded (rows ``start``.., all N when replicated) to the
        prepared directory of ``stamp`` under ``index.root``, as scripts/build_index.py would: every rank its
        chunk file, then rank 0 merges them (``store.write_prepared``: checksummed, atomic). Evaluation,
        retrieval evaluation and resumes with the same corpus and document encoder then load it
        (``ensure_index``). A failure is a warning: the run goes on with the index it built."""
        t0, err, target = time.perf_counter(), None, store.prepared_path(self.index_root, stamp)
        rank, world = rank_world()
        work = target.parent / broadcast_from_zero(f".keep-{target.name}-{uuid.uuid4().hex[:8]}")
        try:
            if (self.index_mode == "sharded" or rank == 0) and len(emb):
                work.mkdir(parents=True, exist_ok=True)
                np.save(work / f"emb_{start}_{start + len(emb)}.npy", emb.float().cpu().numpy())  # (rows, d)
        except Exception as e:  # noqa: BLE001 - decided below, on every rank alike
            err = e
        ok = all_ranks_ok(err is None)
        if ok and rank == 0:
            try:
                store.write_prepared(target, work, n, stamp, stamp["dtype"])
            except Exception as e:  # noqa: BLE001 - a warning: the run keeps its index in memory
                err, ok = e, False
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        if not broadcast_from_zero(ok):
            log.warning("index: could not keep the index under %s (here: %s); evaluation will embed the "
                        "corpus again", target, err or "ok")  # fmt: skip
            return None
        self.index_source["path"] = str(target)
        log.info("index: kept %s (%d passages, %s) for evaluation and resumes in %.1fs", target, n,
                 store.stamp_text(stamp), time.perf_counter() - t0)  # fmt: skip
        return target

    # ---------------------------------------------------------------- BM25
    def bm25_stamp(self, corpus) -> dict[str, Any]:
        """What the BM25 index depends on: corpus, BM25 parameters, bm25s version."""
        import bm25s

        return {"kind": "bm25", "corpus": getattr(corpus, "fingerprint", None), **self.bm25_kwargs,
                "bm25s": bm25s.__version__}  # fmt: skip

    def bm25_path(self, corpus) -> Path | None:
        """Beside the dense indexes: ``<index.root>/bm25-<stamp hash>``."""
        if not self.index_root:
            return None
        return Path(self.index_root) / f"bm25-{store.stamp_key(self.bm25_stamp(corpus))}"

    def ensure_bm25(self, corpus) -> None:
        """Have the BM25 index: load the saved one whose stamp matches (memory-mapped; this rank's rows when
        sharded), else build it. One process builds it and saves it under ``index.root``. Under DDP (world
        size > 1) a missing index is refused on every rank (``BM25NotBuiltError``: run scripts/build_index.py
        first) rather than built by rank 0 while the others wait in a collective: at 21M passages the build
        takes longer than any collective timeout. Without ``index.root`` every rank builds the whole index
        in memory on its own (small corpora) and keeps its rows."""
        if self.bm25 is not None:
            return
        t0, stamp, path = time.perf_counter(), self.bm25_stamp(corpus), self.bm25_path(corpus)
        mode = self.index_mode
        rank, world = rank_world()
        if path is not None:
            if world == 1 and not _bm25_matches(path, stamp):
                build_bm25(corpus, self.bm25_kwargs, stamp).save(path)
            if not all_ranks_ok(_bm25_matches(path, stamp)):  # each rank reads the stamp; one decision
                raise BM25NotBuiltError(
                    f"no BM25 index at {path} for this corpus (rank {rank} of {world} checked): a multi-process "
                    "run does not build it (one rank would build while the others wait in a collective); build "
                    "it first: python scripts/build_index.py with this run's data and retriever overrides"
                )
            index = BM25Index.load(path, mode)
        else:  # nowhere to save: every rank builds the whole index on its own, then keeps its rows
            index = build_bm25(corpus, self.bm25_kwargs, stamp)
            index.mode = mode
            if mode == "sharded" and world > 1:
                index.keep_rows(*shard_range(len(corpus), rank, world))
        self.bm25 = index
        log.info("bm25: %s (%d passages, rows %d.., %s) in %.1fs", path or "built in memory", len(corpus),
                 index.start, mode, time.perf_counter() - t0)  # fmt: skip

    def save_index(self, path: str | os.PathLike) -> None:
        """Atomic save (sharded: every rank writes its own shard dir; replicated: rank 0 writes)."""
        if self.index_mode == "sharded" or rank_world()[0] == 0:
            self.index.save(path)
        self.index_source["path"] = str(path)

    def _embed_shard(self, corpus, progress: bool, stats: dict) -> tuple[ShardedIndex, torch.Tensor]:
        """Embed this rank's rows (all of them when replicated) and index them; not swapped in. Returns the
        index and the (rows, d) float32 vectors.

        Sharded (Atlas-style, exact): rank r embeds and indexes rows `shard_range(N, r, world)` only, and search
        merges the top-k of all shards. Raises on non-finite embeddings."""
        rank, world = rank_world()
        mode = self.index_mode
        start, end = shard_range(len(corpus), rank, world) if mode == "sharded" else (0, len(corpus))
        view = corpus.doc_token_view()
        with gathered(self.doc_encoder):  # FSDP: the ranks embed different numbers of batches
            emb = embed_passages(
                self.doc_encoder,
                view if (start, end) == (0, len(corpus)) else RowSlice(view, start, end),
                batch_size=self.embed_batch_size,
                device=self._doc_device(),
                pad_id=self.doc_encoder.tokenizer.pad_token_id or 0,
                progress=progress,
                stats=stats,
                amp_dtype=self.embed_precision,
            )  # (end - start, d)
        bad = (~torch.isfinite(emb)).any(dim=1)  # (n,)
        if bad.any():
            rows = (bad.nonzero().flatten()[:5] + start).tolist()
            raise FloatingPointError(f"{int(bad.sum())} non-finite passage embeddings (rows {rows}, ...)")
        local = DenseIndex(dim=emb.shape[1], **self.index_kwargs)
        local.build(emb)
        return ShardedIndex(local, start, mode), emb

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        corpus=None,
        return_vectors=False,
        questions: list[str] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Top-k for a batch of questions -> (doc_scores (B, k) with grad, ids (B, k) global passage ids), and
        with `return_vectors` also the query vectors (B, d) and passage vectors (B, k, d) that scored them.
        ``questions`` (the texts) are needed by the bm25 and hybrid modes."""
        if self.index is None and self.retrieval_mode != "bm25":
            raise RuntimeError("the retriever has no index yet: ensure_index(corpus) first")
        q = self.query_encoder(input_ids, attention_mask)  # (B, d)
        if not bool(torch.isfinite(q).all()):  # (search moves q to the host anyway: no extra stall)
            raise FloatingPointError(
                f"non-finite query embeddings (NaN / Inf in {int((~torch.isfinite(q)).any(1).sum())} of {len(q)} "
                "questions): the query encoder's weights or inputs overflowed (too high optimizer.lr?)"
            )
        depth = max(k, self.rerank_k or 0)
        if self.retrieval_mode == "dense":
            _, ids, vecs = self.index.search_with_vectors(q.detach(), depth)  # (B, depth), (B, depth, d)
        else:
            ids = self.candidates(q.detach(), questions, depth)
            # the index's vectors where this rank holds them all (hybrid, not sharded); else re-encoded below
            whole = self.index is not None and (self.index_mode == "replicated" or rank_world()[1] == 1)
            vecs = self.index.vectors(ids) if whole else None
        ids = ids.to(q.device)
        if depth > k:
            ids, vecs = self.rerank(q.detach(), ids, vecs, k, corpus)
        lossy = self.index is not None and self.index.local.lossy
        if self.train_doc_encoder and (self.training or lossy):
            tokens = corpus.doc_tokens(ids.flatten().tolist())
            d = self._encode_docs(tokens, q.device).view(*ids.shape, -1)  # (B, k, d), with grad
        elif vecs is None:
            d = self.candidate_vectors(ids, corpus, q.device)  # (B, k, d)
        else:
            d = vecs.to(q.device)
        scores = self.score(q, d).masked_fill(ids < 0, float("-inf"))  # (B, k) float32
        return (scores, ids, q, d) if return_vectors else (scores, ids)

    def candidates(self, q: torch.Tensor, questions: list[str] | None, depth: int) -> torch.Tensor:
        """(B, depth) candidate ids from BM25 or from BM25 and the dense index fused (no vectors)."""
        if questions is None:
            raise ValueError(
                f"retriever.mode={self.retrieval_mode} needs the question texts (batch['questions'])"
            )
        n = max(depth, self.hybrid["depth"] or 0)
        s_bm, i_bm = self.bm25.search(questions, n)  # (B, n); collective when sharded
        if self.retrieval_mode == "bm25":
            return i_bm[:, :depth]
        s_dn, i_dn = self.index.search(q, n)  # (B, n)
        h = self.hybrid
        if h["fusion"] == "rrf":
            return fusion.rrf([i_dn, i_bm], depth, h["rrf_k"])[1]
        w = float(h["dense_weight"])
        return fusion.weighted([s_dn, s_bm], [i_dn, i_bm], [w, 1.0 - w], depth)[1]

    @torch.no_grad()
    def rerank(
        self, q: torch.Tensor, ids: torch.Tensor, vecs: torch.Tensor | None, k: int, corpus
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the k best of (B, K') candidates by the current document encoder: its vectors are re-encoded
        (no gradient) when it trains or when the candidates came without vectors; index vectors otherwise.
        -> (ids (B, k), vectors (B, k, d))."""
        if self.doc_encoder_changes:
            vecs = self._encode_docs(corpus.doc_tokens(ids.flatten().tolist()), q.device).view(*ids.shape, -1)
        elif vecs is None:
            vecs = self.candidate_vectors(ids, corpus, q.device)  # (B, K', d)
        vecs = vecs.to(q.device)
        s = self.score(q, vecs).masked_fill(ids < 0, float("-inf"))  # (B, K')
        top = s.topk(k, dim=1).indices  # (B, k)
        return ids.gather(1, top), vecs.gather(1, top.unsqueeze(-1).expand(-1, -1, vecs.shape[-1]))

    @torch.no_grad()
    def dense_top_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) ids of the current dense index for these queries (collective when sharded)."""
        return self.index.search(self.query_encoder(input_ids, attention_mask), k)[1]

    def score(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """float32 q . d / temperature, outside any autocast (bf16 would round DPR scores ~80 to steps of 0.5):
        q (B, d) with d (B, k, d) -> (B, k), each question against its own passages, or with d (N, d) -> (B, N),
        every question against all N."""
        with torch.autocast(q.device.type, enabled=False):
            scale = self.logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
            eq = "bd,bkd->bk" if d.dim() == 3 else "bd,nd->bn"
            return torch.einsum(eq, q.float(), d.float()) * scale

    def candidate_vectors(self, ids: torch.Tensor, corpus, device: torch.device) -> torch.Tensor:
        """(B, k) ids -> (B, k, d) current document vectors. A frozen encoder's vectors are a function of the
        row: they are kept (up to DOC_CACHE_ROWS rows), so BM25 candidates seen before are not re-encoded."""
        rows = ids.flatten().tolist()
        if self.train_doc_encoder:
            return self.encode_passages(rows, corpus, device).view(*ids.shape, -1)
        cache = self._frozen_vectors
        missing = sorted({r for r in rows if r not in cache})
        if missing:
            with torch.no_grad():
                new = self._encode_docs(corpus.doc_tokens(missing), device).float().cpu()  # (M, d)
            if len(cache) + len(missing) > DOC_CACHE_ROWS:
                cache.clear()
            cache.update(zip(missing, new))
        return torch.stack([cache[r] for r in rows]).to(device).view(*ids.shape, -1)

    def encode_passages(self, rows: list[int], corpus, device: torch.device) -> torch.Tensor:
        """Document vectors (len(rows), d) of corpus rows, with gradient only if the document encoder trains."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_doc_encoder):
            return self._encode_docs(corpus.doc_tokens(rows), device)

    def _encode_docs(self, tokens: list[list[int]], device: torch.device) -> torch.Tensor:
        ids, mask = pad_batch(tokens, self.doc_encoder.tokenizer.pad_token_id or 0)  # (B*k, L)
        return self.doc_encoder(ids.to(device), mask.to(device))  # (B*k, d)


def build_bm25(corpus, kwargs: Mapping[str, Any], stamp: dict[str, Any]) -> BM25Index:
    """BM25 over every passage of ``corpus`` (``title text``), stamped."""
    return BM25Index.build(passage_texts(corpus), **kwargs, meta=stamp)


def _bm25_matches(path: Path, stamp: dict[str, Any]) -> bool:
    from rag_lightning.retrieval.bm25 import read_stamp

    found = read_stamp(path)
    return found is not None and {k: v for k, v in found.items() if k != "passages"} == stamp


def _check_rows(path: str | os.PathLike, index: ShardedIndex, n: int | None, passages: int | None) -> None:
    """IntegrityError when a saved index was made for another corpus length, or this rank's part of it does
    not hold the rows it should (its shard of ``n``, or all ``n`` rows when replicated)."""
    if passages is not None and n != passages:
        raise IntegrityError(f"index {path} holds {n} passages, the corpus has {passages}")
    if n is None:
        return
    rank, world = rank_world()
    want = shard_range(n, rank, world) if index.mode == "sharded" else (0, n)
    have = (index.start, index.start + index.ntotal)
    if have != want:
        raise IntegrityError(f"index {path}: rows {have[0]}..{have[1]} on rank {rank}, expected {want[0]}..{want[1]} of {n}")  # fmt: skip


def _stamp_of(path: str | os.PathLike) -> dict[str, Any] | None:
    """The stamp of a prepared directory, or of an index saved by ``save_index`` (None if neither)."""
    stamp = store.read_stamp(path)
    if stamp is not None:
        return {k: v for k, v in stamp.items() if k not in store.RECORD_KEYS}
    shard = next(iter(sorted(Path(path).glob("shard-*-of-*"))), Path(path))
    try:
        return _meta(shard).get("stamp")
    except (OSError, ValueError):
        return None


def _meta(path: Path) -> dict[str, Any]:
    import json

    return json.loads((path / "meta.json").read_text())["meta"]
