"""Pointer (copy) head for causal generators: an answer token is written or copied from the prompt.

At answer position t, with final hidden state h_t and the prompt's final states s_1..s_S (ids x_1..x_S):

    a_t = softmax_i( q(h_t) . k(s_i) / sqrt(d) )        attention over the real prompt tokens   (S,)
    g_t = sigmoid( w . h_t + b )                        probability of copying                   ()
    p(y_t) = (1 - g_t) p_vocab(y_t) + g_t sum_{i: x_i = y_t} a_t,i

(the pointer-generator of See et al. 2017). Extractive answers are spans of the retrieved passage: pointing
at them is learned from a few hundred examples, where the output layer of a small model spells them out
slowly (README, "Measured": the demo). The mixture is a normalized distribution over the vocabulary, so
the RAG marginals (`marginalize.py`) and the decoders (`decode.py`) use it as they use the LM's own.

The head computes its attention in float32 (float64 for float64 inputs); the functions are pure.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Pointer", "PointerHead", "copy_logprobs", "mix", "mix_distribution"]


class Pointer(NamedTuple):
    """The head's output at answer positions: attention log-probs over the prompt (R, T, S), gate logits
    (R, T) (log g = logsigmoid(gate)), and the prompt ids (R, S) the attention points at."""

    attn_lp: Tensor
    gate: Tensor
    src: Tensor


class PointerHead(nn.Module):
    """Query / key projections (H -> d) and the copy gate (H -> 1); new weights, trained with the generator.
    The gate's bias starts at 0: copy and write are equally likely until the data says otherwise."""

    def __init__(self, hidden: int, dim: int | None = None):
        super().__init__()
        self.dim = dim or hidden
        self.query = nn.Linear(hidden, self.dim)
        self.key = nn.Linear(hidden, self.dim)
        self.gate = nn.Linear(hidden, 1)
        nn.init.zeros_(self.gate.bias)

    def keys(self, prompt_states: Tensor) -> Tensor:
        """(R, S, H) final states of the prompt -> keys (R, S, d)."""
        return self.key(prompt_states)

    def forward(self, h: Tensor, keys: Tensor, mask: Tensor, src: Tensor) -> Pointer:
        """h (R, T, H) answer states, keys (R, S, d), mask (R, S) real prompt tokens, src (R, S) their ids."""
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        scores = (self.query(h) @ keys.transpose(1, 2)).to(dt) / math.sqrt(self.dim)  # (R, T, S)
        scores = scores.masked_fill(~mask[:, None, :].bool(), torch.finfo(dt).min)
        return Pointer(scores.log_softmax(-1), self.gate(h).squeeze(-1).to(dt), src)


def copy_logprobs(p: Pointer, targets: Tensor) -> Tensor:
    """targets (R, T) -> (R, T) log sum_{i: x_i = y_t} a_t,i; a very large negative number (not -inf, so that
    gradients stay finite) where y_t is not in the prompt. Negative targets (padding) count as absent."""
    match = p.src[:, None, :] == targets[..., None]  # (R, T, S)
    return p.attn_lp.masked_fill(~match, torch.finfo(p.attn_lp.dtype).min).logsumexp(-1)


def mix(vocab_lp: Tensor, copy_lp: Tensor, gate: Tensor) -> Tensor:
    """log((1 - g) p_vocab + g p_copy) from log p_vocab, log p_copy and the gate logits (same shapes)."""
    return torch.logaddexp(F.logsigmoid(-gate) + vocab_lp, F.logsigmoid(gate) + copy_lp)


def mix_distribution(logits: Tensor, p: Pointer) -> Tensor:
    """Full mixture log-probs (R, T, V) from the LM's logits (R, T, V) (the decoders' and the unfused loss's
    view; the training loss scores only the targets: `copy_logprobs` + `mix`)."""
    vocab_lp = F.log_softmax(logits.to(p.attn_lp.dtype), dim=-1)  # (R, T, V)
    copied = torch.zeros_like(vocab_lp).scatter_add_(  # sum of attention per vocabulary id
        2, p.src[:, None, :].expand(-1, vocab_lp.shape[1], -1), p.attn_lp.exp()
    )  # (R, T, V)
    # tokens absent from the prompt: log of the smallest normal number, not -inf (finite gradients)
    return mix(vocab_lp, copied.clamp_min(torch.finfo(copied.dtype).tiny).log(), p.gate[..., None])
