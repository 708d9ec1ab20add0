"""Index sharded over DDP ranks: each rank holds rows [start, end) of the global corpus, top-k merged.

Modes:
  "sharded"    rank r indexes rows ``shard_range(N, r, world)`` (1/world of the memory). ``search`` is a
               collective: every rank must call it, with its own (possibly empty, possibly differently
               sized) query batch. Queries are all-gathered (sizes first, padded to the largest batch), every
               shard searches all queries, and an all-to-all sends each rank the per-shard top-k (scores,
               global ids, and for ``search_with_vectors`` the exact vectors, which only the owning shard
               holds) for its own queries, merged into the global top-k.
  "replicated" a plain DenseIndex over the whole corpus on every rank: no collectives, world x memory.
Without an initialized process group (or world 1) both modes behave like ``DenseIndex``.
Collectives run on CUDA tensors for nccl, CPU tensors otherwise (gloo).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rag_lightning.retrieval.index import DenseIndex


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous balanced shard [start, end) of n rows: the first ``n % world`` ranks get one extra row."""
    base, rem = divmod(n, world)
    start = rank * base + min(rank, rem)
    return start, start + base + (rank < rem)


def rank_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _device(group=None) -> torch.device:
    """Where collectives' tensors live: this rank's GPU for nccl, CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_ok(ok: bool, group=None) -> bool:
    """True on every rank iff ``ok`` on every rank (a MIN all-reduce; every rank must call it)."""
    if rank_world(group)[1] == 1:
        return ok
    flag = torch.tensor([int(ok)], device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def broadcast_from_zero(obj: Any, group=None) -> Any:
    """Rank 0's ``obj`` on every rank (every rank must call it): one decision, taken once."""
    if rank_world(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group, device=_device(group))
    return box[0]


class ShardedIndex:
    """Global-id search over a local ``DenseIndex`` holding global rows [start, start + local.ntotal)."""

    def __init__(self, local: DenseIndex, start: int = 0, mode: str = "sharded", group=None) -> None:
        if mode not in ("sharded", "replicated"):
            raise ValueError(f"mode must be sharded|replicated, got {mode!r}")
        self.local, self.start, self.mode, self.group = local, start, mode, group

    @classmethod
    def from_embeddings(
        cls, emb: torch.Tensor | np.ndarray, mode: str = "sharded", group=None, **index_kwargs
    ) -> ShardedIndex:
        """Build from the full (N, d) embeddings: this rank indexes its shard (sharded) or all rows.

        ``emb`` may be a memory-mapped array (``np.load(path, mmap_mode="r")``, e.g. the ``vectors.npy`` of
        an index saved by scripts/build_index.py): each rank then reads only its own rows from disk."""
        rank, world = rank_world(group)
        start, end = shard_range(len(emb), rank, world) if mode == "sharded" else (0, len(emb))
        local = DenseIndex(**index_kwargs)
        part = emb[start:end]  # (n, d)
        exact = part if isinstance(part, np.ndarray) and not part.flags.writeable else None  # memory-mapped
        local.build(part, vectors=exact)
        return cls(local, start, mode, group)

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def version(self) -> int:
        return self.local.version

    @version.setter
    def version(self, value: int) -> None:
        self.local.version = value

    @property
    def meta(self) -> dict:
        return self.local.meta

    @property
    def ntotal(self) -> int:
        """Rows held by this rank."""
        return self.local.ntotal

    def shard_dir(self, path: str | os.PathLike) -> Path:
        """Where this rank's part lives: `path` itself, or `path/shard-R-of-W` when sharded over W > 1."""
        rank, world = rank_world(self.group)
        return Path(path) / f"shard-{rank}-of-{world}" if self.mode == "sharded" and world > 1 else Path(path)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic save of this rank's part (sharded: every rank calls it; replicated: rank 0 suffices)."""
        self.local.meta["start"] = self.start
        self.local.save(self.shard_dir(path))

    @classmethod
    def load(cls, path: str | os.PathLike, mode: str = "sharded", group=None, **kwargs) -> ShardedIndex:
        probe = cls(DenseIndex(), 0, mode, group)
        local = DenseIndex.load(probe.shard_dir(path), **kwargs)
        return cls(local, int(local.meta.get("start", 0)), mode, group)

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global top-k: (scores (B, k) float32 CPU, global ids (B, k) int64 CPU), descending, (-inf, -1)
        padded. Collective in sharded mode."""
        scores, ids, _ = self._search(q, k, with_vectors=False)
        return scores, ids

    def search_with_vectors(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``search`` plus exact vectors (B, k, d) float32 CPU, fetched from the owning shard."""
        return self._search(q, k, with_vectors=True)

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact vectors for global ids held by this rank (all ids when replicated or world 1)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        local = torch.where(ids >= 0, ids - self.start, ids)
        if ((local >= self.local.ntotal) | (local < -1)).any():
            raise IndexError("ids outside this rank's shard: use search_with_vectors in sharded mode")
        return self.local.vectors(local)

    def _local(self, q: torch.Tensor, k: int, with_vectors: bool):
        scores, ids = self.local.search(q, k)
        vecs = self.local.vectors(ids) if with_vectors else None  # (M, k, d)
        return scores, torch.where(ids >= 0, ids + self.start, ids), vecs

    @torch.no_grad()
    def _search(self, q: torch.Tensor, k: int, with_vectors: bool):
        rank, world = rank_world(self.group)
        if self.mode == "replicated" or world == 1:
            return self._local(q, k, with_vectors)
        dev = _device(self.group)
        q = torch.as_tensor(q).detach().to(dev, torch.float32)  # (B, d)
        b, d = q.shape[0], self.dim
        # 1) batch sizes, then padded queries from every rank
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([b], device=dev), group=self.group)
        sizes = [int(s) for s in sizes]
        mb = max(sizes)
        if mb == 0:  # same decision on every rank: no further collectives
            empty = torch.empty((0, k))
            return empty, empty.long(), torch.empty((0, k, d)) if with_vectors else None
        q_pad = torch.zeros((mb, d), device=dev)
        q_pad[:b] = q
        q_all = [torch.empty((mb, d), device=dev) for _ in range(world)]
        dist.all_gather(q_all, q_pad, group=self.group)
        q_all = torch.cat([g[:n] for g, n in zip(q_all, sizes)])  # (M, d), M = sum(sizes)
        # 2) local top-k for all queries, laid out per destination rank: (world, mb, k[, d])
        s, i, v = self._local(q_all.cpu(), k, with_vectors)  # (M, k), (M, k), (M, k, d)
        send_s = torch.full((world, mb, k), float("-inf"))
        send_i = torch.full((world, mb, k), -1, dtype=torch.long)
        send_v = torch.zeros((world, mb, k, d)) if with_vectors else None
        off = 0
        for r, n in enumerate(sizes):
            send_s[r, :n], send_i[r, :n] = s[off : off + n], i[off : off + n]
            if with_vectors:
                send_v[r, :n] = v[off : off + n]
            off += n
        # 3) each rank receives every shard's results for its own queries
        recv = [self._all_to_all(t, dev) for t in (send_s, send_i, send_v) if t is not None]
        cand_s = recv[0].permute(1, 0, 2).reshape(mb, world * k)  # (mb, world*k)
        cand_i = recv[1].permute(1, 0, 2).reshape(mb, world * k)
        top_s, pos = cand_s.topk(k, dim=1)  # (mb, k)
        top_i = cand_i.gather(1, pos)
        top_v = None
        if with_vectors:
            cand_v = recv[2].permute(1, 0, 2, 3).reshape(mb, world * k, d)  # (mb, world*k, d)
            top_v = cand_v.gather(1, pos.unsqueeze(-1).expand(-1, -1, d))[:b]  # (B, k, d)
        return top_s[:b], top_i[:b], top_v

    def _all_to_all(self, send: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """(world, ...) -> (world, ...): slot r of the output is slot ``rank`` of rank r's input. CPU out."""
        send = send.to(dev).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.cpu()

    def __repr__(self) -> str:
        return f"ShardedIndex(mode={self.mode!r}, start={self.start}, local={self.local!r})"
