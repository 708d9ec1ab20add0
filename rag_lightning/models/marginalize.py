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
logits. Only non-padding target positions are scored, by the chunked kernels of ``token_logprob``: from the
logits (one (N, V) gradient buffer, no log-softmax) or, in training, straight from the decoder's final hidden
states and the output layer (:func:`answer_logprobs_fused`, no (B*K, T, V) logits tensor). The
marginals below are small functions of the per-token log-probs (B, K, T) and the doc log-probs (B, K).

Interface for other objectives: :class:`AnswerLogProbs` (from :func:`answer_logprobs` or
:func:`answer_logprobs_fused`) carries ``tok_lp`` (B, K, T) and ``seq_lp`` (B, K) = sum_t log p(y_t|x,z,y<t),
differentiable, so a retriever objective reuses the generator pass of the loss; :func:`rag_loss` turns it
into the RAG-Token / RAG-Sequence loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rag_lightning.models.token_logprob import linear_token_logprobs, token_logprobs

__all__ = [
    "AnswerLogProbs",
    "answer_logprobs",
    "answer_logprobs_fused",
    "label_positions",
    "rag_loss",
    "rag_sequence_nll",
    "rag_token_nll",
]


@dataclass
class AnswerLogProbs:
    """Per-passage answer log-likelihoods of one generator pass (differentiable).

    tok_lp (B, K, T): log p(y_t | x, z_k, y_<t), 0 at padding; smooth_lp (B, K, T) or None: the mean over the
    vocabulary of log p(v | x, z_k, y_<t), 0 at padding (label smoothing); mask (B, T): non-padding targets.
    """

    tok_lp: Tensor
    smooth_lp: Tensor | None
    mask: Tensor

    @property
    def seq_lp(self) -> Tensor:
        """(B, K) log p(y | x, z_k) = sum_t tok_lp."""
        return self.tok_lp.sum(-1)


def label_positions(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(P,) flat indices into (B, T) of the non-padding targets. On a GPU this waits for the device (the
    output size is data-dependent): the collator computes it on the CPU instead (``batch["label_positions"]``)."""
    return (labels != ignore_index).flatten().nonzero().squeeze(1)


def _scatter_positions(vals: Tensor, pos: Tensor, b: int, k: int, t: int) -> Tensor:
    """vals (P, K) at flat (B, T) positions pos (P,) -> (B, K, T), zeros elsewhere (differentiable)."""
    out = vals.new_zeros(b * t, k).index_put((pos,), vals)  # (B*T, K)
    return out.view(b, t, k).transpose(1, 2)  # (B, K, T)


def _rows_and_targets(labels: Tensor, pos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rows of the (B*K*T) flattening for every (position, passage), (P*K,), and their targets (P*K,)."""
    t = labels.shape[1]
    bi, ti = pos // t, pos % t  # (P,)
    kk = torch.arange(k, device=labels.device)
    rows = (bi[:, None] * k + kk) * t + ti[:, None]  # (P, K)
    tgt = labels.flatten()[pos][:, None].expand(-1, k)  # (P, K)
    return rows.flatten(), tgt.flatten()


def _check(b: int, k: int, bk: int, t: int, labels: Tensor, what: str) -> None:
    if bk != b * k or labels.shape != (b, t):
        raise ValueError(
            f"shape mismatch: {what} needs B*K={b * k} rows and labels (B,T)=({b},{t}); got {bk} rows, "
            f"labels {tuple(labels.shape)}"
        )


def _per_position(tok: Tensor, mlp: Tensor | None, mask: Tensor, pos: Tensor, k: int) -> AnswerLogProbs:
    """Kernel outputs over the (P*K,) non-padding rows -> AnswerLogProbs laid out (B, K, T); mask (B, T)."""
    b, t = mask.shape
    return AnswerLogProbs(
        _scatter_positions(tok.view(-1, k), pos, b, k, t),
        None if mlp is None else _scatter_positions(mlp.view(-1, k), pos, b, k, t),
        mask,
    )


def answer_logprobs(
    seq_logits: Tensor,
    labels: Tensor,
    n_docs: int,
    ignore_index: int = -100,
    smooth: bool = False,
    positions: Tensor | None = None,
) -> AnswerLogProbs:
    """From logits (B*K, T, V) and labels (B, T); ``positions`` as from :func:`label_positions`."""
    if seq_logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"expected seq_logits (B*K,T,V), labels (B,T); got {tuple(seq_logits.shape)}, {tuple(labels.shape)}"
        )
    bk, t, v = seq_logits.shape
    b, k = labels.shape[0], n_docs
    _check(b, k, bk, t, labels, f"seq_logits {tuple(seq_logits.shape)}")
    pos = label_positions(labels, ignore_index) if positions is None else positions
    rows, tgt = _rows_and_targets(labels, pos, k)
    tok, mlp = token_logprobs(seq_logits.reshape(bk * t, v), tgt, smooth, rows)  # (P*K,)
    return _per_position(tok, mlp, labels != ignore_index, pos, k)


def answer_logprobs_fused(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    n_docs: int,
    ignore_index: int = -100,
    smooth: bool = False,
    positions: Tensor | None = None,
    cache_mb: float | None = None,
) -> AnswerLogProbs:
    """Same as :func:`answer_logprobs` of ``logits = hidden @ weight.T + bias`` without building them.

    hidden (B*K, T, H): the decoder's final states (as fed to the output layer); weight (V, H); bias (V,).
    Only the non-padding rows of ``hidden`` are gathered (P*K, H); the kernel chunks over them and keeps
    at most ``cache_mb`` MiB of logits for backward (see ``linear_token_logprobs``).
    """
    if hidden.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"expected hidden (B*K,T,H), labels (B,T); got {tuple(hidden.shape)}, {tuple(labels.shape)}"
        )
    bk, t, h = hidden.shape
    b, k = labels.shape[0], n_docs
    _check(b, k, bk, t, labels, f"hidden {tuple(hidden.shape)}")
    pos = label_positions(labels, ignore_index) if positions is None else positions
    rows, tgt = _rows_and_targets(labels, pos, k)
    hs = _take_rows(hidden.reshape(bk * t, h), rows)  # (P*K, H)
    tok, mlp = linear_token_logprobs(hs, weight, bias, tgt, smooth, cache_mb)  # (P*K,)
    return _per_position(tok, mlp, labels != ignore_index, pos, k)


def _take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x[rows] for x (M, H): advanced indexing on CPU, where index_select's kernel stalls on busy cores;
    index_select elsewhere (its backward, index_add, never waits for the device)."""
    return x[rows] if x.device.type == "cpu" else x.index_select(0, rows)


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


MARGINALS = {"sequence": _seq_marginal, "token": _tok_marginal}


def rag_loss(
    lp: AnswerLogProbs, doc_scores: Tensor, variant: str, epsilon: float = 0.0, reduction: str = "none"
) -> Tensor:
    """RAG-Token (``variant="token"``) or RAG-Sequence loss from per-token log-probs and doc scores (B, K)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if variant not in MARGINALS:
        raise ValueError(f"variant must be one of {sorted(MARGINALS)}, got {variant!r}")
    if doc_scores.dim() != 2 or doc_scores.shape != lp.tok_lp.shape[:2]:
        raise ValueError(
            f"shape mismatch: doc_scores {tuple(doc_scores.shape)}, tok_lp {tuple(lp.tok_lp.shape)}"
        )
    if epsilon > 0 and lp.smooth_lp is None:
        raise ValueError(
            "label smoothing needs the smoothing statistics: compute the log-probs with smooth=True"
        )
    fn = MARGINALS[variant]
    doc_lp = torch.log_softmax(doc_scores.to(lp.tok_lp.dtype), dim=-1)  # (B, K)
    loss = fn(lp.tok_lp, doc_lp, lp.mask)  # (B,)
    if epsilon > 0:
        loss = (1.0 - epsilon) * loss + epsilon * fn(lp.smooth_lp, doc_lp, lp.mask)
    return _reduce(loss, reduction)


def _loss(variant, seq_logits, doc_scores, labels, ignore_index, reduction, epsilon) -> Tensor:
    if seq_logits.dim() != 3 or doc_scores.dim() != 2 or labels.dim() != 2:
        raise ValueError(
            f"expected seq_logits (B*K,T,V), doc_scores (B,K), labels (B,T); got "
            f"{tuple(seq_logits.shape)}, {tuple(doc_scores.shape)}, {tuple(labels.shape)}"
        )
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    lp = answer_logprobs(seq_logits, labels, doc_scores.shape[1], ignore_index, smooth=epsilon > 0)
    return rag_loss(lp, doc_scores, variant, epsilon, reduction)


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
    return _loss("sequence", seq_logits, doc_scores, labels, ignore_index, reduction, epsilon)


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
    return _loss("token", seq_logits, doc_scores, labels, ignore_index, reduction, epsilon)
