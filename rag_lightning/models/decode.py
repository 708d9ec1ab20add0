"""Batched RAG decoding over a Hugging Face seq2seq model with K retrieved passages per question.

Inputs: ``src_ids`` / ``src_mask`` (B*K, S), rows ``b*K .. b*K+K-1`` are question b joined with each of
its K passages; ``doc_scores`` (B, K) unnormalized, p(z|x) = softmax_K(doc_scores). The encoder runs once
on the B*K rows; the decoder is stepped with ``past_key_values`` (a transformers ``Cache``; beams are
re-ordered with ``reorder_cache``). Works for ``AutoModelForSeq2SeqLM`` (BART, T5) and
``EncoderDecoderModel``. Call under ``model.eval()`` (dropout is not switched off here).
Step 0 of a beam search runs one beam per problem and then expands the cache; beam re-ordering leaves the
cross-attention cache alone (a beam never changes its encoder row); finished problems leave the batch.

Lengths count GENERATED tokens (the decoder start token excluded, EOS included), like HF's
``max_new_tokens`` / ``min_new_tokens``: at most ``max_length`` tokens; EOS is forbidden while fewer than
``min_length`` tokens have been generated. Outputs are (B, L) without the decoder start token, padded
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
  and bound: the fast score is a lower bound, a prefix's probability bounds its continuations', and a
  candidate that cannot reach the best lower bound stops being scored. The candidate with the highest
  log p(y|x) is returned.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["rag_token_generate", "rag_sequence_generate"]

_PRUNE = True  # RAG-Sequence "thorough": drop candidates that provably cannot win (exact; for tests)
_PRUNE_MARGIN = 1e-3  # nats of slack for round-off between beam-search and teacher-forced log-probs
_SCORE_ROWS = 2048  # max decoder rows (trie node x passage) per scoring group in RAG-Sequence "thorough"


def _encode(model, src_ids: Tensor, src_mask: Tensor) -> Tensor:
    out = model.get_encoder()(input_ids=src_ids, attention_mask=src_mask, return_dict=True)
    return out.last_hidden_state  # (B*K, S, H)


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


def _step(model, enc_h: Tensor, enc_mask: Tensor, tokens: Tensor, past):
    """One decoder step for R rows: tokens (R,) -> next-token logits (R, V) float32, new cache."""
    out = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc_h),
        attention_mask=enc_mask,
        decoder_input_ids=tokens[:, None],
        past_key_values=past,
        use_cache=True,
        return_dict=True,
    )
    return out.logits[:, -1].float(), out.past_key_values


def _marginal(logits: Tensor, doc_lp: Tensor) -> Tensor:
    """log sum_z p(z|x) p(y_t|x,z,y<t): logits (P, N, D, V), doc_lp (P, D) -> (P, N, V).

    D > 1 is summed in probability space (one softmax and one batched matrix-vector product instead of a
    multi-pass logsumexp); a token whose probability underflows float32 under every passage gets -inf.
    """
    p_, n, d_, v = logits.shape
    if d_ == 1:  # p(z|x) = 1
        return torch.log_softmax(logits[:, :, 0], dim=-1)
    probs = torch.softmax(logits, dim=-1).view(p_ * n, d_, v)
    w = doc_lp.exp()[:, None, None, :].expand(p_, n, 1, d_).reshape(p_ * n, 1, d_)
    return torch.bmm(w, probs).view(p_, n, v).log_()


def _search(
    model,
    enc_h: Tensor,
    enc_mask: Tensor,
    doc_lp: Tensor,
    num_beams: int,
    max_length: int,
    min_length: int,
    length_penalty: float,
    start: int,
    eos: int,
    pad: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode P problems, each marginalizing over D passages (encoder rows p*D + d; doc_lp (P, D) log p(z|x)).

    Returns seqs (P, N, max_length) pad-filled, raw sum log-probs (P, N), lengths (P, N) and
    length-penalized scores (P, N), sorted best first; -inf scores mark empty slots.
    """
    p_, d_ = doc_lp.shape
    n = num_beams
    dev = doc_lp.device
    ninf = float("-inf")
    out_seqs = torch.full((p_, n, max_length), pad, dtype=torch.long, device=dev)
    out_raw = torch.full((p_, n), ninf, device=dev)
    out_len = torch.zeros(p_, n, dtype=torch.long, device=dev)
    out_scores = torch.full((p_, n), ninf, device=dev)
    # state of the A active problems (finished ones are written to out_* and dropped from the batch)
    pid = torch.arange(p_, device=dev)  # (A,) problem ids
    dlp = doc_lp  # (A, D)
    run_seqs = torch.empty(p_, n, 0, dtype=torch.long, device=dev)  # (A, N, t)
    run_scores = torch.zeros(p_, n, device=dev)
    run_scores[:, 1:] = ninf  # identical beams at start: only one live
    fin_seqs = torch.full((p_, n, max_length), pad, dtype=torch.long, device=dev)
    fin_scores = torch.full((p_, n), ninf, device=dev)
    fin_raw = torch.full((p_, n), 0.0 if n == 1 else ninf, device=dev)  # greedy accumulates here
    fin_len = torch.zeros(p_, n, dtype=torch.long, device=dev)
    rank_ok = torch.arange(2 * n, device=dev) < n  # only the top-N ranks may finish (as HF)
    ar_d = torch.arange(d_, device=dev)
    # step 0 runs one beam per problem (all beams are identical then): rows (p, d) = the encoder rows
    h, m, w, past = enc_h, enc_mask, 1, None  # w: beams per problem in the cache
    tokens = torch.full((p_ * d_,), start, dtype=torch.long, device=dev)

    for t in range(max_length):
        a_ = len(pid)
        logits, past = _step(model, h, m, tokens, past)  # (A*w*D, V)
        v = logits.shape[-1]
        lp = _marginal(logits.view(a_, w, d_, v), dlp)  # (A, w, V), broadcast over beams at step 0
        if t < min_length:
            lp[..., eos] = ninf
        last = t == max_length - 1
        if n == 1:  # greedy
            tok_lp, tok = lp[:, 0].max(-1)  # (A,)
            run_seqs = torch.cat([run_seqs, tok[:, None, None]], -1)
            fin_raw, fin_len = fin_raw + tok_lp[:, None], fin_len + 1
            fin_seqs[:, :, : t + 1] = run_seqs
            fin_scores = fin_raw / fin_len.clamp(min=1) ** length_penalty
            src_beam = torch.zeros(a_, 1, dtype=torch.long, device=dev)
            done = torch.ones_like(tok, dtype=torch.bool) if last else tok == eos  # (A,)
        else:
            top_s, top_i = (run_scores[..., None] + lp).view(a_, n * v).topk(2 * n, dim=1)  # (A, 2N)
            beam, tok = top_i // v, top_i % v
            seqs = torch.cat([run_seqs.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], -1)
            is_fin = torch.ones_like(tok, dtype=torch.bool) if last else tok == eos  # (A, 2N)
            fin_now = is_fin & rank_ok & torch.isfinite(top_s)
            pen = (top_s / float(t + 1) ** length_penalty).masked_fill(~fin_now, ninf)
            fin_scores, sel = torch.cat([fin_scores, pen], 1).topk(n, dim=1)  # best N of (A, 3N)
            padded = torch.nn.functional.pad(seqs, (0, max_length - t - 1), value=pad)
            fin_seqs = torch.cat([fin_seqs, padded], 1).gather(1, sel[..., None].expand(-1, -1, max_length))
            fin_raw = torch.cat([fin_raw, top_s], 1).gather(1, sel)
            fin_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1).gather(1, sel)
            run_scores, keep = top_s.masked_fill(is_fin, ninf).topk(n, dim=1)  # (A, N)
            run_seqs = seqs.gather(1, keep[..., None].expand(-1, -1, t + 1))
            src_beam = beam.gather(1, keep)  # (A, N)
            denom = float(max_length if length_penalty > 0 else t + 2) ** length_penalty
            full = torch.isfinite(fin_scores).all(1)
            done = full & (run_scores[:, 0] / denom <= fin_scores[:, -1])  # no running beam can enter
            done = done | last
        moved = bool(done.any())
        if moved:  # write finished problems out and drop them from the batch
            f = done.nonzero().squeeze(1)
            out_seqs[pid[f]], out_raw[pid[f]] = fin_seqs[f], fin_raw[f]
            out_len[pid[f]], out_scores[pid[f]] = fin_len[f], fin_scores[f]
            k_ = (~done).nonzero().squeeze(1)
            if len(k_) == 0:
                break
            pid, dlp, run_seqs, run_scores, src_beam = (
                pid[k_],
                dlp[k_],
                run_seqs[k_],
                run_scores[k_],
                src_beam[k_],
            )
            fin_seqs, fin_scores, fin_raw, fin_len = fin_seqs[k_], fin_scores[k_], fin_raw[k_], fin_len[k_]
        else:
            k_ = torch.arange(a_, device=dev)
        if n > 1 or moved:  # cache row (a, n, d) <- old row (a_old, src_beam, d)
            rows = (k_[:, None] * w + src_beam)[..., None] * d_ + ar_d  # (A, N, D)
            past = _reorder(past, rows.reshape(-1), cross=w < n or moved)  # else rows keep their encoder row
        if w < n or moved:  # row (a, n, d) -> encoder row pid[a]*D + d
            enc_idx = (pid[:, None, None] * d_ + ar_d).expand(-1, n, -1).reshape(-1)
            h, m, w = enc_h.index_select(0, enc_idx), enc_mask.index_select(0, enc_idx), n
        tokens = run_seqs[..., -1, None].expand(-1, -1, d_).reshape(-1)
    return out_seqs, out_raw, out_len, out_scores


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
    decoder_start_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor:
    """RAG-Token decoding: beam search over log sum_z p(z|x) p(y_t|x,z,y<t). Returns (B, L) ids."""
    _check(src_ids, src_mask, doc_scores, num_beams, max_length)
    enc_h = _encode(model, src_ids, src_mask)
    doc_lp = torch.log_softmax(doc_scores.float(), dim=-1)  # (B, K)
    seqs, _, lens, _ = _search(
        model, enc_h, src_mask, doc_lp, num_beams, max_length, min_length, length_penalty,
        decoder_start_token_id, eos_token_id, pad_token_id,
    )  # fmt: skip
    return _trim(seqs[:, 0], lens[:, 0])


def _lex_order(q: Tensor, seqs: Tensor) -> Tensor:
    """Permutation sorting rows by question ``q`` (R,), then lexicographically by ``seqs`` (R, L)."""
    order = torch.arange(len(q), device=q.device)
    for col in reversed(range(seqs.shape[1])):  # LSD radix sort: stable sorts from the last column
        order = order[torch.sort(seqs[order, col], stable=True).indices]
    return order[torch.sort(q[order], stable=True).indices]


def _trie_logprob(
    model, enc_h: Tensor, enc_mask: Tensor, q: Tensor, seqs: Tensor, lens: Tensor, k: int, start: int,
    doc_lp: Tensor | None = None, floor: Tensor | None = None, exact: Tensor | None = None,
):  # fmt: skip
    """``_forced_logprob`` for rows sorted by ``_lex_order``: (G, K).

    Once sorted, rows sharing the prefix y[:t] are adjacent, so the trie nodes at depth t (over the rows with
    lens > t) are the runs of equal prefixes and their ids a cumsum. Step t runs the decoder on the
    (node, passage) rows, its cache re-ordered from each node's parent at depth t - 1.
    """
    g = len(q)
    dev = q.device
    ar_k = torch.arange(k, device=dev)
    score = torch.zeros(g, k, device=dev)
    node = torch.full((g,), -1, dtype=torch.long, device=dev)  # each row's trie node at the current depth
    live = torch.ones(g, dtype=torch.bool, device=dev)  # not pruned
    past, prev_node, prev_q = None, None, None
    for t in range(int(lens.max())):
        if floor is not None:  # upper bound of log p(y|x): known exact terms, else the prefix's log-prob
            ub = torch.logsumexp(doc_lp + torch.where(exact > float("-inf"), exact, score), -1)  # (G,)
            live &= ub >= floor
        rows = ((lens > t) & live).nonzero().squeeze(1)  # (A,) rows still to score at depth t
        if len(rows) == 0:
            break
        a, b = rows[1:], rows[:-1]
        same = (q[a] == q[b]) & (seqs[a, :t] == seqs[b, :t]).all(1)  # same prefix y[:t] as the row above
        head = torch.cat([same.new_ones(1), ~same])  # (A,) first row of each depth-t node
        node = node.clone()
        node[rows] = torch.cumsum(head.long(), 0) - 1
        first = rows[head]  # (n_t,)
        node_q = q[first]  # (n_t,) each node's question, ascending
        moved = prev_q is None or not torch.equal(node_q, prev_q)  # did row i change its encoder row?
        if moved:
            enc_rows = (node_q[:, None] * k + ar_k).reshape(-1)  # (n_t*K,) row (node, z) -> q*K + z
            h, m = enc_h[enc_rows], enc_mask[enc_rows]
        if t == 0:
            tokens = torch.full((len(first) * k,), start, dtype=torch.long, device=dev)
        else:
            tokens = seqs[first, t - 1].repeat_interleave(k)
            parent = (prev_node[first, None] * k + ar_k).reshape(-1)
            past = _reorder(past, parent, cross=moved)  # a parent has the same (question, passage)
        logits, past = _step(model, h, m, tokens, past)  # (n_t*K, V)
        lp = torch.log_softmax(logits, -1).view(len(first), k, -1)  # (n_t, K, V)
        score[rows] += lp[node[rows], :, seqs[rows, t]]  # (A, K) log p(y_t | x, z, y<t)
        prev_node, prev_q = node, node_q
    return score.masked_fill(~live[:, None], float("-inf"))


def _forced_logprob(
    model, enc_h: Tensor, enc_mask: Tensor, q: Tensor, seqs: Tensor, lens: Tensor, k: int, start: int,
    doc_lp: Tensor | None = None, floor: Tensor | None = None, exact: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Teacher-forced log p(y_u|x,z) = sum_t log p(y_t|x,z,y<t) of candidate u (first ``lens[u]`` tokens of
    ``seqs[u]``, question ``q[u]``) under each of its question's K passages (encoder rows q*K + z): (U, K).

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
    parts, a, rows = [], 0, 0
    for i, c in enumerate(counts):  # close a group before it exceeds the row budget
        rows += c * k
        if i + 1 == len(counts) or rows + counts[i + 1] * k > _SCORE_ROWS:
            b = a + rows // k
            bound = (doc_lp[a:b], floor[a:b], exact[a:b]) if floor is not None else ()
            parts.append(
                _trie_logprob(model, enc_h, enc_mask, q[a:b], seqs[a:b], lens[a:b], k, start, *bound)
            )
            a, rows = b, 0
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
    decoder_start_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    mode: str = "thorough",
) -> Tensor:
    """RAG-Sequence decoding (``mode`` "thorough" | "fast", see module doc). Returns (B, L) ids."""
    if mode not in ("thorough", "fast"):
        raise ValueError(f"mode must be 'thorough' or 'fast', got {mode!r}")
    _check(src_ids, src_mask, doc_scores, num_beams, max_length)
    b, k = doc_scores.shape
    n = num_beams
    dev = doc_scores.device
    enc_h = _encode(model, src_ids, src_mask)
    doc_lp = torch.log_softmax(doc_scores.float(), dim=-1)  # (B, K)
    seqs, raw, lens, _ = _search(
        model, enc_h, src_mask, torch.zeros(b * k, 1, device=dev), n, max_length, min_length,
        length_penalty, decoder_start_token_id, eos_token_id, pad_token_id,
    )  # fmt: skip
    c = k * n  # candidates per question, candidate j came from passage j // N
    cand, raw, lens = seqs.view(b, c, max_length), raw.view(b, c), lens.view(b, c)
    valid = torch.isfinite(raw)  # (B, C)
    same = (cand[:, :, None, :] == cand[:, None, :, :]).all(-1) & valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones(c, c, dtype=torch.bool, device=dev).tril(-1)  # j < i
    first = valid & ~(same & earlier).any(-1)  # (B, C) unique candidates
    # exact[b, i, z] = log p(y_i|x,z) where passage z's beam search produced candidate i, else -inf
    exact = raw[:, None, :].masked_fill(~same, float("-inf")).view(b, c, k, n).amax(-1)  # (B, C, K)
    score = torch.logsumexp(doc_lp[:, None, :] + exact, dim=-1)  # (B, C) fast: unseen p(y|x,z) taken as 0
    if mode == "thorough":
        # the fast score drops the passages that did not generate y: a lower bound of the thorough score,
        # so the best one is a floor below which no candidate can win (margin: float round-off)
        margin = _PRUNE_MARGIN if enc_h.dtype == torch.float32 else 100 * _PRUNE_MARGIN
        floor = score.masked_fill(~first, float("-inf")).amax(-1) - margin  # (B,)
        qb, qc = first.nonzero(as_tuple=True)  # (U,) unique candidates
        seq_lp = _forced_logprob(  # (U, K)
            model, enc_h, src_mask, qb, cand[qb, qc], lens[qb, qc], k, decoder_start_token_id,
            doc_lp=doc_lp[qb], floor=floor[qb] if _PRUNE else None, exact=exact[qb, qc],
        )  # fmt: skip
        score = torch.full((b, c), float("-inf"), device=dev)
        score[qb, qc] = torch.logsumexp(doc_lp[qb] + seq_lp, dim=-1)
    best = score.masked_fill(~first, float("-inf")).argmax(-1)  # (B,)
    ar = torch.arange(b, device=dev)
    return _trim(cand[ar, best], lens[ar, best])
