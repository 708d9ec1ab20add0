"""BM25 over the corpus with `bm25s`: built once, saved under a stamp beside the dense index, memory-mapped.

bm25s scores eagerly: at build time it stores every (term, passage) BM25 score in a CSC matrix (one column per
term, rows = passages), so a query's scores are a sum of columns and a shard of the corpus is a row slice of
that matrix with the same numbers (the IDF and average length stay the whole corpus's). Layout:
``<index.root>/bm25-<sha256(stamp)[:16]>/`` holds bm25s' files (``*.index.npy``, ``params.index.json``), the
tokenizer's vocabulary and ``stamp.json`` (corpus fingerprint, k1, b, method, stopwords, bm25s version);
written atomically. ``load`` memory-maps the matrix; sharded over W ranks, rank r keeps the rows
``shard_range(N, r, W)`` (read once, 1/W of it in memory), and ``search`` is a collective that merges every
shard's top-k exactly, as ``ShardedIndex`` does for the dense index.

Top-k is deterministic: by score, then by passage id (lower first), in one process and merged over shards
alike; passages that share no term with the query score 0 and fill the list in id order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import torch
import torch.distributed as dist
from bm25s.tokenization import Tokenizer

from rag_lightning import integrity
from rag_lightning.retrieval.sharded import rank_world, shard_range

METHODS = ("lucene", "robertson", "atire")  # the variants without a non-occurrence term: rows slice exactly
STAMP_FILE = "stamp.json"


def passage_texts(corpus, start: int = 0, end: int | None = None, chunk: int = 10_000) -> list[str]:
    """``title text`` of corpus rows [start, end) (what BM25 indexes; no encoder prefix)."""
    end = len(corpus) if end is None else end
    out: list[str] = []
    for s in range(start, end, chunk):
        rows = list(range(s, min(s + chunk, end)))
        out += [f"{t} {x}" if t else x for t, x in zip(corpus.titles(rows), corpus.texts(rows))]
    return out


def topk_rows(scores: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one score vector (n,) by (score desc, id asc) -> (scores (k,) float32, ids (k,) int64 + offset),
    padded with (-inf, -1) when n < k. O(n)."""
    n = len(scores)
    m = min(k, n)
    out_s, out_i = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
    if m == 0:
        return out_s, out_i
    t = scores[np.argpartition(-scores, m - 1)[:m]].min()  # the m-th largest score
    above = np.flatnonzero(scores > t)
    sel = np.concatenate([above, np.flatnonzero(scores == t)[: m - len(above)]])
    sel = sel[np.lexsort((sel, -scores[sel]))]
    out_s[:m], out_i[:m] = scores[sel], sel + offset
    return out_s, out_i


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of candidate lists (B, M) by (score desc, id asc), padding (-1) last."""
    key_id = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    out_s, out_i = np.empty((len(ids), k), np.float32), np.empty((len(ids), k), np.int64)
    for r in range(len(ids)):
        order = np.lexsort((key_id[r], -scores[r]))[:k]
        out_s[r], out_i[r] = scores[r][order], ids[r][order]
    return out_s, out_i


class BM25Index:
    """BM25 over global passage rows [start, start + n) of the corpus; ``search`` returns global ids."""

    def __init__(
        self,
        model: bm25s.BM25,
        tokenizer: Tokenizer,
        start: int = 0,
        mode: str = "replicated",
        meta: dict[str, Any] | None = None,
        group=None,
    ) -> None:
        if mode not in ("sharded", "replicated"):
            raise ValueError(f"mode must be sharded|replicated, got {mode!r}")
        self.model, self.tokenizer, self.start, self.mode, self.group = model, tokenizer, start, mode, group
        self.meta = dict(meta or {})

    @property
    def ntotal(self) -> int:
        """Rows held by this rank."""
        return int(self.model.scores["num_docs"])

    # ---------------------------------------------------------------- build / save / load
    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        k1: float = 0.9,
        b: float = 0.4,
        method: str = "lucene",
        stopwords: str | None = "en",
        meta: dict[str, Any] | None = None,
    ) -> BM25Index:
        """Index all of ``texts`` (one per corpus row, in row order)."""
        if method not in METHODS:
            raise ValueError(f"retriever.bm25.method must be one of {METHODS}, got {method!r}")
        tok = Tokenizer(stopwords=stopwords or [])
        ids = tok.tokenize(list(texts), update_vocab=True, return_as="ids", show_progress=False)
        model = bm25s.BM25(k1=k1, b=b, method=method)
        model.index(ids, show_progress=False)
        # built from ids, the model's own vocabulary is unused; bm25s saves it as JSON: string keys
        model.vocab_dict = {str(k): v for k, v in model.vocab_dict.items()}
        return cls(model, tok, 0, "replicated", {"stopwords": stopwords, **(meta or {})})

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic: written to a temporary directory beside ``path``, then renamed over it."""
        if self.start != 0 or self.mode == "sharded" and rank_world(self.group)[1] > 1:
            raise RuntimeError("save the whole BM25 index (built in one process), not a shard")
        path = Path(path)
        with integrity.atomic_dir(path) as tmp:
            self.model.save(str(tmp), show_progress=False)
            self.tokenizer.save_vocab(str(tmp))
            (tmp / STAMP_FILE).write_text(json.dumps({**self.meta, "passages": self.ntotal}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, mode: str = "replicated", group=None) -> BM25Index:
        """Memory-mapped; sharded over W > 1 ranks, this rank keeps only its rows of the score matrix."""
        meta = read_stamp(path)
        if meta is None:
            raise FileNotFoundError(f"{path}: no complete BM25 index (stamp.json missing)")
        model = bm25s.BM25.load(str(path), mmap=True, show_progress=False)
        tok = Tokenizer(stopwords=meta.get("stopwords") or [])
        tok.load_vocab(str(path))
        index = cls(model, tok, 0, mode, meta, group)
        rank, world = rank_world(group)
        if mode == "sharded" and world > 1:
            index.keep_rows(*shard_range(index.ntotal, rank, world))
        return index

    def keep_rows(self, start: int, end: int) -> None:
        """Restrict to global rows [start, end) (a row slice of the CSC score matrix: same scores)."""
        sc = self.model.scores
        indices = np.asarray(sc["indices"])
        keep = (indices >= start) & (indices < end)  # (nnz,)
        csum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        self.model.scores = {
            "data": np.asarray(sc["data"])[keep],
            "indices": (indices[keep] - start).astype(indices.dtype),
            "indptr": csum[np.asarray(sc["indptr"])],
            "num_docs": end - start,
        }
        self.start = start

    # ---------------------------------------------------------------- search
    def _local(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's top-k for every query: (M, k) float32 scores, (M, k) int64 global ids."""
        q_ids = self.tokenizer.tokenize(
            list(queries), update_vocab=False, return_as="ids", show_progress=False
        )
        out_s, out_i = np.empty((len(q_ids), k), np.float32), np.empty((len(q_ids), k), np.int64)
        for r, ids in enumerate(q_ids):
            s = self.model.get_scores_from_ids(ids)  # (n,)
            out_s[r], out_i[r] = topk_rows(s, k, self.start)
        return out_s, out_i

    def search(self, queries: Sequence[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global top-k of each query text -> (scores (B, k) float32, ids (B, k) int64), CPU. Collective when
        sharded over several ranks (every rank calls it, with its own possibly empty list)."""
        rank, world = rank_world(self.group)
        if self.mode == "replicated" or world == 1:
            s, i = self._local(queries, k)
            return torch.from_numpy(s), torch.from_numpy(i)
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, list(queries), group=self.group)
        s, i = self._local([q for part in gathered for q in part], k)  # (M, k) for all ranks' queries
        results: list[Any] = [None] * world
        dist.all_gather_object(results, (s, i), group=self.group)
        lo = sum(len(p) for p in gathered[:rank])
        hi = lo + len(queries)
        cand_s = np.concatenate([r[0][lo:hi] for r in results], axis=1)  # (B, world * k)
        cand_i = np.concatenate([r[1][lo:hi] for r in results], axis=1)
        s, i = merge_topk(cand_s, cand_i, k)
        return torch.from_numpy(s), torch.from_numpy(i)


def read_stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """The stamp of a complete BM25 directory (with ``passages`` and ``stopwords``), or None."""
    try:
        return json.loads((Path(path) / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def hard_negatives(
    index: BM25Index,
    corpus,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    n: int,
    exclude: Sequence[set[int]] = (),
    regex: bool = False,
    depth: int = 100,
) -> list[list[int]]:
    """DPR's BM25 negatives: per question, the ``n`` best BM25 passages (of the top ``depth``) that contain no
    gold answer (``metrics.has_answer``) and are not in ``exclude[i]`` (e.g. its gold passages)."""
    from rag_lightning.metrics import has_answer

    _, ids = index.search(questions, min(depth, len(corpus)))  # (B, depth); collective when sharded
    out = []
    for r, row in enumerate(ids.tolist()):
        skip = exclude[r] if r < len(exclude) else set()
        cand = [p for p in row if p >= 0 and p not in skip]
        texts = corpus.texts(cand)
        out.append([p for p, t in zip(cand, texts) if not has_answer(t, answers[r], regex)][:n])
    return out
