#!/usr/bin/env python
"""Decode benchmark: batched RAG decoding (rag_lightning.models.decode) vs a per-example loop.

    python benchmarks/bench_decode.py [--questions 16 --docs 5 --num-beams 4 --max-length 20]
    python benchmarks/benchmark.py decode ...        (same arguments, once registered there)

Inputs: B questions x K passages of random token ids (fixed seed), random doc scores, one small random BART
(d_model 256, 3+3 layers, vocab 30522, seeded) or ``--model-dir``; ``--arch causal``: a random Llama (same
width, 2 x layers, left-padded prompts, answers continue the prompt) behind ``CausalGenerator``, its baseline
``generate`` over the K left-padded prompts and forced scoring of prompt + candidate. Methods, all num_beams
N, max_length L:

* per-example thorough (baseline), like the HF RAG example's RAG-Sequence thorough decoding: for each
  question alone, ``model.generate`` over its K passages (N beams, N returned each, early_stopping="never"),
  deduplicate the K*N candidates, then score every candidate under every passage with a full forward pass
  (encoder included), log p(y|x) = logsumexp_z [log p(z|x) + sum_t log p(y_t|x,z,y<t)], keep the argmax.
* batched thorough / fast: ``rag_sequence_generate(mode=...)`` over all B questions at once.
* batched RAG-Token beam search: ``rag_token_generate``.

Reports questions/s, the speed-up over the baseline and how often each method's answer equals the
baseline's (thorough must agree; fast and token decode differently, so their agreement is informative only).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _bench import Bench, Col, Table  # benchmarks/ is sys.path[0] when run as a script
from torch import Tensor

from rag_lightning.models.decode import rag_sequence_generate, rag_token_generate

Answers = list[list[int]]
TABLE = Table(Col("method", 38, left=True), Col("seconds", 9, "{:.2f}"), Col("questions/s", 13, "{:.2f}"),
              Col("vs baseline", 13, "{:.2f}x"), Col("same answer", 13, "{:.1f}%"))  # fmt: skip


def build_causal(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, int]]:
    """A seeded random Llama (2 x ``--layers`` blocks) behind ``CausalGenerator``, and its special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rag_lightning.readers.causal import CausalGenerator
    from rag_lightning.tokenization import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()  # only its EOS (no pad token: prompts are padded with EOS)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=2 * args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=None,
        initializer_range=args.init_std, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # answers of varying length: the EOS row follows the mean final state
        model.lm_head.weight[cfg.eos_token_id] = 0.0
        model.lm_head.weight[cfg.eos_token_id, 0] = args.eos_bias / 5
    gen = CausalGenerator(model, tok, max_source_length=10_000)
    ids = dict(decoder_start_token_id=None, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id)
    return gen.eval().to(args.device), ids


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, int]]:
    """The seeded random BART (or ``--model-dir``) in eval mode, and its special token ids."""
    from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

    if args.arch == "causal":
        return build_causal(args)
    if args.model_dir:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_dir)
    else:
        torch.manual_seed(args.seed)
        cfg = BartConfig(
            vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * args.d_model,
            decoder_ffn_dim=4 * args.d_model, max_position_embeddings=256, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
            init_std=args.init_std,
        )  # fmt: skip
        model = BartForConditionalGeneration(cfg)
        with torch.no_grad():
            model.final_logits_bias[0, cfg.eos_token_id] = args.eos_bias  # answers of varying length
    c = model.config
    ids = dict(
        decoder_start_token_id=c.decoder_start_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    return model.eval().to(args.device), ids


def make_inputs(
    b: int, k: int, vocab: int, pad: int, eos: int, seed: int, src_len: tuple[int, int] = (24, 64)
) -> tuple[Tensor, Tensor, Tensor]:
    """src_ids / src_mask (B*K, S) right-padded random rows of src_len[0]..src_len[1] tokens ending in EOS;
    doc_scores (B, K)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(src_len[0], src_len[1] + 1, (b * k,), generator=g)
    src = torch.randint(4, vocab, (b * k, int(lens.max())), generator=g)
    pos = torch.arange(src.shape[1])
    src[torch.arange(b * k), lens - 1] = eos
    mask = (pos < lens[:, None]).long()
    src = src.masked_fill(mask == 0, pad)
    doc_scores = torch.randn(b, k, generator=g) * 2.0
    return src, mask, doc_scores


def strip(seq: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (the rest is padding)."""
    return seq[: seq.index(eos) + 1] if eos in seq else seq


def hf_beams(args, eos: int, pad: int) -> dict:
    """HF ``generate`` settings of the baselines: N beams, N returned, exact stopping, no extras."""
    return dict(
        num_beams=args.num_beams, num_return_sequences=args.num_beams, max_new_tokens=args.max_length,
        min_new_tokens=0, length_penalty=1.0, early_stopping="never", do_sample=False, eos_token_id=eos,
        pad_token_id=pad, no_repeat_ngram_size=0,
    )  # fmt: skip


def left_pad(src: Tensor, mask: Tensor, eos: int) -> tuple[Tensor, Tensor]:
    """Right-padded rows ending in EOS -> left-padded prompts without the EOS (decoder-only inputs)."""
    from rag_lightning.readers.causal import left_pad as pad_left

    rows = [r[: int(n) - 1] for r, n in zip(src.tolist(), mask.sum(1).tolist())]
    return pad_left(rows, eos)


@torch.no_grad()
def per_example_causal(gen, src: Tensor, mask: Tensor, doc_scores: Tensor, args, ids: dict) -> Answers:
    """The baseline for decoder-only generators: per question, HF generate over its K left-padded prompts
    (N beams, N returned each), then every candidate scored under every prompt by one forced forward."""
    b, k = doc_scores.shape
    eos, pad = ids["eos_token_id"], ids["pad_token_id"]
    answers = []
    for i in range(b):
        s, m = src[i * k : (i + 1) * k], mask[i * k : (i + 1) * k]  # (K, S) left-padded
        out = gen.model.generate(input_ids=s, attention_mask=m, **hf_beams(args, eos, pad))  # (K*N, S + L)
        cands = list({tuple(strip(r[s.shape[1] :], eos)): None for r in out.tolist()})
        c, width = len(cands), max(map(len, cands))
        y = torch.full((c, width), -100, dtype=torch.long)
        for j, cand in enumerate(cands):
            y[j, : len(cand)] = torch.tensor(cand)
        y = y.to(src.device).repeat_interleave(k, 0)  # (C*K, T) row c*K + z
        logits = gen(s.repeat(c, 1), m.repeat(c, 1), y)  # (C*K, T, V)
        lp = logits.float().log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        seq_lp = lp.masked_fill(y < 0, 0.0).sum(-1).view(c, k)  # (C, K) log p(y|x,z)
        score = torch.logsumexp(seq_lp + doc_scores[i].float().log_softmax(-1), -1)  # (C,)
        answers.append(list(cands[int(score.argmax())]))
    return answers


@torch.no_grad()
def per_example_thorough(model, src: Tensor, mask: Tensor, doc_scores: Tensor, args, ids: dict) -> Answers:
    """The baseline: one question at a time, HF generate per passage, then forced-decoding scores."""
    if args.arch == "causal":
        return per_example_causal(model, src, mask, doc_scores, args, ids)
    b, k = doc_scores.shape
    start, eos, pad = ids["decoder_start_token_id"], ids["eos_token_id"], ids["pad_token_id"]
    answers = []
    for i in range(b):
        s, m = src[i * k : (i + 1) * k], mask[i * k : (i + 1) * k]  # (K, S)
        out = model.generate(
            input_ids=s,
            attention_mask=m,
            decoder_start_token_id=start,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            **hf_beams(args, eos, pad),
        )  # (K*N, 1 + L) fmt: skip
        cands = list({tuple(strip(r[1:], eos)): None for r in out.tolist()})  # unique, first-seen order
        c = len(cands)
        width = max(map(len, cands))
        y = torch.full((c, width), pad, dtype=torch.long)
        for j, cand in enumerate(cands):
            y[j, : len(cand)] = torch.tensor(cand)
        y = y.to(src.device).repeat_interleave(k, 0)  # (C*K, T) row c*K + z
        dec_in = torch.cat([torch.full_like(y[:, :1], start), y[:, :-1]], 1)
        logits = model(
            input_ids=s.repeat(c, 1), attention_mask=m.repeat(c, 1), decoder_input_ids=dec_in
        ).logits
        lp = logits.float().log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)  # (C*K, T)
        lens = torch.tensor([len(x) for x in cands], device=src.device).repeat_interleave(k)
        valid = torch.arange(width, device=src.device) < lens[:, None]
        seq_lp = lp.masked_fill(~valid, 0.0).sum(-1).view(c, k)  # (C, K) log p(y|x,z)
        score = torch.logsumexp(seq_lp + doc_scores[i].float().log_softmax(-1), -1)  # (C,)
        answers.append(list(cands[int(score.argmax())]))
    return answers


def batched(fn: Callable, **extra) -> Callable:
    def decode(model, src: Tensor, mask: Tensor, doc_scores: Tensor, args, ids: dict) -> Answers:
        out = fn(
            model, src, mask, doc_scores, num_beams=args.num_beams, max_length=args.max_length, **ids, **extra
        )
        return [strip(r, ids["eos_token_id"]) for r in out.tolist()]

    return decode


METHODS: dict[str, Callable] = {
    "per-example thorough (HF generate)": per_example_thorough,
    "batched RAG-Sequence thorough": batched(rag_sequence_generate, mode="thorough"),
    "batched RAG-Sequence fast": batched(rag_sequence_generate, mode="fast"),
    "batched RAG-Token beam search": batched(rag_token_generate),
}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model, ids = build_model(args)
    vocab = (model.model if args.arch == "causal" else model).config.vocab_size
    src, mask, doc_scores = make_inputs(
        args.questions, args.docs, vocab, ids["pad_token_id"], ids["eos_token_id"], args.seed,
        (args.src_min, args.src_max),
    )  # fmt: skip
    if args.arch == "causal":
        src, mask = left_pad(src, mask, ids["eos_token_id"])
    src, mask, doc_scores = src.to(args.device), mask.to(args.device), doc_scores.to(args.device)
    k = args.docs
    print(
        f"\n== decode benchmark ({args.arch}): B={args.questions} questions x K={k} passages (src {src.shape[1]} tokens), "
        f"num_beams={args.num_beams}, max_length={args.max_length}, vocab={vocab}, device={args.device}, "
        f"threads={torch.get_num_threads()} =="
    )
    results: dict[str, dict[str, float]] = {}
    answers: dict[str, Answers] = {}
    for name, fn in METHODS.items():
        fn(model, src[: 2 * k], mask[: 2 * k], doc_scores[:2], args, ids)  # warm-up on 2 questions
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            answers[name] = fn(model, src, mask, doc_scores, args, ids)
            sync()
            best = min(best, time.perf_counter() - t0)
        results[name] = {"seconds": best, "qps": args.questions / best}
    base_name = next(iter(METHODS))
    base = answers[base_name]
    print("\n" + TABLE.header())
    for name, r in results.items():
        agree = sum(a == b for a, b in zip(answers[name], base)) / len(base)
        r["speedup"], r["agreement"] = results[base_name]["seconds"] / r["seconds"], agree
        print(TABLE.row(name, r["seconds"], r["qps"], r["speedup"], 100 * agree))
    lengths = [len(a) for a in base]
    print(f"baseline answer lengths (tokens incl. EOS): min {min(lengths)}, max {max(lengths)}")
    return results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=int, default=16, help="B")
    p.add_argument("--docs", type=int, default=5, help="K passages per question")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-length", type=int, default=20, help="generated tokens, EOS included")
    p.add_argument("--src-min", type=int, default=24, help="shortest question+passage input, tokens")
    p.add_argument("--src-max", type=int, default=64, help="longest question+passage input, tokens")
    p.add_argument("--arch", choices=["seq2seq", "causal"], default="seq2seq", help="random BART or Llama")
    p.add_argument("--model-dir", default=None, help="a saved seq2seq model instead of the random BART")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    p.add_argument("--init-std", type=float, default=0.3, help="random BART: weight init std (peaky outputs)")
    p.add_argument("--eos-bias", type=float, default=25.0, help="random BART: EOS logit bias")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method (the fastest is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default=None, help="default: cuda if available")


BENCH = Bench("decode", "batched RAG decoding vs a per-example loop", __doc__, add_args, run)

if __name__ == "__main__":
    BENCH.main()
