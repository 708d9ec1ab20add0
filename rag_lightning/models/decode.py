"""Batched RAG decoding with K retrieved passages per question, for seq2seq and decoder-only generators.

Inputs: ``src_ids`` / ``src_mask`` (B*K, S), rows ``b*K .. b*K+K-1`` are question b joined with each of
its K passages; ``doc_scores`` (B, K) unnormalized, p(z|x) = softmax_K(doc_scores). The model-specific part
sits behind a small adapter (``Seq2SeqSteps``, ``CausalSteps``): run the sources once, step the decoder one
token with ``past_key_values`` (a transformers ``Cache``), re-order cache rows. Seq2seq: any
``AutoModelForSeq2SeqLM`` (BART, T5) or ``EncoderDecoderModel``; the encoder runs once on the B*K rows and
each answer starts from the decoder start token. Decoder-only: a ``models.causal.CausalGenerator``; its
left-padded prompts run once (bidirectionally in prefix-LM mode), the answer continues each prompt with the
KV cache. Call under ``model.eval()`` (dropout is not switched off here).
Step 0 of a beam search runs one beam per problem and then expands the cache; beam re-ordering leaves the
cross-attention cache alone (a beam never changes its source row); finished problems leave the batch.

Lengths count GENERATED tokens (the decoder start token excluded, EOS included), like HF's
``max_new_tokens`` / ``min_new_tokens``: at most ``max_length`` tokens; EOS is forbidden while fewer than
``min_length`` tokens have been generated. ``no_repeat_ngram_size`` n > 0: a token that would repeat an n-gram
of the hypothesis's generated tokens gets probability 0 (as HF's ``no_repeat_ngram_size``, except that a
causal prompt's n-grams are not banned); under RAG-Sequence per (passage, beam) hypothesis. Outputs are (B, L) without the decoder start token, padded
with ``pad_token_id`` after EOS, L = the longest returned sequence.

Beam search (num_beams N > 1), per problem: N running hypotheses (only one live at step 0). At each step
the 2N best continuations of all running beams are ranked by their summed log-probability; an EOS
continuation among the first N ranks becomes a finished hypothesis with score sum_logprob / len**
length_penalty (HF convention, len = generated tokens incl. EOS); the N best non-EOS continuations keep
running. At ``max_length`` every continuation finishes. A problem stops once it holds N finished
hypotheses and no running one can still beat the worst of them (exact bound, as HF
``early_stopping="never"``). num_beams == 1 is plain greedy decoding (stop at EOS).

* RAG-Token: beam search over the marginal next-token log-prob log sum_z p(z|x) p(y_t|x,z,y<t); the
  decoder keeps one state per (question, beam, passage): B*N*K rows.
* RAG-Sequence: beam search under each passage separately (B*K problems, batched), giving up to K*N
  candidates per question (duplicates removed). ``fast``: p(y|x,z) is taken as 0 for passages whose beam
  search did not produce y, so the beams' raw (un-penalized) sum log-probs suffice. ``thorough``: every
  candidate is scored under every passage by teacher forcing, log p(y|x) = log sum_z p(z|x) p(y|x,z),
  decoding each question's candidates as a prefix trie (each shared prefix once), with an exact branch
  and bound (``prune=True``): the fast score is a lower bound, a prefix's probability bounds its
  continuations', and a candidate that cannot reach the best lower bound stops being scored. The candidate
  with the highest log p(y|x) is returned.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutput

from rag_lightning.models.causal import CausalGenerator

__all__ = [
    "rag_token_generate", "rag_sequence_generate", "ban_repeated_ngrams", "CausalSteps", "Seq2SeqSteps",
]  # fmt: skip

_PRUNE_MARGIN = 1e-3  # nats of slack for round-off between beam-search and teacher-forced log-probs
_SCORE_ROWS = 2048  # max decoder rows (trie node x passage) per scoring group in RAG-Sequence "thorough"
NEG_INF = float("-inf")


# ---------------------------------------------------------------- model adapters
# ``first(rows)`` gives the logits of the first answer token for cache rows whose source rows are ``rows``
# (R,) (None: all B*K source rows in order) and a fresh cache; ``next(tokens, rows, past, t)`` feeds answer
# token t-1 (tokens (R,)) and gives the logits of token t; ``reorder(past, idx, same_source)`` selects cache
# rows ``idx``, ``same_source`` when every row keeps its source row (beams of one problem). Logits (R, V)
# float32. ``rows`` changes identity only when it changes value, so adapters re-select per-row inputs then.


def _reorder(past, idx: Tensor, cross: bool = True):
    """Select cache rows ``idx``. ``cross=False`` keeps the cross-attention cache as it is: valid when every
    row is mapped to a row over the same encoder row (beams of one problem), and it saves copying
    (R, heads, S, head_dim) per layer at every step."""
    if not cross and hasattr(past, "self_attention_cache"):
        past.self_attention_cache.reorder_cache(idx)
        return past
    if hasattr(past, "reorder_cache"):
        past.reorder_cache(idx)
        return past
    keep = 4 if cross else 2  # legacy tuple cache: (self k, self v, cross k, cross v) per layer
    return tuple(tuple(t.index_select(0, idx) if i < keep else t for i, t in enumerate(ly)) for ly in past)


class Seq2SeqSteps:
    """Encoder once on the B*K sources, then the decoder one token at a time from ``start``."""

    def __init__(self, model, src_ids: Tensor, src_mask: Tensor, start: int):
        if start is None:
            raise ValueError("seq2seq decoding needs decoder_start_token_id")
        self.model, self.start = model, start
        out = model.get_encoder()(input_ids=src_ids, attention_mask=src_mask, return_dict=True)
        self.enc_h, self.enc_mask = out.last_hidden_state, src_mask  # (B*K, S, H), (B*K, S)
        self.dtype = self.enc_h.dtype
        self._rows: Tensor | None = None
        self._h, self._m = self.enc_h, self.enc_mask  # encoder states of the current cache rows

    def _select(self, rows: Tensor | None) -> None:
        if rows is not self._rows:
            self._rows = rows
            self._h = self.enc_h if rows is None else self.enc_h.index_select(0, rows)
            self._m = self.enc_mask if rows is None else self.enc_mask.index_select(0, rows)

    def _decode(self, tokens: Tensor, past) -> tuple[Tensor, Any]:
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self._h),
            attention_mask=self._m,
            decoder_input_ids=tokens[:, None],
            past_key_values=past,
            use_cache=True,
            return_dict=True,
        )
        return out.logits[:, -1].float(), out.past_key_values

    def first(self, rows: Tensor | None) -> tuple[Tensor, Any]:
        self._select(rows)
        return self._decode(torch.full((self._m.shape[0],), self.start, device=self._m.device), None)

    def next(self, tokens: Tensor, rows: Tensor | None, past, t: int) -> tuple[Tensor, Any]:
        self._select(rows)
        return self._decode(tokens, past)

    def reorder(self, past, idx: Tensor, same_source: bool):
        return _reorder(past, idx, cross=not same_source)


class CausalSteps:
    """Decoder-only: the B*K prompts run once; answers continue them with the KV cache. ``keep_prompt``: keep
    the prompts' logits and cache for later ``first`` calls (RAG-Sequence thorough scoring) instead of
    running them again (memory: one prompt cache, (B*K, S) per layer)."""

    def __init__(
        self, generator: CausalGenerator, src_ids: Tensor, src_mask: Tensor, keep_prompt: bool = False
    ):
        self.g, self.src_ids, self.src_mask, self.keep_prompt = generator, src_ids, src_mask, keep_prompt
        self.dtype = generator.model.dtype
        self.prompt_len = src_mask.sum(1)  # (B*K,) real prompt tokens: the first answer token's position
        self._prompt: tuple[Tensor, list[tuple[Tensor, Tensor]]] | None = None  # logits (B*K, V), (k, v)s
        self._rows: Tensor | None = None
        self._mask, self._pos = src_mask, self.prompt_len  # of the current cache rows

    def first(self, rows: Tensor | None) -> tuple[Tensor, Any]:
        if self._prompt is not None:
            logits, kv, memory = self._prompt  # a cache never changes these tensors in place
        elif rows is None or self.keep_prompt:
            logits, cache = self.g.prompt_step(self.src_ids, self.src_mask)
            kv = [(k, v) for k, v, *_ in cache]
            if not self.keep_prompt:
                return logits, cache
            memory = getattr(cache, "pointer_memory", None)  # the copy head's prompt keys (causal.py)
            self._prompt = logits, kv, memory
        else:
            return self.g.prompt_step(self.src_ids[rows], self.src_mask[rows])
        cache = DynamicCache(ddp_cache_data=kv, config=self.g.model.config)
        if memory is not None:
            cache.pointer_memory = memory
        if rows is not None:  # selects new tensors: the kept prompt's stay as they are
            logits, cache = logits[rows], self.g.reorder_cache(cache, rows)
        return logits, cache

    def next(self, tokens: Tensor, rows: Tensor | None, past, t: int) -> tuple[Tensor, Any]:
        if rows is not self._rows:
            self._rows = rows
            self._mask = self.src_mask if rows is None else self.src_mask.index_select(0, rows)
            self._pos = self.prompt_len if rows is None else self.prompt_len.index_select(0, rows)
        mask = torch.cat([self._mask, self._mask.new_ones(len(tokens), t)], 1)  # (R, S + t): prompt, answer
        return self.g.answer_step(tokens, mask, self._pos + (t - 1), past)

    def reorder(self, past, idx: Tensor, same_source: bool):
        return self.g.reorder_cache(past, idx)


def _steps(
    model, src_ids: Tensor, src_mask: Tensor, start: int | None, keep_prompt: bool = False
) -> Seq2SeqSteps | CausalSteps:
    """The adapter for ``model``: a ``CausalGenerator``, or a Hugging Face seq2seq model."""
    if isinstance(model, CausalGenerator):
        return CausalSteps(model, src_ids, src_mask, keep_prompt)
    return Seq2SeqSteps(model, src_ids, src_mask, start)


def _marginal(logits: Tensor, doc_lp: Tensor) -> Tensor:
    """log sum_z p(z|x) p(y_t|x,z,y<t): logits (P, N, D, V), doc_lp (P, D) -> (P, N, V).

    D > 1 is summed in probability space (one softmax and one batched matrix-vector product instead of a
    multi-pass logsumexp); a token whose probability underflows float32 under every passage gets -inf.
    """
    n_problems, n_beams, n_docs, vocab = logits.shape
    if n_docs == 1:  # p(z|x) = 1
        return torch.log_softmax(logits[:, :, 0], dim=-1)
    probs = torch.softmax(logits, dim=-1).view(n_problems * n_beams, n_docs, vocab)
    doc_p = doc_lp.exp()[:, None, None, :].expand(n_problems, n_beams, 1, n_docs)
    return (
        torch.bmm(doc_p.reshape(n_problems * n_beams, 1, n_docs), probs)
        .view(n_problems, n_beams, vocab)
        .log_()
    )


# ---------------------------------------------------------------- search
@dataclass
class Hypotheses:
    """Search state of A problems, N beams each, after t steps (max_length L). Finished hypotheses are kept
    best first; -inf scores mark empty slots."""

    problem: Tensor  # (A,) problem ids
    doc_lp: Tensor  # (A, D) log p(z|x) of each problem's passages
    seqs: Tensor  # (A, N, t) running hypotheses
    scores: Tensor  # (A, N) their summed log-probs
    done_seqs: Tensor  # (A, N, L) finished hypotheses, pad-filled
    done_scores: Tensor  # (A, N) length-penalized scores
    done_logprob: Tensor  # (A, N) summed log-probs
    done_len: Tensor  # (A, N) generated tokens, EOS included

    @classmethod
    def start(cls, doc_lp: Tensor, n: int, max_length: int, pad: int) -> Hypotheses:
        p, dev = doc_lp.shape[0], doc_lp.device
        scores = torch.zeros(p, n, device=dev)
        scores[:, 1:] = NEG_INF  # identical beams at start: only one live
        return cls(
            problem=torch.arange(p, device=dev),
            doc_lp=doc_lp,
            seqs=torch.empty(p, n, 0, dtype=torch.long, device=dev),
            scores=scores,
            done_seqs=torch.full((p, n, max_length), pad, dtype=torch.long, device=dev),
            done_scores=torch.full((p, n), NEG_INF, device=dev),
            done_logprob=torch.full(
                (p, n), 0.0 if n == 1 else NEG_INF, device=dev
            ),  # greedy accumulates here
            done_len=torch.zeros(p, n, dtype=torch.long, device=dev),
        )

    def select(self, idx: Tensor) -> Hypotheses:
        return Hypotheses(*(getattr(self, f.name)[idx] for f in fields(self)))


@dataclass
class Decoded:
    """Search result per problem: N hypotheses best first (-inf scores: empty slots)."""

    seqs: Tensor  # (P, N, L) pad-filled
    logprob: Tensor  # (P, N) summed log-probs (raw)
    lengths: Tensor  # (P, N) generated tokens, EOS included
    scores: Tensor  # (P, N) length-penalized

    def write(self, h: Hypotheses) -> None:
        """Store the finished hypotheses of the problems in ``h``."""
        self.seqs[h.problem], self.logprob[h.problem] = h.done_seqs, h.done_logprob
        self.lengths[h.problem], self.scores[h.problem] = h.done_len, h.done_scores


def _greedy_update(h: Hypotheses, lp: Tensor, t: int, last: bool, eos: int, length_penalty: float):
    """One greedy step: lp (A, 1, V) -> (state, source beam (A, 1), problem done (A,))."""
    tok_lp, tok = lp[:, 0].max(-1)  # (A,)
    h.seqs = torch.cat([h.seqs, tok[:, None, None]], -1)  # (A, 1, t+1)
    h.done_logprob, h.done_len = h.done_logprob + tok_lp[:, None], h.done_len + 1
    h.done_seqs[:, :, : t + 1] = h.seqs
    h.done_scores = h.done_logprob / h.done_len.clamp(min=1) ** length_penalty
    done = torch.ones_like(tok, dtype=torch.bool) if last else tok == eos
    return h, torch.zeros_like(tok)[:, None], done


def _beam_update(
    h: Hypotheses, lp: Tensor, t: int, last: bool, eos: int, pad: int, max_length: int, length_penalty: float
):
    """One beam-search step: lp (A, 1 or N, V) -> (state, source beam (A, N), problem done (A,))."""
    n_active, n, _ = h.done_seqs.shape
    vocab = lp.shape[-1]
    top_scores, top_idx = (h.scores[..., None] + lp).view(n_active, n * vocab).topk(2 * n, dim=1)  # (A, 2N)
    beam, tok = top_idx // vocab, top_idx % vocab
    seqs = torch.cat(
        [h.seqs.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], -1
    )  # (A, 2N, t+1)
    # finished continuations: EOS (or the last step) among the first N ranks (as HF)
    ends = torch.ones_like(tok, dtype=torch.bool) if last else tok == eos  # (A, 2N)
    rank_ok = torch.arange(2 * n, device=tok.device) < n
    finishing = ends & rank_ok & torch.isfinite(top_scores)
    penalized = (top_scores / float(t + 1) ** length_penalty).masked_fill(~finishing, NEG_INF)
    h.done_scores, best = torch.cat([h.done_scores, penalized], 1).topk(n, dim=1)  # best N of (A, 3N)
    padded = torch.nn.functional.pad(seqs, (0, max_length - t - 1), value=pad)  # (A, 2N, L)
    h.done_seqs = torch.cat([h.done_seqs, padded], 1).gather(1, best[..., None].expand(-1, -1, max_length))
    h.done_logprob = torch.cat([h.done_logprob, top_scores], 1).gather(1, best)
    h.done_len = torch.cat([h.done_len, torch.full_like(tok, t + 1)], 1).gather(1, best)
    # running: the N best continuations that did not end
    h.scores, keep = top_scores.masked_fill(ends, NEG_INF).topk(n, dim=1)  # (A, N)
    h.seqs = seqs.gather(1, keep[..., None].expand(-1, -1, t + 1))
    # done once N are finished and no running beam can beat the worst of them, even at its best length
    denom = float(max_length if length_penalty > 0 else t + 2) ** length_penalty
    full = torch.isfinite(h.done_scores).all(1)
    done = (full & (h.scores[:, 0] / denom <= h.done_scores[:, -1])) | last
    return h, beam.gather(1, keep), done


def ban_repeated_ngrams(lp: Tensor, seqs: Tensor, size: int) -> None:
    """In place: log-prob -inf for every next token that would repeat an n-gram (n = ``size``) of its own
    hypothesis. lp (A, N', V) next-token log-probs of the first N' beams; seqs (A, N, t) the generated
    tokens so far (decoder start token and prompt excluded)."""
    t = seqs.shape[-1]
    if size <= 0 or t < size:  # no complete n-gram yet
        return
    seqs = seqs[:, : lp.shape[1]]  # (A, N', t)
    windows = seqs.unfold(-1, size, 1)  # (A, N', t - size + 1, size): every n-gram so far
    prefix = seqs[..., t - size + 1 :]  # (A, N', size - 1): the n-gram the next token would complete
    match = (windows[..., :-1] == prefix[..., None, :]).all(-1)  # (A, N', W)
    a, beam, w = match.nonzero(as_tuple=True)
    lp[a, beam, windows[a, beam, w, -1]] = NEG_INF


def _search(
    steps,
    doc_lp: Tensor,
    num_beams: int,
    max_length: int,
    min_length: int,
    length_penalty: float,
    eos: int,
    pad: int,
    no_repeat_ngram_size: int = 0,
) -> Decoded:
    """Decode P problems, each marginalizing over D passages (source rows p*D + d; doc_lp (P, D) log p(z|x)).

    Cache row (a, n, d) holds beam n of active problem a under passage d. Returns N hypotheses per problem.
    """
    n_problems, n_docs = doc_lp.shape
    n = num_beams
    dev = doc_lp.device
    out = Decoded(
        seqs=torch.full((n_problems, n, max_length), pad, dtype=torch.long, device=dev),
        logprob=torch.full((n_problems, n), NEG_INF, device=dev),
        lengths=torch.zeros(n_problems, n, dtype=torch.long, device=dev),
        scores=torch.full((n_problems, n), NEG_INF, device=dev),
    )
    h = Hypotheses.start(doc_lp, n, max_length, pad)
    doc_ids = torch.arange(n_docs, device=dev)
    # step 0 runs one beam per problem (all beams are identical then): cache rows = the source rows
    cache_beams, rows = 1, None  # beams per problem in the cache; source row of each cache row (None: all)
    logits, past = steps.first(rows)  # (P*D, V)
    for t in range(max_length):  # logits (A*cache_beams*D, V) of token t
        n_active = len(h.problem)
        lp = _marginal(logits.view(n_active, cache_beams, n_docs, -1), h.doc_lp)  # (A, cache_beams, V)
        if t < min_length:
            lp[..., eos] = NEG_INF
        ban_repeated_ngrams(lp, h.seqs, no_repeat_ngram_size)
        last = t == max_length - 1
        if n == 1:
            h, src_beam, done = _greedy_update(h, lp, t, last, eos, length_penalty)
        else:
            h, src_beam, done = _beam_update(h, lp, t, last, eos, pad, max_length, length_penalty)
        compacted = bool(done.any())
        if compacted:  # write finished problems out and drop them from the batch
            out.write(h.select(done.nonzero().squeeze(1)))
            keep = (~done).nonzero().squeeze(1)  # (A',)
            if len(keep) == 0:
                break
            h, src_beam = h.select(keep), src_beam[keep]
        else:
            keep = torch.arange(n_active, device=dev)
        new_source = cache_beams < n or compacted  # some cache row changes its source row
        if n > 1 or compacted:  # cache row (a, n, d) <- old row (keep[a], src_beam[a, n], d)
            cache_rows = ((keep[:, None] * cache_beams + src_beam)[..., None] * n_docs + doc_ids).reshape(-1)
            past = steps.reorder(past, cache_rows, same_source=not new_source)
        if new_source:  # cache row (a, n, d) -> source row problem[a]*D + d
            rows = (h.problem[:, None, None] * n_docs + doc_ids).expand(-1, n, -1).reshape(-1)
            cache_beams = n
        tokens = h.seqs[..., -1, None].expand(-1, -1, n_docs).reshape(-1)  # (A*N*D,)
        logits, past = steps.next(tokens, rows, past, t + 1)  # (at the last step every problem is done)
    return out


def _trim(seqs: Tensor, lengths: Tensor) -> Tensor:
    return seqs[:, : max(int(lengths.max()), 1)]


def _check(src_ids: Tensor, src_mask: Tensor, doc_scores: Tensor, num_beams: int, max_length: int) -> None:
    b, k = doc_scores.shape
    if src_ids.shape[0] != b * k or src_mask.shape != src_ids.shape:
        raise ValueError(
            f"src_ids {tuple(src_ids.shape)} / src_mask {tuple(src_mask.shape)} need B*K={b * k} rows "
            f"for doc_scores {tuple(doc_scores.shape)}"
        )
    if num_beams < 1 or max_length < 1:
        raise ValueError(f"num_beams and max_length must be >= 1, got {num_beams}, {max_length}")


@torch.no_grad()
def rag_token_generate(
    model,
    src_ids: Tensor,
    src_mask: Tensor,
    doc_scores: Tensor,
    *,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 0,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    decoder_start_token_id: int | None = None,
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor:
    """RAG-Token decoding: beam search over log sum_z p(z|x) p(y_t|x,z,y<t). Returns (B, L) ids.

    ``model``: a Hugging Face seq2seq model (needs ``decoder_start_token_id``) or a ``CausalGenerator``."""
    _check(src_ids, src_mask, doc_scores, num_beams, max_length)
    steps = _steps(model, src_ids, src_mask, decoder_start_token_id)
    doc_lp = torch.log_softmax(doc_scores.float(), dim=-1)  # (B, K)
    out = _search(
        steps, doc_lp, num_beams, max_length, min_length, length_penalty, eos_token_id, pad_token_id,
        no_repeat_ngram_size,
    )  # fmt: skip
    return _trim(out.seqs[:, 0], out.lengths[:, 0])


def _lex_order(q: Tensor, seqs: Tensor) -> Tensor:
    """Permutation sorting rows by question ``q`` (R,), then lexicographically by ``seqs`` (R, L)."""
    order = torch.arange(len(q), device=q.device)
    for col in reversed(range(seqs.shape[1])):  # LSD radix sort: stable sorts from the last column
        order = order[torch.sort(seqs[order, col], stable=True).indices]
    return order[torch.sort(q[order], stable=True).indices]


def _trie_logprob(
    steps, q: Tensor, seqs: Tensor, lens: Tensor, k: int,
    doc_lp: Tensor | None = None, floor: Tensor | None = None, exact: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``_forced_logprob`` for rows sorted by ``_lex_order``: (G, K).

    Once sorted, rows sharing the prefix y[:t] are adjacent, so the trie nodes at depth t (over the rows with
    lens > t) are the runs of equal prefixes and their ids a cumsum. Step t runs the decoder on the
    (node, passage) rows, its cache re-ordered from each node's parent at depth t - 1.
    """
    g = len(q)
    dev = q.device
    doc_ids = torch.arange(k, device=dev)
    score = torch.zeros(g, k, device=dev)
    node = torch.full((g,), -1, dtype=torch.long, device=dev)  # each row's trie node at the current depth
    live = torch.ones(g, dtype=torch.bool, device=dev)  # not pruned
    past, prev_node, prev_q, src_rows = None, None, None, None
    for t in range(int(lens.max())):
        if floor is not None:  # upper bound of log p(y|x): known exact terms, else the prefix's log-prob
            ub = torch.logsumexp(doc_lp + torch.where(exact > NEG_INF, exact, score), -1)  # (G,)
            live &= ub >= floor
        rows = ((lens > t) & live).nonzero().squeeze(1)  # (A,) rows still to score at depth t
        if len(rows) == 0:
            break
        below, above = rows[1:], rows[:-1]
        same = (q[below] == q[above]) & (seqs[below, :t] == seqs[above, :t]).all(1)  # same prefix y[:t]
        head = torch.cat([same.new_ones(1), ~same])  # (A,) first row of each depth-t node
        node = node.clone()
        node[rows] = torch.cumsum(head.long(), 0) - 1
        first = rows[head]  # (n_t,)
        node_q = q[first]  # (n_t,) each node's question, ascending
        moved = prev_q is None or not torch.equal(node_q, prev_q)  # did a node row change its source row?
        if moved:
            src_rows = (node_q[:, None] * k + doc_ids).reshape(-1)  # (n_t*K,) row (node, z) -> q*K + z
        if t == 0:
            logits, past = steps.first(src_rows)  # (n_t*K, V)
        else:
            parent = (prev_node[first, None] * k + doc_ids).reshape(-1)
            past = steps.reorder(past, parent, same_source=not moved)  # a parent has the same (q, passage)
            logits, past = steps.next(seqs[first, t - 1].repeat_interleave(k), src_rows, past, t)
        lp = torch.log_softmax(logits, -1).view(len(first), k, -1)  # (n_t, K, V)
        score[rows] += lp[node[rows], :, seqs[rows, t]]  # (A, K) log p(y_t | x, z, y<t)
        prev_node, prev_q = node, node_q
    return score.masked_fill(~live[:, None], NEG_INF)


def _forced_logprob(
    steps, q: Tensor, seqs: Tensor, lens: Tensor, k: int,
    doc_lp: Tensor | None = None, floor: Tensor | None = None, exact: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Teacher-forced log p(y_u|x,z) = sum_t log p(y_t|x,z,y<t) of candidate u (first ``lens[u]`` tokens of
    ``seqs[u]``, question ``q[u]``) under each of its question's K passages (source rows q*K + z): (U, K).

    Candidates of one question are decoded as a prefix trie (a shared prefix is decoded once, with the KV
    cache), in groups of whole questions of at most ``_SCORE_ROWS`` decoder rows.
    Branch and bound, with ``doc_lp`` (U, K) log p(z|x), ``floor`` (U,) and ``exact`` (U, K) the already known
    log p(y|x,z) (-inf where unknown): a candidate is dropped (its row returned as -inf) as soon as
    logsumexp_z(doc_lp + (exact where known, else log p(y_<t|x,z))), an upper bound of its log p(y|x) since
    a prefix is at least as likely as any continuation, falls below its floor.
    """
    order = _lex_order(q, seqs)
    q, seqs, lens = q[order], seqs[order], lens[order]
    if floor is not None:
        doc_lp, floor, exact = doc_lp[order], floor[order], exact[order]
    counts = torch.unique_consecutive(q, return_counts=True)[1].tolist()
    parts, start, n_rows = [], 0, 0
    for i, c in enumerate(counts):  # close a group before it exceeds the row budget
        n_rows += c * k
        if i + 1 == len(counts) or n_rows + counts[i + 1] * k > _SCORE_ROWS:
            end = start + n_rows // k
            bound = (doc_lp[start:end], floor[start:end], exact[start:end]) if floor is not None else ()
            parts.append(_trie_logprob(steps, q[start:end], seqs[start:end], lens[start:end], k, *bound))
            start, n_rows = end, 0
    out = torch.empty(len(q), k, device=q.device)
    out[order] = torch.cat(parts) if parts else out
    return out


@torch.no_grad()
def rag_sequence_generate(
    model,
    src_ids: Tensor,
    src_mask: Tensor,
    doc_scores: Tensor,
    *,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 0,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    decoder_start_token_id: int | None = None,
    eos_token_id: int,
    pad_token_id: int,
    mode: str = "thorough",
    prune: bool = True,
) -> Tensor:
    """RAG-Sequence decoding (``mode`` "thorough" | "fast", see module doc). Returns (B, L) ids.

    ``model`` as for ``rag_token_generate``. ``prune``: thorough mode's exact branch and bound (False scores
    every candidate fully; the same answer, slower)."""
    if mode not in ("thorough", "fast"):
        raise ValueError(f"mode must be 'thorough' or 'fast', got {mode!r}")
    _check(src_ids, src_mask, doc_scores, num_beams, max_length)
    b, k = doc_scores.shape
    n = num_beams
    dev = doc_scores.device
    steps = _steps(model, src_ids, src_mask, decoder_start_token_id, keep_prompt=mode == "thorough")
    doc_lp = torch.log_softmax(doc_scores.float(), dim=-1)  # (B, K)
    one_doc = torch.zeros(b * k, 1, device=dev)  # each (question, passage) is a problem of its own
    out = _search(
        steps, one_doc, n, max_length, min_length, length_penalty, eos_token_id, pad_token_id,
        no_repeat_ngram_size,
    )  # fmt: skip
    c = k * n  # candidates per question, candidate j came from passage j // N
    cand, logprob, lens = out.seqs.view(b, c, max_length), out.logprob.view(b, c), out.lengths.view(b, c)
    valid = torch.isfinite(logprob)  # (B, C)
    same = (cand[:, :, None, :] == cand[:, None, :, :]).all(-1) & valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones(c, c, dtype=torch.bool, device=dev).tril(-1)  # j < i
    first = valid & ~(same & earlier).any(-1)  # (B, C) unique candidates
    # exact[b, i, z] = log p(y_i|x,z) where passage z's beam search produced candidate i, else -inf
    exact = logprob[:, None, :].masked_fill(~same, NEG_INF).view(b, c, k, n).amax(-1)  # (B, C, K)
    score = torch.logsumexp(doc_lp[:, None, :] + exact, dim=-1)  # (B, C) fast: unseen p(y|x,z) taken as 0
    if mode == "thorough":
        # the fast score drops the passages that did not generate y: a lower bound of the thorough score,
        # so the best one is a floor below which no candidate can win (margin: float round-off)
        margin = _PRUNE_MARGIN if steps.dtype == torch.float32 else 100 * _PRUNE_MARGIN
        floor = score.masked_fill(~first, NEG_INF).amax(-1) - margin  # (B,)
        qb, qc = first.nonzero(as_tuple=True)  # (U,) unique candidates
        seq_lp = _forced_logprob(  # (U, K)
            steps, qb, cand[qb, qc], lens[qb, qc], k,
            doc_lp=doc_lp[qb], floor=floor[qb] if prune else None, exact=exact[qb, qc],
        )  # fmt: skip
        score = torch.full((b, c), NEG_INF, device=dev)
        score[qb, qc] = torch.logsumexp(doc_lp[qb] + seq_lp, dim=-1)
    best = score.masked_fill(~first, NEG_INF).argmax(-1)  # (B,)
    ar = torch.arange(b, device=dev)
    return _trim(cand[ar, best], lens[ar, best])
