"""Batched RAG decoding over a Hugging Face seq2seq model with K retrieved passages per question.

Inputs: ``src_ids`` / ``src_mask`` (B*K, S), rows ``b*K .. b*K+K-1`` are question b joined with each of
its K passages; ``doc_scores`` (B, K) unnormalized, p(z|x) = softmax_K(doc_scores). The encoder runs once
on the B*K rows; the decoder is stepped with ``past_key_values`` (a transformers ``Cache``; beams are
re-ordered with ``reorder_cache``). Works for ``AutoModelForSeq2SeqLM`` (BART, T5) and
``EncoderDecoderModel``. Call under ``model.eval()`` (dropout is not switched off here).

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
  candidates per question (duplicates removed). ``thorough``: each candidate is scored under every
  passage by teacher forcing, log p(y|x) = log sum_z p(z|x) p(y|x,z); ``fast``: p(y|x,z) is taken as 0
  for passages whose beam search did not produce y, so the beam's raw (un-penalized) sum log-prob is
  used and no extra forward pass is needed. The candidate with the highest log p(y|x) is returned.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["rag_token_generate", "rag_sequence_generate"]

_SCORE_CHUNK_ROWS = 64  # rows per teacher-forced scoring pass in RAG-Sequence "thorough"


def _encode(model, src_ids: Tensor, src_mask: Tensor) -> Tensor:
    out = model.get_encoder()(input_ids=src_ids, attention_mask=src_mask, return_dict=True)
    return out.last_hidden_state  # (B*K, S, H)


def _reorder(past, idx: Tensor):
    if hasattr(past, "reorder_cache"):
        past.reorder_cache(idx)
        return past
    return tuple(tuple(t.index_select(0, idx) for t in layer) for layer in past)  # legacy tuple cache


def _step(model, enc_h: Tensor, enc_mask: Tensor, tokens: Tensor, past):
    """One decoder step for R rows: tokens (R,) -> next-token log-probs (R, V) float32, new cache."""
    out = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc_h),
        attention_mask=enc_mask,
        decoder_input_ids=tokens[:, None],
        past_key_values=past,
        use_cache=True,
        return_dict=True,
    )
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values


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
    enc_idx = (torch.arange(p_, device=dev)[:, None, None] * d_ + torch.arange(d_, device=dev)).expand(
        p_, n, d_
    )
    enc_idx = enc_idx.reshape(-1)  # (P*N*D,) row (p, n, d) -> encoder row p*D + d
    h, m = enc_h.index_select(0, enc_idx), enc_mask.index_select(0, enc_idx)
    tokens = torch.full((p_ * n * d_,), start, dtype=torch.long, device=dev)
    ninf = float("-inf")

    run_seqs = torch.empty(p_, n, 0, dtype=torch.long, device=dev)  # (P, N, t)
    run_scores = torch.zeros(p_, n, device=dev)
    run_scores[:, 1:] = ninf  # identical beams at start: only one live
    fin_seqs = torch.full((p_, n, max_length), pad, dtype=torch.long, device=dev)
    fin_scores = torch.full((p_, n), ninf, device=dev)
    fin_raw = torch.full((p_, n), 0.0 if n == 1 else ninf, device=dev)  # greedy accumulates here
    fin_len = torch.zeros(p_, n, dtype=torch.long, device=dev)
    done = torch.zeros(p_, dtype=torch.bool, device=dev)
    past = None
    rank_ok = torch.arange(2 * n, device=dev) < n  # only the top-N ranks may finish (as HF)

    for t in range(max_length):
        lp, past = _step(model, h, m, tokens, past)  # (P*N*D, V)
        v = lp.shape[-1]
        lp = torch.logsumexp(lp.view(p_, n, d_, v) + doc_lp[:, None, :, None], dim=2)  # (P, N, V)
        if t < min_length:
            lp[..., eos] = ninf
        last = t == max_length - 1
        if n == 1:  # greedy
            tok_lp, tok = lp[:, 0].max(-1)  # (P,)
            live = ~done
            run_seqs = torch.cat([run_seqs, torch.where(live, tok, pad)[:, None, None]], -1)
            fin_raw = torch.where(live[:, None], fin_raw + tok_lp[:, None], fin_raw)
            fin_len = fin_len + live[:, None].long()
            done = done | (tok == eos)
            if last or bool(done.all()):
                fin_seqs[:, :, : t + 1] = run_seqs
                return fin_seqs, fin_raw, fin_len, fin_raw / fin_len.clamp(min=1) ** length_penalty
            tokens = torch.where(live, tok, pad).repeat_interleave(d_)
            continue

        top_s, top_i = (run_scores[..., None] + lp).view(p_, n * v).topk(2 * n, dim=1)  # (P, 2N)
        beam, tok = top_i // v, top_i % v
        seqs = torch.cat([run_seqs.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], -1)
        is_fin = torch.ones_like(tok, dtype=torch.bool) if last else tok == eos  # (P, 2N)
        fin_now = is_fin & rank_ok & ~done[:, None] & torch.isfinite(top_s)
        pen = (top_s / float(t + 1) ** length_penalty).masked_fill(~fin_now, ninf)
        all_scores = torch.cat([fin_scores, pen], 1)  # (P, 3N)
        fin_scores, sel = all_scores.topk(n, dim=1)
        padded = torch.nn.functional.pad(seqs, (0, max_length - t - 1), value=pad)
        fin_seqs = torch.cat([fin_seqs, padded], 1).gather(1, sel[..., None].expand(-1, -1, max_length))
        fin_raw = torch.cat([fin_raw, top_s], 1).gather(1, sel)
        fin_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1).gather(1, sel)
        if last:
            break
        run_scores, keep = top_s.masked_fill(is_fin, ninf).topk(n, dim=1)  # (P, N)
        run_seqs = seqs.gather(1, keep[..., None].expand(-1, -1, t + 1))
        src_beam = beam.gather(1, keep)  # (P, N)
        denom = float(max_length if length_penalty > 0 else t + 2) ** length_penalty
        full = torch.isfinite(fin_scores).all(1)
        done = done | (full & (run_scores[:, 0] / denom <= fin_scores[:, -1]))
        if bool(done.all()):
            break
        rows = (torch.arange(p_, device=dev)[:, None] * n + src_beam)[..., None] * d_ + torch.arange(
            d_, device=dev
        )
        past = _reorder(past, rows.reshape(-1))
        tokens = run_seqs[..., -1, None].expand(-1, -1, d_).reshape(-1)
    return fin_seqs, fin_raw, fin_len, fin_scores


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


def _forced_logprob(
    model,
    enc_h: Tensor,
    enc_mask: Tensor,
    enc_rows: Tensor,
    targets: Tensor,
    lengths: Tensor,
    start: int,
    pad: int,
) -> Tensor:
    """Teacher-forced sum_t log p(y_t|x,z,y<t) over the first lengths[r] tokens of targets[r]: (R,)."""
    out = []
    for i in range(0, targets.shape[0], _SCORE_CHUNK_ROWS):
        sl = slice(i, i + _SCORE_CHUNK_ROWS)
        ln = lengths[sl]
        y = targets[sl, : int(ln.max())]  # (r, L)
        dec_in = torch.cat([torch.full_like(y[:, :1], start), y[:, :-1]], 1)
        rows = enc_rows[sl]
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc_h.index_select(0, rows)),
            attention_mask=enc_mask.index_select(0, rows),
            decoder_input_ids=dec_in,
            use_cache=False,
            return_dict=True,
        ).logits.float()  # (r, L, V)
        tok_lp = logits.gather(-1, y[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)  # (r, L)
        valid = torch.arange(y.shape[1], device=y.device) < ln[:, None]
        out.append(tok_lp.masked_fill(~valid, 0.0).sum(-1))
    return torch.cat(out)


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
    if mode == "fast":
        own = doc_lp.repeat_interleave(n, dim=1) + raw  # (B, C) log p(z_j|x) + log p(y_j|x, z_j)
        score = torch.logsumexp(own[:, None, :].masked_fill(~same, float("-inf")), dim=-1)  # (B, C)
    else:
        qb, qc = first.nonzero(as_tuple=True)  # (U,) unique candidates
        enc_rows = (qb[:, None] * k + torch.arange(k, device=dev)).reshape(-1)  # (U*K,)
        tgt = cand[qb, qc].repeat_interleave(k, 0)  # (U*K, max_length)
        ln = lens[qb, qc].repeat_interleave(k, 0)
        seq_lp = _forced_logprob(
            model, enc_h, src_mask, enc_rows, tgt, ln, decoder_start_token_id, pad_token_id
        ).view(-1, k)  # (U, K)
        score = torch.full((b, c), float("-inf"), device=dev)
        score[qb, qc] = torch.logsumexp(doc_lp[qb] + seq_lp, dim=-1)
    best = score.masked_fill(~first, float("-inf")).argmax(-1)  # (B,)
    ar = torch.arange(b, device=dev)
    return _trim(cand[ar, best], lens[ar, best])
