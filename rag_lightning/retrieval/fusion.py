"""Hybrid retrieval: fuse ranked candidate lists (dense and BM25) into one.

- ``rrf``: reciprocal rank fusion (Cormack et al. 2009), ``score(p) = sum_lists 1 / (rrf_k + rank_list(p))``
  with ranks from 1, a list that lacks p adding nothing;
- ``weighted``: ``score(p) = sum_lists w_list * minmax_list(s_list(p))``, each list's scores min-max
  normalized per query over that list (a list that lacks p, or holds one distinct score, adds 0).
Ties are broken by passage id (lower first); id -1 (padding) never enters. Pure functions over (B, n) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FUSIONS = ("rrf", "weighted")


def _top(fused: list[dict[int, float]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """{id: score} per row -> (scores (B, k) float32, ids (B, k) int64), best first, (-inf, -1) padded."""
    out_s = torch.full((len(fused), k), float("-inf"))
    out_i = torch.full((len(fused), k), -1, dtype=torch.long)
    for r, row in enumerate(fused):
        best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        if best:
            out_i[r, : len(best)] = torch.tensor([i for i, _ in best])
            out_s[r, : len(best)] = torch.tensor([s for _, s in best])
    return out_s, out_i


def rrf(ids: Sequence[torch.Tensor], k: int, rrf_k: float = 60.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reciprocal rank fusion of ranked id lists, each (B, n_l) best first -> top-k (scores, ids) (B, k)."""
    fused: list[dict[int, float]] = [{} for _ in range(len(ids[0]))]
    for lst in ids:
        for r, row in enumerate(lst.tolist()):
            for rank, p in enumerate(row, start=1):
                if p >= 0:
                    fused[r][p] = fused[r].get(p, 0.0) + 1.0 / (rrf_k + rank)
    return _top(fused, k)


def minmax(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, (s - min) / (max - min) over the valid entries (ids >= 0) of (B, n) scores; 0 where max = min."""
    valid = ids >= 0
    s = scores.float()
    lo = s.masked_fill(~valid, float("inf")).min(1, keepdim=True).values  # (B, 1)
    hi = s.masked_fill(~valid, float("-inf")).max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (s - lo) / span.clamp_min(1e-30), torch.zeros_like(s))
    return out.masked_fill(~valid, 0.0)  # (B, n)


def weighted(
    scores: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], weights: Sequence[float], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of per-list min-max normalized scores (lists (B, n_l)) -> top-k (scores, ids) (B, k)."""
    fused: list[dict[int, float]] = [{} for _ in range(len(ids[0]))]
    for s, lst, w in zip(scores, ids, weights):
        norm = minmax(s, lst).tolist()
        for r, row in enumerate(lst.tolist()):
            for p, v in zip(row, norm[r]):
                if p >= 0:
                    fused[r][p] = fused[r].get(p, 0.0) + w * v
    return _top(fused, k)
