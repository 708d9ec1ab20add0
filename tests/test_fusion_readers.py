"""Fusion readers: Fusion-in-Decoder against the transformers model itself, one-prompt context against one
forward of the joint prompt, attention distillation against its definition, Atlas's loop pass."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from rag_lightning.data.collate import causal_labels
from rag_lightning.models.marginalize import label_positions
from rag_lightning.models.objectives import adist_loss, passage_attention
from rag_lightning.models.tiny import tiny_causal_lm, tiny_generator, tiny_t5
from rag_lightning.readers import FUSION, READERS, VARIANTS, from_pretrained, reader_class
from rag_lightning.readers.causal import CausalGenerator, prefix_lm_mask
from rag_lightning.readers.concat import ConcatGenerator
from rag_lightning.readers.fid import FidGenerator
from rag_lightning.readers.lora import merge_lora

BUILDERS = {"t5": tiny_t5, "bart": tiny_generator}
QS = [[5000, 5001, 5002], [6000, 6001]]
PS = [
    [7000, 7001, 7002, 7003],
    [7100],
    [7200, 7201, 7202, 7203, 7204, 7205],
    [7300, 7301],
    [7400],
    [7500, 7501],
]


def _fid(arch: str) -> FidGenerator:
    model, tok = BUILDERS[arch]()
    return FidGenerator(model, tok, max_source_length=9).double().eval()  # the long passage is cut


def _labels(g) -> torch.Tensor:
    labels = torch.tensor([[2000, 2001, 2002, g.eos_token_id], [2100, g.eos_token_id, -100, -100]])
    return labels  # (B, T), -100 = padding


def _hf_fid_loss(g: FidGenerator, src, mask, labels, k: int) -> torch.Tensor:
    """Sum over questions of -log p(y | x, z_1..z_K): each pair encoded by the model's encoder, the states
    concatenated per question, its decoder run with `encoder_outputs` and `labels` (mean loss x tokens)."""
    m, total = g.model, 0.0
    for b in range(labels.shape[0]):
        rows = slice(b * k, (b + 1) * k)
        enc = m.get_encoder()(input_ids=src[rows], attention_mask=mask[rows]).last_hidden_state  # (K, S, H)
        out = m(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.reshape(1, -1, enc.shape[-1])),
            attention_mask=mask[rows].reshape(1, -1),
            labels=labels[b : b + 1],
        )
        total = total + out.loss * (labels[b] != -100).sum()
    return total


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_fid_loss_and_gradients_equal_transformers(arch, fused):
    g = _fid(arch)
    src, mask = g.build_sources(QS, PS, 3)  # (B*K, S)
    labels = _labels(g)
    assert not mask.all()  # padded rows: the fused mask must carry them
    read = g.score(src, mask, labels, fused=fused, positions=label_positions(labels))
    assert read.lp.tok_lp.shape == (2, 1, 4)
    ours = -read.lp.tok_lp.sum()
    grads = torch.autograd.grad(ours, list(g.parameters()), allow_unused=True)
    ref = _hf_fid_loss(g, src, mask, labels, 3)
    ref_grads = torch.autograd.grad(ref, list(g.parameters()), allow_unused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_fid_decoding_equals_generate_on_concatenated_states(arch, num_beams):
    g = _fid(arch)
    torch.nn.init.normal_(g.model.get_output_embeddings().weight, std=2.0)  # varied answers
    src, mask = g.build_sources(QS, PS, 3)
    ids = dict(decoder_start_token_id=g.decoder_start_token_id, eos_token_id=g.eos_token_id)
    got = g.generate(src, mask, torch.randn(2, 3), "fid", num_beams=num_beams, max_length=6, min_length=1,
                     pad_token_id=g.pad_token_id, **ids)  # fmt: skip
    enc = g.model.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state  # (B*K, S, H)
    hf = g.model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.reshape(2, -1, enc.shape[-1])),
        attention_mask=mask.reshape(2, -1), num_beams=num_beams, do_sample=False, max_new_tokens=6,
        min_new_tokens=1, early_stopping="never", pad_token_id=g.pad_token_id, **ids,
    )[:, 1:]  # fmt: skip

    def rows(x):
        return [[t for t in r if t != g.pad_token_id] for r in x.tolist()]

    assert rows(got) == rows(hf)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_fid_attention_mass_is_the_decoders_cross_attention_per_passage(arch):
    g = _fid(arch)
    g.use_eager_attention()
    src, mask = g.build_sources(QS, PS, 3)
    labels = _labels(g)
    mass = g.score(src, mask, labels, attention=True).attention  # (B, K)
    enc = g.model.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
    for b in range(2):
        out = g.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc[3 * b : 3 * b + 3].reshape(1, -1, enc.shape[-1])),
            attention_mask=mask[3 * b : 3 * b + 3].reshape(1, -1), labels=labels[b : b + 1], output_attentions=True,
        )  # fmt: skip
        a = torch.stack(out.cross_attentions)[:, 0]  # (L, heads, T, K*S)
        t = int((labels[b] != -100).sum())
        per = a[:, :, :t].reshape(*a.shape[:2], t, 3, -1).sum(-1)  # (L, heads, t, K)
        torch.testing.assert_close(mass[b], per.mean(dim=(0, 1, 2)))
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, dtype=mass.dtype))  # FiD: all keys are passages


def test_passage_attention_and_adist_by_hand():
    # 1 layer... 2 layers, 1 question, 2 heads, 2 targets (the second padding), 4 keys: passages 0, 0, 1, none
    attn = torch.tensor(
        [
            [[[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]], [[0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]],
            [[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], [[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]],
        ],
        dtype=torch.float64,
    )[:, None]  # (L=2, B=1, heads=2, T=2, N=4)
    segments = torch.tensor([[0, 0, 1, -1]])
    mass = passage_attention(attn, segments, 2, torch.tensor([[True, False]]))
    # passage 0: (0.3 + 0.5 + 0.0 + 0.5) / 4; passage 1: (0.3 + 0.5 + 1.0 + 0.25) / 4
    torch.testing.assert_close(mass, torch.tensor([[1.3 / 4, 2.05 / 4]], dtype=torch.float64))
    scores = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    loss = adist_loss(mass, scores, temperature=0.5)
    target = mass / mass.sum()
    log_pr = torch.log_softmax(scores / 0.5, -1)
    torch.testing.assert_close(loss, (target * (target.log() - log_pr)).sum(-1))
    loss.sum().backward()
    torch.testing.assert_close(scores.grad, (log_pr.exp() - target).detach() / 0.5)  # KL's gradient
    sharp = adist_loss(mass, scores, target_temperature=0.1)
    q = torch.softmax(mass / 0.1, -1)
    torch.testing.assert_close(sharp, (q * (q.log() - torch.log_softmax(scores, -1))).sum(-1))
    zero = adist_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))  # a passage never attended to
    torch.testing.assert_close(zero, torch.tensor([2.0]).log())
    # no passage token in the prompt (all cut): no target, loss 0, no NaN
    none = torch.zeros(1, 2, requires_grad=True)
    assert adist_loss(torch.zeros(1, 2), none).item() == 0.0
    adist_loss(torch.zeros(1, 2), none).sum().backward()
    assert torch.equal(none.grad, torch.zeros(1, 2))


# ---------------------------------------------------------------- one prompt (concat)
def _concat(arch: str, copy: bool = False, passage_length: int | None = 3) -> ConcatGenerator:
    if arch == "bert-prefix":
        from transformers import BertConfig, BertLMHeadModel

        from rag_lightning.models.tiny import tiny_tokenizer

        tok = tiny_tokenizer()
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, is_decoder=True, initializer_range=0.2)  # fmt: skip
        torch.manual_seed(0)
        g = ConcatGenerator(BertLMHeadModel(cfg), tok, max_source_length=40, prefix_lm=True, copy=copy,
                            passage_length=passage_length)  # fmt: skip
    else:
        model, tok = tiny_causal_lm(arch)
        g = ConcatGenerator(model, tok, max_source_length=40, copy=copy, passage_length=passage_length)
    if copy:
        torch.nn.init.normal_(g.pointer.query.weight, std=1.0)
    return g.double().eval()


def _joint_prompt(g: ConcatGenerator, q: list[int], ps: list[list[int]]) -> tuple[list[int], list[int]]:
    """The prompt written out by hand: the template's pieces, the passages in order, each cut, separated."""
    cut = [p[: g.passage_length] for p in ps]
    passages, seg = [], []
    for i, p in enumerate(cut):
        sep = g.separator_ids if i < len(cut) - 1 else []
        passages += p + sep
        seg += [i] * len(p) + [-1] * len(sep)
    ids, segs = [], []
    for piece in g.pieces:
        part, s = (
            (q, [-1] * len(q))
            if piece == "question"
            else (passages, seg)
            if piece == "passage"
            else (piece, [-1] * len(piece))
        )
        ids, segs = ids + list(part), segs + list(s)
    return ids, segs


@torch.no_grad()
@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert-prefix"])
def test_concat_equals_one_forward_of_the_joint_prompt(arch, copy):
    g = _concat(arch, copy)
    tok = g.tokenizer
    qs = [
        tok("who was the first laureate", add_special_tokens=False).input_ids,
        tok("where", add_special_tokens=False).input_ids,
    ]
    ps = [
        tok(t, add_special_tokens=False).input_ids
        for t in (
            "Warsaw is big",
            "x",
            "Curie was born in Warsaw",
            "Poland",
            "capital of Poland",
            "Vistula river",
        )
    ]
    labels = causal_labels(tok, ["Maria Curie", "Poland"], max_length=10)  # (B, T)
    src, mask, seg = g.build_sources(qs, ps, 3)  # (B, S) one prompt per question
    assert src.shape[0] == 2 and mask[:, -1].all() and not mask.all()  # left-padded
    lp = g.score(src, mask, labels).lp.tok_lp  # (B, 1, T)
    plain = CausalGenerator(g.model, tok, template=g.template, prefix_lm=g.prefix_lm).double()
    plain.pointer = g.pointer
    for b in range(2):
        prompt, segs = _joint_prompt(g, qs[b], ps[3 * b : 3 * b + 3])
        assert src[b][mask[b].bool()].tolist() == prompt and seg[b][mask[b].bool()].tolist() == segs
        answer = [t for t in labels[b].tolist() if t != -100]
        ids = torch.tensor([prompt + answer[:-1]])
        if copy:  # the copy mixture over the whole prompt: the causal reader's forward on the one prompt
            out = plain(
                torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), labels[b : b + 1]
            )[0]
        else:  # the transformers model itself
            attn = torch.ones_like(ids)
            if g.prefix_lm:
                attn = prefix_lm_mask(attn, len(prompt), torch.float64)
            out = g.model(input_ids=ids, attention_mask=attn).logits[0, len(prompt) - 1 :]
        ref = torch.log_softmax(out, -1)[torch.arange(len(answer)), answer]
        torch.testing.assert_close(lp[b, 0, : len(answer)], ref, rtol=1e-10, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("copy", [False, True])
def test_concat_with_one_passage_is_the_causal_prompt_and_decodes_like_it(copy):
    g = _concat("llama", copy, passage_length=None)
    plain = CausalGenerator(g.model, g.tokenizer, max_source_length=40, copy=False).double().eval()
    plain.pointer = g.pointer
    qs, ps = [[5, 6, 7], [9, 10]], [[11, 12, 13, 14], [15]]
    src, mask, seg = g.build_sources(qs, ps, 1)
    ref_src, ref_mask = plain.build_sources(qs, ps, 1)
    assert torch.equal(src, ref_src) and torch.equal(mask, ref_mask)
    kw = dict(
        num_beams=2, max_length=5, min_length=1, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id
    )
    got = g.generate(src, mask, torch.randn(2, 3), "concat", **kw)
    assert torch.equal(got, plain.generate(src, mask, torch.zeros(2, 1), "token", **kw))


@torch.no_grad()
def test_concat_attention_mass_is_the_answers_attention_on_each_span():
    g = _concat("gpt2")
    g.use_eager_attention()
    tok = g.tokenizer
    qs = [tok("who", add_special_tokens=False).input_ids] * 2
    ps = [
        tok(t, add_special_tokens=False).input_ids
        for t in ("Warsaw is big", "x y", "Curie", "Poland", "a b c", "d")
    ]
    labels = causal_labels(tok, ["Maria Curie", "Poland"], max_length=10)
    src, mask, seg = g.build_sources(qs, ps, 3)
    mass = g.score(src, mask, labels, segments=seg, attention=True).attention  # (B, 3)
    for b in range(2):
        prompt, segs = _joint_prompt(g, qs[b], ps[3 * b : 3 * b + 3])
        answer = [t for t in labels[b].tolist() if t != -100]
        out = g.model(input_ids=torch.tensor([prompt + answer[:-1]]), output_attentions=True)
        a = torch.stack(out.attentions)[:, 0, :, len(prompt) - 1 :, : len(prompt)]  # (L, heads, T, S)
        onehot = torch.nn.functional.one_hot(torch.tensor(segs) + 1, 4)[:, 1:].double()  # (S, K)
        torch.testing.assert_close(mass[b], (a @ onehot).mean(dim=(0, 1, 2)))


def test_concat_settings_roundtrip(tmp_path):
    g = _concat("gpt2", copy=True, passage_length=5)
    g.set_passages(5, " || ")
    g.save_pretrained(tmp_path)
    again = from_pretrained(str(tmp_path), variant="concat")
    assert isinstance(again, ConcatGenerator) and again.pointer is not None
    assert (again.passage_length, again.separator, again.separator_ids) == (5, " || ", g.separator_ids)
    assert from_pretrained(str(tmp_path), variant="concat", passage_length=2).passage_length == 2


# ---------------------------------------------------------------- registry and the loop pass
def test_registry_dispatches_every_variant():
    assert set(FUSION) == {"fid", "concat"} and set(VARIANTS) == {"token", "sequence", "fid", "concat"}
    assert isinstance(from_pretrained("tiny:t5", variant="fid"), FidGenerator)
    assert isinstance(from_pretrained("tiny:gpt2", variant="concat", passage_length=4), ConcatGenerator)
    assert type(from_pretrained("tiny:llama", variant="sequence")) is CausalGenerator
    assert all(v in cls.variants for family in READERS.values() for v, cls in family.items())
    with pytest.raises(ValueError, match="does not apply to a causal"):
        reader_class("causal", "fid")
    with pytest.raises(ValueError, match="does not apply to a seq2seq"):
        from_pretrained("tiny:bart", variant="concat")


def test_reader_modules_import_no_other_reader_but_their_parent():
    """No import loop: a reader module imports base, lora and models/, plus the reader it extends; decode.py
    imports no reader at run time."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "rag_lightning"
    allowed = {"seq2seq": set(), "causal": set(), "fid": {"seq2seq"}, "concat": {"causal"}}
    for name, parents in allowed.items():
        tree = ast.parse((root / "readers" / f"{name}.py").read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        readers = {m.rsplit(".", 1)[1] for m in mods if m.startswith("rag_lightning.readers.")}
        assert readers - {"base", "lora"} == parents, name
    decode = ast.parse((root / "models" / "decode.py").read_text())
    top = {n.module for n in decode.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("rag_lightning.readers") for m in top)


def test_fusion_and_objectives_are_checked(tmp_path):
    from rag_lightning.module import RagModule

    fid = from_pretrained("tiny:t5", variant="fid", max_source_length=16)
    with pytest.raises(ValueError, match="marginal needs a per-passage reader"):
        RagModule(None, fid, variant="fid", retriever_loss="marginal")
    with pytest.raises(ValueError, match="adist needs a fusion reader"):
        RagModule(None, from_pretrained("tiny:bart"), variant="token", retriever_loss="adist")
    with pytest.raises(ValueError, match="needs another reader"):
        RagModule(None, fid, variant="token")
    assert RagModule(None, fid, variant="fid").retriever_weights == {"adist": 1.0}  # the fusion default


def _fit_module(tmp_path, overrides):
    from test_retriever_objectives import _module

    _, _, model, batch = _module(tmp_path, overrides)
    return model, batch


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "name"), [("fid", "tiny:t5"), ("concat", "tiny:llama")])
def test_fusion_reader_with_pdist_makes_exactly_one_extra_no_grad_pass(tmp_path, variant, name):
    passes = []
    for loss in ("adist", "{adist: 1.0, pdist: 0.5}"):
        over = [
            f"model.variant={variant}",
            f"model.generator.name_or_path={name}",
            f"model.retriever_loss={loss}",
        ]
        model, batch = _fit_module(tmp_path / str(len(passes)), over)
        g = model.generator
        body = g.model.get_encoder() if variant == "fid" else g.model.base_model  # the passes' first module
        seen: list[bool] = []
        body.register_forward_hook(lambda m, i, o, seen=seen: seen.append(torch.is_grad_enabled()))
        model.train()
        loss_value = model.training_step(batch, 0)
        loss_value.backward()
        q_grad = [p.grad for p in model.retriever.query_encoder.parameters() if p.grad is not None]
        assert q_grad and any(g.abs().sum() > 0 for g in q_grad), loss  # the objective reaches the retriever
        passes.append(seen)
    assert passes == [[True], [True, False]]  # adist: the loss's pass; with pdist one more, without gradient


@pytest.mark.slow
def test_loop_pass_equals_the_marginal_readers_likelihoods(tmp_path):
    """The loop pass of FiD scores each (question, passage) row as the seq2seq marginal reader does."""
    from rag_lightning.readers.seq2seq import Generator

    model, batch = _fit_module(tmp_path, ["model.variant=fid", "model.generator.name_or_path=tiny:t5",
                                          "model.retriever_loss=pdist"])  # fmt: skip
    model.eval()
    scores, ids = model.retrieve(batch, model.retriever.n_docs)
    got = model.loop_logprobs(batch, ids)  # (B, K)
    fid = model.generator
    plain = Generator(fid.model, fid.tokenizer, fid.max_source_length)
    src, mask = model.sources(batch, ids)
    with torch.no_grad():
        want = plain.score(src, mask, batch["labels"]).lp.seq_lp
    assert got.shape == scores.shape and not got.requires_grad
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_fid_with_lora_checkpointing_and_bf16(arch):
    """LoRA adapters train (the base stays frozen), gradient checkpointing changes neither loss nor gradients,
    bf16 autocast stays close to float32, and the merged export reads the same."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}
    name = f"tiny:{arch}"
    src, mask = _fid(arch).build_sources(QS, PS, 3)
    labels = _labels(_fid(arch))
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        g = from_pretrained(name, variant="fid", max_source_length=9, lora=lora, gradient_checkpointing=ckpt)
        for n, p in g.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # lora_B starts at 0: give the adapters an update
        g.train()
        for m in g.modules():  # no dropout: the two runs must see the same computation
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        loss = -g.score(src, mask, labels).lp.tok_lp.sum()
        loss.backward()
        trainable = {n: p.grad for n, p in g.named_parameters() if p.requires_grad}
        assert (
            trainable
            and all("lora_" in n for n in trainable)
            and all(v is not None for v in trainable.values())
        )
        runs.append((loss.detach(), trainable, g))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for n, grad in runs[0][1].items():
        torch.testing.assert_close(grad, runs[1][1][n], rtol=1e-4, atol=1e-6)
    g = runs[0][2].eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        half = -g.score(src, mask, labels).lp.tok_lp.sum()
    with torch.no_grad():
        full = -g.score(src, mask, labels).lp.tok_lp.sum()
        g.model = merge_lora(g.model)
        merged = -g.score(src, mask, labels).lp.tok_lp.sum()
    assert half.dtype == torch.float32 and abs(half - full) < 0.02 * abs(full)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
