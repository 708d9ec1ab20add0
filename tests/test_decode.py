"""Batched RAG decoders vs per-example reference implementations (python loops, no cache, full recompute)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from rag_lightning.models import decode as D
from rag_lightning.models.decode import rag_sequence_generate, rag_token_generate
from rag_lightning.models.tiny import tiny_bpe_tokenizer
from rag_lightning.readers.causal import CausalGenerator, prefix_lm_mask

V = 96


def _bart():
    cfg = BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        init_std=0.1, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = BartForConditionalGeneration(cfg)
    model.final_logits_bias[0, 2] = 1.0  # make EOS likely enough that lengths vary
    return model, dict(decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)


def _bert2bert():
    kw = dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    enc = BertModel(BertConfig(**kw))
    dec = BertLMHeadModel(BertConfig(**kw, is_decoder=True, add_cross_attention=True))
    with torch.no_grad():
        dec.cls.predictions.bias[3] += 3.0
    model = EncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 4, 0, 3
    return model, dict(decoder_start_token_id=4, eos_token_id=3, pad_token_id=0)


def _t5():
    cfg = T5Config(
        vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=3.0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg), dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)


BUILDERS = {"bart": _bart, "bert2bert": _bert2bert, "t5": _t5}


def _causal(arch: str):
    """A decoder-only generator over V ids (GPT-2, Llama, or a BERT prefix LM; "-copy": with the pointer head);
    EOS 2 made likely enough that lengths vary; padding 0 (masked; no pad token in the tokenizer, as GPT-2 /
    Llama)."""
    arch, copy = arch.removesuffix("-copy"), arch.endswith("-copy")
    torch.manual_seed(0)
    common = dict(vocab_size=V, initializer_range=0.1 if arch == "prefix-lm" else 0.3)
    if arch == "gpt2":
        cfg = GPT2Config(**common, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2)  # fmt: skip
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False, bos_token_id=2, eos_token_id=2)  # fmt: skip
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, is_decoder=True)  # fmt: skip
        model = BertLMHeadModel(cfg)
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head.bias is not None:
            head.bias[2] += 2.0
        else:
            head.weight[2] *= 1.7
    gen = CausalGenerator(model.eval(), tiny_bpe_tokenizer(), prefix_lm=arch == "prefix-lm", copy=copy)
    if copy:  # peaked attention: copying decides some tokens
        torch.nn.init.normal_(gen.pointer.query.weight, std=1.0)
    return gen, dict(decoder_start_token_id=None, eos_token_id=2, pad_token_id=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threading only adds overhead (and contention on shared CI machines)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=["bart", "bert2bert", "t5"])
def setup(request):
    torch.manual_seed(0)
    model, ids = BUILDERS[request.param]()
    model.eval()
    return model, ids


def _inputs(b=2, k=3, s=9, seed=1, left=False):
    """Random sources (B*K, S), two of them padded (on the left for decoder-only prompts), and doc scores."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(5, V, (b * k, s), generator=g)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0  # some padding in the source
    mask[-1, 4:] = 0
    if left:
        mask = mask.flip(1)
    src = src.masked_fill(mask == 0, 0)
    scores = torch.randn(b, k, generator=g) * 2
    return src, mask, scores


# --- references: one question at a time, full decoder recompute, no cache -----------------------------
def _ref_forced(model, src, mask, y, start):
    """(T, V) log-probs of the positions predicting y (T tokens) after one source row (1, S), no cache."""
    if isinstance(model, CausalGenerator) and model.pointer is not None:  # the training forward, unpadded
        row = src[:, mask[0].bool()]
        return model(row, torch.ones_like(row), torch.tensor([y])).float()[0]  # mixture log-probs (T, V)
    if isinstance(model, CausalGenerator):  # the unpadded prompt, then y[:-1]
        prompt = src[0][mask[0].bool()].tolist()
        ids = torch.tensor([prompt + y[:-1]])
        attn = torch.ones_like(ids)
        if model.prefix_lm:
            attn = prefix_lm_mask(attn, len(prompt), torch.float32)
        logits = model.model(input_ids=ids, attention_mask=attn).logits[0, len(prompt) - 1 :]
    else:
        dec = torch.tensor([[start] + y[:-1]])
        logits = model(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits[0]
    return torch.log_softmax(logits.float(), -1)


def _ref_step(model, src, mask, prefix, start):
    """(D, V) next-token log-probs for the given prefix under each of the D source rows."""
    if isinstance(model, CausalGenerator):
        return torch.stack([_ref_forced(model, src[d : d + 1], mask[d : d + 1], prefix + [0], start)[-1]
                            for d in range(src.shape[0])])  # fmt: skip
    dec = torch.tensor([[start] + prefix] * src.shape[0])
    logits = model(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
    return torch.log_softmax(logits.float(), -1)


def _ref_search(step, n, max_len, min_len, lp_pen, eos):
    """step(prefix) -> (V,) log-probs. Returns finished [(penalized, raw, seq)] best first."""
    if n == 1:
        seq, raw = [], torch.tensor(0.0)
        for t in range(max_len):
            lp = step(seq).clone()
            if t < min_len:
                lp[eos] = float("-inf")
            tok = int(lp.argmax())
            seq, raw = seq + [tok], raw + lp[tok]
            if tok == eos:
                break
        return [(raw / len(seq) ** lp_pen, raw, seq)]
    running, finished = [([], torch.tensor(0.0))], []
    for t in range(max_len):
        cands = []
        for seq, s in running:
            lp = step(seq).clone()
            if t < min_len:
                lp[eos] = float("-inf")
            cands += [(s + lp[v], seq + [v]) for v in range(lp.shape[0])]
        cands.sort(key=lambda c: -float(c[0]))
        cands = cands[: 2 * n]
        last = t == max_len - 1
        nxt = []
        for r, (s, seq) in enumerate(cands):
            if last or seq[-1] == eos:
                if r < n and torch.isfinite(s):
                    finished.append((s / float(t + 1) ** lp_pen, s, seq))
            else:
                nxt.append((seq, s))
        finished = sorted(finished, key=lambda f: -float(f[0]))[:n]
        running = nxt[:n]
        if last:
            break
        denom = float(max_len if lp_pen > 0 else t + 2) ** lp_pen
        if len(finished) == n and float(running[0][1] / denom) <= float(finished[-1][0]):
            break
    return finished


def ref_rag_token(model, src, mask, scores, num_beams, max_length, min_length, length_penalty, ids):
    b, k = scores.shape
    out = []
    for i in range(b):
        rows = slice(i * k, (i + 1) * k)
        doc_lp = torch.log_softmax(scores[i].float(), -1)

        def step(prefix, rows=rows, doc_lp=doc_lp):
            lp = _ref_step(model, src[rows], mask[rows], prefix, ids["decoder_start_token_id"])
            return torch.logsumexp(lp + doc_lp[:, None], 0)

        fin = _ref_search(step, num_beams, max_length, min_length, length_penalty, ids["eos_token_id"])
        out.append(fin[0][2])
    return out


def ref_rag_sequence(model, src, mask, scores, num_beams, max_length, min_length, length_penalty, ids, mode):
    b, k = scores.shape
    start = ids["decoder_start_token_id"]
    out = []
    for i in range(b):
        doc_lp = torch.log_softmax(scores[i].float(), -1)
        hyps = []  # (passage, raw, seq)
        for z in range(k):
            r = slice(i * k + z, i * k + z + 1)
            fin = _ref_search(
                lambda p, r=r: _ref_step(model, src[r], mask[r], p, start)[0],
                num_beams, max_length, min_length, length_penalty, ids["eos_token_id"],
            )  # fmt: skip
            hyps += [(z, raw, seq) for _, raw, seq in fin]
        uniq = []
        for _, _, seq in hyps:
            if seq not in uniq:
                uniq.append(seq)
        best, best_score = None, float("-inf")
        for y in uniq:
            if mode == "fast":
                terms = [doc_lp[z] + raw for z, raw, seq in hyps if seq == y]
            else:
                terms = []
                for z in range(k):
                    row = slice(i * k + z, i * k + z + 1)
                    lp = _ref_forced(model, src[row], mask[row], y, start)
                    terms.append(doc_lp[z] + sum(lp[t, y[t]] for t in range(len(y))))
            sc = float(torch.logsumexp(torch.stack(terms), 0))
            if sc > best_score:
                best, best_score = y, sc
        out.append(best)
    return out


def _rows(t: torch.Tensor, pad: int) -> list[list[int]]:
    """Strip trailing padding of a (B, L) output (EOS is kept; pad ids never appear inside)."""
    return [[x for x in row if x != pad] for row in t.tolist()]


def _cfg(num_beams):
    return dict(num_beams=num_beams, max_length=7, min_length=2, length_penalty=1.0)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_matches_reference(setup, num_beams):
    model, ids = setup
    src, mask, scores = _inputs()
    got = rag_token_generate(model, src, mask, scores, **_cfg(num_beams), **ids)
    ref = ref_rag_token(model, src, mask, scores, **_cfg(num_beams), ids=ids)
    assert got.dtype == torch.long and got.shape[0] == 2
    assert _rows(got, ids["pad_token_id"]) == ref
    assert all(len(r) >= 2 for r in ref)  # min_length respected


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("mode", ["thorough", "fast"])
def test_rag_sequence_matches_reference(setup, num_beams, mode):
    model, ids = setup
    src, mask, scores = _inputs(seed=2)
    got = rag_sequence_generate(model, src, mask, scores, **_cfg(num_beams), **ids, mode=mode)
    ref = ref_rag_sequence(model, src, mask, scores, **_cfg(num_beams), ids=ids, mode=mode)
    assert _rows(got, ids["pad_token_id"]) == ref


@torch.no_grad()
@pytest.mark.parametrize("length_penalty", [0.0, 2.0, -1.0])
def test_beam_length_penalty_matches_reference(length_penalty):
    torch.manual_seed(0)
    model, ids = _bart()
    model.eval()
    src, mask, scores = _inputs(b=3, k=2, seed=3)
    cfg = dict(num_beams=4, max_length=6, min_length=0, length_penalty=length_penalty)
    got = rag_token_generate(model, src, mask, scores, **cfg, **ids)
    assert _rows(got, ids["pad_token_id"]) == ref_rag_token(model, src, mask, scores, **cfg, ids=ids)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["bart", "bert2bert", "t5"])
def test_greedy_k1_equals_hf_generate(arch):
    torch.manual_seed(0)
    model, ids = BUILDERS[arch]()
    model.eval()
    src, mask, _ = _inputs(b=4, k=1, seed=4)
    scores = torch.zeros(4, 1)
    got = rag_token_generate(model, src, mask, scores, max_length=8, min_length=1, **ids)
    hf = model.generate(
        input_ids=src, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=8,
        min_new_tokens=1, **ids,
    )  # fmt: skip
    assert hf[:, 0].eq(ids["decoder_start_token_id"]).all()
    assert _rows(got, ids["pad_token_id"]) == _rows(hf[:, 1:], ids["pad_token_id"])
    seq = rag_sequence_generate(model, src, mask, scores, max_length=8, min_length=1, **ids)
    assert torch.equal(seq, got)  # with K=1 both models are the same


@torch.no_grad()
def test_thorough_scoring_chunks_and_k1_agree(monkeypatch):
    torch.manual_seed(0)
    model, ids = _bart()
    model.eval()
    src, mask, scores = _inputs(seed=5)
    ref = rag_sequence_generate(model, src, mask, scores, num_beams=2, max_length=6, **ids)
    monkeypatch.setattr(D, "_SCORE_ROWS", 3)
    assert torch.equal(rag_sequence_generate(model, src, mask, scores, num_beams=2, max_length=6, **ids), ref)


@torch.no_grad()
@pytest.mark.parametrize("budget", [3, 10_000])
def test_trie_forced_scores_equal_full_forward(setup, budget, monkeypatch):
    """Trie-shared teacher forcing (KV cache, shared prefixes decoded once) vs one full forward per row."""
    model, ids = setup
    start, pad = ids["decoder_start_token_id"], ids["pad_token_id"]
    src, mask, _ = _inputs(b=2, k=3, seed=6)
    cands = [(1, [7, 8, 9]), (0, [7, 8]), (0, [7, 8, 9, 10]), (0, [7, 11]), (1, [7, 8, 12]), (0, [5])]
    cands += [(1, [13, 8, 9, 10, 11]), (0, [7, 8, 9, 14])]  # unsorted, shared prefixes, varying lengths
    q = torch.tensor([c[0] for c in cands])
    seqs = torch.full((len(cands), 6), pad)
    for i, (_, y) in enumerate(cands):
        seqs[i, : len(y)] = torch.tensor(y)
    lens = torch.tensor([len(y) for _, y in cands])
    monkeypatch.setattr(D, "_SCORE_ROWS", budget)  # 3: one question per group
    got = D._forced_logprob(D.Seq2SeqSteps(model, src, mask, start), q, seqs, lens, 3)  # (U, K)
    for u, (b, y) in enumerate(cands):
        for z in range(3):
            row = slice(b * 3 + z, b * 3 + z + 1)
            dec = torch.tensor([[start] + y[:-1]])
            lp = (
                model(input_ids=src[row], attention_mask=mask[row], decoder_input_ids=dec)
                .logits[0]
                .log_softmax(-1)
            )
            want = sum(lp[t, y[t]] for t in range(len(y)))
            torch.testing.assert_close(got[u, z], want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("seed", range(4))
def test_thorough_pruning_is_exact(setup, seed):
    """Branch and bound over the candidates returns what scoring every candidate fully returns."""
    model, ids = setup
    src, mask, scores = _inputs(b=3, k=3, seed=10 + seed)
    scores = scores / 4  # flatter p(z|x): more passages matter, closer candidates
    cfg = dict(num_beams=3, max_length=6, **ids)
    pruned = rag_sequence_generate(model, src, mask, scores, **cfg)
    assert torch.equal(rag_sequence_generate(model, src, mask, scores, **cfg, prune=False), pruned)


def test_bad_inputs():
    model, ids = _bart()
    src, mask, scores = _inputs()
    with pytest.raises(ValueError, match="B\\*K"):
        rag_token_generate(model, src[:-1], mask[:-1], scores, **ids)
    with pytest.raises(ValueError, match="mode"):
        rag_sequence_generate(model, src, mask, scores, mode="slow", **ids)


@torch.no_grad()
def test_thorough_and_fast_can_differ():
    torch.manual_seed(0)
    model, ids = _bart()
    model.eval()
    src, mask, scores = _inputs(seed=2)  # a case where a candidate is found under one passage only
    th = rag_sequence_generate(model, src, mask, scores, **_cfg(3), **ids, mode="thorough")
    fa = rag_sequence_generate(model, src, mask, scores, **_cfg(3), **ids, mode="fast")
    assert _rows(th, ids["pad_token_id"]) != _rows(fa, ids["pad_token_id"])


# --- decoder-only generators (prompts left-padded, the answer continues each prompt with the KV cache) --------
@pytest.fixture(scope="module", params=["gpt2", "llama", "prefix-lm", "llama-copy", "prefix-lm-copy"])
def causal_setup(request):
    return _causal(request.param)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_causal_rag_token_matches_reference(causal_setup, num_beams):
    model, ids = causal_setup
    src, mask, scores = _inputs(left=True)
    got = rag_token_generate(model, src, mask, scores, **_cfg(num_beams), **ids)
    ref = ref_rag_token(model, src, mask, scores, **_cfg(num_beams), ids=ids)
    assert _rows(got, ids["pad_token_id"]) == ref


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("mode", ["thorough", "fast"])
def test_causal_rag_sequence_matches_reference(causal_setup, num_beams, mode):
    model, ids = causal_setup
    src, mask, scores = _inputs(seed=2, left=True)
    got = rag_sequence_generate(model, src, mask, scores, **_cfg(num_beams), **ids, mode=mode)
    ref = ref_rag_sequence(model, src, mask, scores, **_cfg(num_beams), ids=ids, mode=mode)
    assert _rows(got, ids["pad_token_id"]) == ref


@torch.no_grad()
@pytest.mark.parametrize("seed", range(2))
def test_causal_thorough_pruning_is_exact(causal_setup, seed):
    model, ids = causal_setup
    src, mask, scores = _inputs(b=3, k=3, seed=10 + seed, left=True)
    cfg = dict(num_beams=3, max_length=6, **ids)
    pruned = rag_sequence_generate(model, src, mask, scores / 4, **cfg)
    assert torch.equal(rag_sequence_generate(model, src, mask, scores / 4, **cfg, prune=False), pruned)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_greedy_k1_equals_hf_generate(arch):
    gen, ids = _causal(arch)
    src, mask, _ = _inputs(b=4, k=1, seed=4, left=True)
    scores = torch.zeros(4, 1)
    got = rag_token_generate(gen, src, mask, scores, max_length=8, min_length=1, **ids)
    hf = gen.model.generate(
        input_ids=src, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=8, min_new_tokens=1,
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
    )  # fmt: skip
    assert _rows(got, ids["pad_token_id"]) == _rows(hf[:, src.shape[1] :], ids["pad_token_id"])
    assert len({len(r) for r in _rows(got, ids["pad_token_id"])}) > 1  # lengths vary: EOS is reached
    seq = rag_sequence_generate(gen, src, mask, scores, max_length=8, min_length=1, **ids)
    assert torch.equal(seq, got)  # with K=1 both models are the same
