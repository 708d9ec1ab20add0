"""RAG marginal likelihoods (Lewis et al. 2020): pure tensor math, no model code.

Shapes: ``seq_logits`` (B*K, T, V) where rows ``b*K .. b*K+K-1`` belong to question ``b``;
``doc_scores`` (B, K) unnormalized retrieval scores; ``labels`` (B, T), position ``t`` of the decoder
predicts ``labels[:, t]``; positions equal to ``ignore_index`` are padding.

With p(z|x) = softmax_K(doc_scores) and p(y_t|x,z,y<t) = softmax_V(seq_logits)[y_t]:

* RAG-Sequence:  nll = -log sum_z p(z|x) prod_t p(y_t|x,z,y<t)       (padding contributes log 1 = 0)
* RAG-Token:     nll = -sum_t log sum_z p(z|x) p(y_t|x,z,y<t)        (padding contributes 0)

Label smoothing (epsilon): the smoothing term replaces the target log-probability log p(y_t|..) by the
mean over the vocabulary of the log-probabilities, s_t(z) = (1/V) sum_v log p(v|x,z,y<t) (the
cross-entropy against a uniform target), and is marginalized exactly like the NLL:

* sequence: smooth = -log sum_z p(z|x) exp(sum_t s_t(z))
* token:    smooth = -sum_t log sum_z p(z|x) exp(s_t(z))

    loss = (1 - epsilon) * nll + epsilon * smooth;   epsilon = 0 gives the exact NLL.

(Hugging Face's RagSequence/RagToken use a variant that sums over V and scales by epsilon / V, adding
the document prior to every vocabulary entry; ours is the cleaner "mean log-prob" form.)

Numerics: everything is computed in float32 (float64 if the logits are float64) even for bf16 / fp16
logits. No (B, K, T, V) log-softmax is built: we gather the target logit, take the mean logit, and
compute the per-(row, t) logsumexp normalizer with a chunked custom autograd function that saves only
the original logits and the (B*K, T) normalizers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rag_sequence_nll", "rag_token_nll"]

_CHUNK_ELEMS = 1 << 24  # elements of a float32 chunk in the logsumexp kernel (64 MiB)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the last dim in ``out_dtype``, chunked over rows; grad = g * softmax(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_dtype: torch.dtype) -> Tensor:  # x (N, V) -> (N,)
        n, v = x.shape
        step = max(1, _CHUNK_ELEMS // max(v, 1))
        out = torch.empty(n, dtype=out_dtype, device=x.device)
        for i in range(0, n, step):
            out[i : i + step] = torch.logsumexp(x[i : i + step].to(out_dtype), dim=-1)
        ctx.save_for_backward(x, out)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # g (N,)
        x, out = ctx.saved_tensors
        grad = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.step):
            sl = slice(i, i + ctx.step)
            p = torch.exp(x[sl].to(out.dtype) - out[sl, None])  # (n, V) softmax
            grad[sl] = (g[sl, None].to(out.dtype) * p).to(x.dtype)
        return grad, None


def _token_stats(
    seq_logits: Tensor, doc_scores: Tensor, labels: Tensor, ignore_index: int, need_smooth: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Return tok_lp (B,K,T), smooth_lp (B,K,T) or None, doc_lp (B,K), mask (B,T) bool."""
    if seq_logits.dim() != 3 or doc_scores.dim() != 2 or labels.dim() != 2:
        raise ValueError(
            f"expected seq_logits (B*K,T,V), doc_scores (B,K), labels (B,T); got "
            f"{tuple(seq_logits.shape)}, {tuple(doc_scores.shape)}, {tuple(labels.shape)}"
        )
    b, k = doc_scores.shape
    bk, t, v = seq_logits.shape
    if bk != b * k or labels.shape != (b, t):
        raise ValueError(
            f"shape mismatch: seq_logits {tuple(seq_logits.shape)} needs B*K={b * k} rows and labels "
            f"(B,T)=({b},{t}); got labels {tuple(labels.shape)}"
        )
    dt = _compute_dtype(seq_logits)
    mask = labels != ignore_index  # (B, T)
    tgt = labels.masked_fill(~mask, 0).long()  # (B, T)
    tgt = tgt[:, None, :].expand(b, k, t).reshape(bk, t, 1)  # (B*K, T, 1)
    lse = _LogSumExp.apply(seq_logits.reshape(bk * t, v), dt).view(bk, t)  # (B*K, T)
    tok_lp = seq_logits.gather(-1, tgt).squeeze(-1).to(dt) - lse  # (B*K, T)
    smooth_lp = None
    if need_smooth:
        smooth_lp = (seq_logits.mean(-1, dtype=dt) - lse).view(b, k, t)  # (B, K, T)
    doc_lp = torch.log_softmax(doc_scores.to(dt), dim=-1)  # (B, K)
    return tok_lp.view(b, k, t), smooth_lp, doc_lp, mask


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _seq_marginal(tok_lp: Tensor, doc_lp: Tensor, mask: Tensor) -> Tensor:
    seq_lp = tok_lp.masked_fill(~mask[:, None, :], 0.0).sum(-1)  # (B, K)
    return -torch.logsumexp(doc_lp + seq_lp, dim=1)  # (B,)


def _tok_marginal(tok_lp: Tensor, doc_lp: Tensor, mask: Tensor) -> Tensor:
    marg = torch.logsumexp(doc_lp[:, :, None] + tok_lp, dim=1)  # (B, T)
    return -marg.masked_fill(~mask, 0.0).sum(-1)  # (B,)


def _loss(fn, seq_logits, doc_scores, labels, ignore_index, reduction, epsilon) -> Tensor:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    tok_lp, smooth_lp, doc_lp, mask = _token_stats(
        seq_logits, doc_scores, labels, ignore_index, need_smooth=epsilon > 0
    )
    loss = fn(tok_lp, doc_lp, mask)  # (B,)
    if epsilon > 0:
        loss = (1.0 - epsilon) * loss + epsilon * fn(smooth_lp, doc_lp, mask)
    return _reduce(loss, reduction)


def rag_sequence_nll(
    seq_logits: Tensor,
    doc_scores: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "none",
    epsilon: float = 0.0,
) -> Tensor:
    """RAG-Sequence loss -log sum_z p(z|x) prod_t p(y_t|x,z,y<t) (label-smoothed, see module doc).

    Returns (B,) for reduction="none", else a scalar sum / mean over the batch; float32 (float64 for
    float64 logits). A row whose labels are all ``ignore_index`` has loss 0.
    """
    return _loss(_seq_marginal, seq_logits, doc_scores, labels, ignore_index, reduction, epsilon)


def rag_token_nll(
    seq_logits: Tensor,
    doc_scores: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "none",
    epsilon: float = 0.0,
) -> Tensor:
    """RAG-Token loss -sum_t log sum_z p(z|x) p(y_t|x,z,y<t) (label-smoothed, see module doc).

    Returns (B,) for reduction="none", else a scalar sum / mean over the batch; float32 (float64 for
    float64 logits). Padding positions contribute 0.
    """
    return _loss(_tok_marginal, seq_logits, doc_scores, labels, ignore_index, reduction, epsilon)
