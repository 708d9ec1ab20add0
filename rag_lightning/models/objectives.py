"""Retriever training objectives beyond the RAG marginal: pure tensor math, no model code.

Inputs, per question b and retrieved passage k:
* ``seq_lp`` (B, K): the generator's log-likelihood of the answer given the question and passage k,
  log p(y|x,z_k) = sum_t log p(y_t|x,z_k,y<t) (what the RAG-Sequence marginal sums over passages);
* ``scores`` (B, K): retrieval scores s(x, z_k); p_R(z|x) = softmax_K(scores / temperature).

Every objective returns a per-question loss (B,) in float32 (float64 for float64 inputs). Where a paper
uses the generator as a *target*, ``seq_lp`` is detached here (stop-gradient): those losses send gradient
into the retriever only, never into the generator. The generator is trained by its own loss (the RAG
marginal, see ``marginalize.py``) or not at all (a frozen generator).

* EMDR2 (Sachan et al. 2021, retriever term): the log of the answer likelihood marginalized over the K
  passages with the reader's likelihood held fixed,
      emdr2 = -log sum_k p_R(z_k|x) SG(p(y|x,z_k)).
  Its gradient w.r.t. scores is (p_R - q) / temperature with q the posterior
  q_k ∝ p_R(z_k|x) p(y|x,z_k): the retriever is pulled towards the posterior over the K passages given
  the answer. (At temperature 1 this is the retriever half of the RAG-Sequence gradient; what differs
  from the marginal is that no gradient reaches the generator through this term.)
* Perplexity distillation (Atlas ``pdist``, Izacard et al. 2022): KL from the generator's distribution
  over passages to the retriever's,
      pdist = KL(Q || p_R) = sum_k Q_k (log Q_k - log p_R(z_k|x)),
      Q = softmax_K(SG(seq_lp) / target_temperature).
* LM-supervised retrieval (REPLUG LSR, Shi et al. 2023): the KL in the direction the paper writes,
      lsr = KL(p_R || Q) = sum_k p_R(z_k|x) (log p_R(z_k|x) - log Q_k),
  with p_R = softmax(scores / gamma) and Q = softmax(SG(seq_lp) / beta); ``temperature`` is gamma and
  ``target_temperature`` beta. It is meant for a frozen generator (``model.generator_loss=none``).
* Contrastive (DPR, Karpukhin et al. 2020): negative log-probability of the gold passages among the
  candidates, ``scores`` (B, N) of each question against N candidates (its top-K, or every passage
  retrieved for the batch: in-batch negatives) and ``gold`` (B, N) bool,
      contrastive = -log sum_{j: gold_bj} softmax_N(scores / temperature)_j.
  With one gold passage this is DPR's loss; rows with no gold candidate give 0 (see ``has_gold``).
* Attention distillation (``adist``, Izacard & Grave 2021, Atlas's default): for a reader that reads all K
  passages at once (Fusion-in-Decoder, one prompt), the attention mass ``mass`` (B, K) its decoder puts on
  each passage (``passage_attention``: averaged over layers, heads and target tokens) is the target,
      adist = KL(A || p_R),   A = SG(mass) / sum_k SG(mass)   (or softmax(SG(mass) / target_temperature)).

``OBJECTIVES[name]`` is the function and ``OBJECTIVE_INPUTS[name]`` what it reads from the reader:
``likelihood`` (``seq_lp`` (B, K)) or ``attention`` (``mass`` (B, K)).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "OBJECTIVES",
    "OBJECTIVE_INPUTS",
    "adist_loss",
    "passage_attention",
    "contrastive_loss",
    "emdr2_loss",
    "entropy",
    "lsr_loss",
    "pdist_loss",
    "scale_grad",
]


def _dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(seq_lp: Tensor, scores: Tensor, *temps: float) -> None:
    if seq_lp.dim() != 2 or seq_lp.shape != scores.shape:
        raise ValueError(
            f"expected seq_lp and scores of one shape (B, K); got {tuple(seq_lp.shape)}, {tuple(scores.shape)}"
        )
    for t in temps:
        if not t > 0:
            raise ValueError(f"temperatures must be > 0, got {t}")


def _retriever_logp(scores: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(scores.to(_dtype(scores)) / temperature, dim=-1)  # (B, K)


def _target_logp(seq_lp: Tensor, target_temperature: float, dt: torch.dtype) -> Tensor:
    return torch.log_softmax(seq_lp.detach().to(dt) / target_temperature, dim=-1)  # (B, K), no grad


def emdr2_loss(seq_lp: Tensor, scores: Tensor, temperature: float = 1.0) -> Tensor:
    """-log sum_k softmax(scores / temperature)_k exp(SG(seq_lp_k)) -> (B,). Gradient: scores only."""
    _check(seq_lp, scores, temperature)
    log_pr = _retriever_logp(scores, temperature)  # (B, K)
    return -torch.logsumexp(log_pr + seq_lp.detach().to(log_pr.dtype), dim=-1)


def pdist_loss(
    seq_lp: Tensor, scores: Tensor, temperature: float = 1.0, target_temperature: float = 1.0
) -> Tensor:
    """KL(Q || p_R), Q = softmax(SG(seq_lp) / target_temperature), p_R = softmax(scores / temperature)
    -> (B,). Gradient: scores only."""
    _check(seq_lp, scores, temperature, target_temperature)
    log_pr = _retriever_logp(scores, temperature)  # (B, K)
    log_q = _target_logp(seq_lp, target_temperature, log_pr.dtype)  # (B, K)
    return (log_q.exp() * (log_q - log_pr)).sum(-1)


def lsr_loss(
    seq_lp: Tensor, scores: Tensor, temperature: float = 1.0, target_temperature: float = 1.0
) -> Tensor:
    """KL(p_R || Q), p_R = softmax(scores / gamma), Q = softmax(SG(seq_lp) / beta) (REPLUG's direction;
    gamma = ``temperature``, beta = ``target_temperature``) -> (B,). Gradient: scores only."""
    _check(seq_lp, scores, temperature, target_temperature)
    log_pr = _retriever_logp(scores, temperature)  # (B, K)
    log_q = _target_logp(seq_lp, target_temperature, log_pr.dtype)  # (B, K)
    return (log_pr.exp() * (log_pr - log_q)).sum(-1)


def contrastive_loss(scores: Tensor, gold: Tensor, temperature: float = 1.0) -> Tensor:
    """-log sum_{j gold} softmax(scores / temperature)_j over N candidates -> (B,); 0 for rows without gold.

    scores (B, N); gold (B, N) bool. Candidates with score -inf (padding) get probability 0.
    """
    if scores.dim() != 2 or gold.shape != scores.shape:
        raise ValueError(
            f"expected scores and gold of one shape (B, N); got {tuple(scores.shape)}, {tuple(gold.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = _retriever_logp(scores, temperature)  # (B, N)
    gold = gold.bool()
    pos = torch.logsumexp(logp.masked_fill(~gold, float("-inf")), dim=-1)  # (B,), -inf without gold
    return torch.where(gold.any(-1), -pos, torch.zeros_like(pos))


def entropy(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy (nats) of p(z|x) = softmax(scores / temperature) over the last dim -> (B,)."""
    logp = _retriever_logp(scores, temperature)
    return -(logp.exp() * logp).sum(-1)


def scale_grad(x: Tensor, weight: float) -> Tensor:
    """x in the forward pass; ``weight`` times the incoming gradient in the backward (0: detached)."""
    if weight == 0:
        return x.detach()
    if weight == 1:
        return x
    return weight * x + (1.0 - weight) * x.detach()


def passage_attention(attn: Tensor, segments: Tensor, n_docs: int, target_mask: Tensor) -> Tensor:
    """Attention mass on each passage, averaged over layers, heads and target tokens -> (B, K).

    attn (L, B, heads, T, N): attention probabilities of the T target positions over N keys per layer;
    segments (B, N) long: the passage of each key (0..K-1, -1 for none); target_mask (B, T) bool: non-padding
    targets. mass_bk = mean_{l, h, t: target} sum_{n: segments_bn = k} attn_lbhtn."""
    a = attn.to(_dtype(attn)).mean(dim=(0, 2))  # (B, T, N)
    onehot = torch.nn.functional.one_hot(segments.clamp(min=-1) + 1, n_docs + 1)[..., 1:].to(
        a.dtype
    )  # (B, N, K)
    per_token = torch.bmm(a, onehot)  # (B, T, K)
    m = target_mask.to(a.dtype)[..., None]  # (B, T, 1)
    return (per_token * m).sum(1) / m.sum(1).clamp(min=1)


def adist_loss(
    mass: Tensor, scores: Tensor, temperature: float = 1.0, target_temperature: float | None = None
) -> Tensor:
    """KL(A || p_R) with A = SG(mass) normalized over the K passages (or softmax(SG(mass) / target_temperature)),
    p_R = softmax(scores / temperature) -> (B,); 0 for a row whose mass is 0 (no passage token was read).
    Gradient: scores only."""
    _check(mass, scores, temperature, *(() if target_temperature is None else (target_temperature,)))
    log_pr = _retriever_logp(scores, temperature)  # (B, K)
    a = mass.detach().to(log_pr.dtype)
    if target_temperature is None:  # a row without mass on any passage (none kept) gives no target: loss 0
        total = a.sum(-1, keepdim=True)  # (B, 1)
        target = torch.where(total > 0, a / total.clamp(min=torch.finfo(a.dtype).tiny), 0.0)  # (B, K)
    else:
        target = torch.softmax(a / target_temperature, dim=-1)
    return (torch.special.xlogy(target, target) - target * log_pr).sum(-1)


# retriever objectives: name -> fn(reader output (B, K), scores (B, K), **kwargs) -> (B,), and which output
OBJECTIVES = {"emdr2": emdr2_loss, "pdist": pdist_loss, "lsr": lsr_loss, "adist": adist_loss}
OBJECTIVE_INPUTS = {"emdr2": "likelihood", "pdist": "likelihood", "lsr": "likelihood", "adist": "attention"}
