"""Decoder-only generators: batched, left-padded prompts score answers exactly like one unpadded prompt each."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertLMHeadModel

from rag_lightning.data.collate import causal_labels
from rag_lightning.models.marginalize import rag_sequence_nll, rag_token_nll
from rag_lightning.models.tiny import tiny_causal_lm, tiny_generator, tiny_tokenizer
from rag_lightning.readers import from_pretrained
from rag_lightning.readers.causal import CausalGenerator, prefix_lm_mask
from rag_lightning.tokenization import generator_kind

QUESTIONS = ["who was the first female nobel laureate?", "where is warsaw"]
PASSAGES = [
    "Warsaw / One of the most famous people born in Warsaw was Maria Skłodowska-Curie.",
    "x",
    "Poland / Warsaw is the capital and largest city of Poland, on the Vistula river. " * 3,
    "Nobel / The prize",
]
ANSWERS = ["Maria Skłodowska-Curie", "Poland"]


def _prefix_bert(copy: bool = False):
    """A tiny BERT as a prefix LM (is_decoder, output layer tied to the input embeddings), WordPiece vocab."""
    tok = tiny_tokenizer()
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, is_decoder=True, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return CausalGenerator(BertLMHeadModel(cfg), tok, max_source_length=40, prefix_lm=True, copy=copy)


def _generator(arch: str) -> CausalGenerator:
    """arch: gpt2 | llama | bert-prefix; with "-copy", the pointer head (its attention made peaked)."""
    arch, copy = arch.removesuffix("-copy"), arch.endswith("-copy")
    if arch == "bert-prefix":
        g = _prefix_bert(copy)
    else:
        model, tok = tiny_causal_lm(arch)
        assert tok.pad_token_id is None and tok.eos_token_id is not None  # as GPT-2 / Llama ship
        g = CausalGenerator(model, tok, max_source_length=40, copy=copy)
    if copy:
        torch.nn.init.normal_(g.pointer.query.weight, std=1.0)
    return g.double().eval()


def _batch(g: CausalGenerator, k: int = 2):
    tok = g.tokenizer
    qs = [tok(q, add_special_tokens=False).input_ids for q in QUESTIONS]
    ps = [tok(p, add_special_tokens=False).input_ids for p in PASSAGES]
    src, mask = g.build_sources(qs, ps, k)
    labels = causal_labels(tok, ANSWERS, max_length=25)
    return src, mask, labels


def _reference(g: CausalGenerator, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(answer | prompt) from one unpadded forward of prompt + answer[:-1]."""
    ids = torch.tensor([prompt + answer[:-1]])
    attn = torch.ones_like(ids)
    if g.prefix_lm:
        attn = prefix_lm_mask(attn, len(prompt), torch.float64)
    logits = g.model(input_ids=ids, attention_mask=attn).logits[0, len(prompt) - 1 :]  # (T, V)
    return torch.log_softmax(logits, -1)[torch.arange(len(answer)), answer].sum()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert-prefix"])
def test_row_logprob_equals_unpadded_forward(arch):
    g = _generator(arch)
    src, mask, labels = _batch(g)
    assert mask[:, -1].all() and not mask.all()  # left-padded: every prompt ends at the last column
    logits = g(src, mask, labels.repeat_interleave(2, 0))  # (B*K, T, V)
    assert logits.shape[:2] == (4, labels.shape[1]) and logits.dtype == torch.float64
    lp = torch.log_softmax(logits, -1)
    for row in range(4):
        answer = [t for t in labels[row // 2].tolist() if t != -100]
        prompt = src[row][mask[row].bool()].tolist()
        got = lp[row, torch.arange(len(answer)), answer].sum()
        torch.testing.assert_close(got, _reference(g, prompt, answer), rtol=1e-10, atol=1e-10)
    # the RAG losses apply unchanged: with one passage per question they are the plain NLL
    one = logits.view(2, 2, *logits.shape[1:])[:, 0]  # (B, T, V) passage 0
    nll = torch.nn.functional.cross_entropy(one.transpose(1, 2), labels, reduction="none").sum(-1)
    for fn in (rag_token_nll, rag_sequence_nll):
        torch.testing.assert_close(fn(one, torch.zeros(2, 1, dtype=torch.float64), labels), nll)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert-prefix"])
def test_hidden_states_times_output_layer_is_forward(arch):
    g = _generator(arch)
    src, mask, labels = _batch(g)
    labels = labels.repeat_interleave(2, 0)
    h = g.hidden_states(src, mask, labels)  # (B*K, T, H)
    w, b = g.output_layer()
    assert h.shape == (4, labels.shape[1], w.shape[1])
    logits = h @ w.T + (b if b is not None else 0)
    torch.testing.assert_close(logits, g(src, mask, labels))


def test_prompt_template_and_truncation():
    g = _generator("llama")
    tok = g.tokenizer
    q = tok("where is warsaw", add_special_tokens=False).input_ids
    long_p = tok(PASSAGES[2], add_special_tokens=False).input_ids
    src, mask = g.build_sources([q], [long_p, [5]], 2)
    assert src.shape[1] == g.max_source_length  # the long passage was cut to fit
    text = tok.decode(src[0][mask[0].bool()])
    assert text.startswith(tok.bos_token + "context: Poland") and text.endswith(
        " question: where is warsaw answer:"
    )
    assert src[1, 0] == g.pad_token_id == tok.eos_token_id and mask[1, 0] == 0  # short row: left padding
    fixed = len(g.build_sources([[]], [[]], 1)[0][0])  # template tokens alone
    g.max_source_length = fixed + 2  # room for two question tokens: the passage goes first
    src, mask = g.build_sources([q], [long_p], 1)
    assert src[0].tolist() == g.build_sources([q[:2]], [[]], 1)[0][0].tolist()
    with pytest.raises(ValueError, match="once each"):
        CausalGenerator(g.model, tok, template="question: {question} answer:")


def test_causal_labels_no_bos_eos_last():
    tok = tiny_causal_lm("llama")[1]  # adds BOS to every text
    labels = causal_labels(tok, ["Poland", "Maria Skłodowska-Curie"], max_length=4)
    assert (labels[:, 0] != tok.bos_token_id).all()
    assert (
        labels[0].tolist()[: 1 + len(tok(" Poland", add_special_tokens=False).input_ids)][-1]
        == tok.eos_token_id
    )
    assert labels.shape[1] == 4 and labels[1, -1] == tok.eos_token_id  # truncated, EOS kept
    assert tok.decode(labels[0][labels[0] >= 0]) == " Poland" + tok.eos_token


def test_kind_auto_and_save_roundtrip(tmp_path):
    model, tok = tiny_causal_lm("gpt2")
    template = "question: {question} passage: {passage} answer:"
    g = CausalGenerator(model, tok, max_source_length=40, template=template).eval()
    g.save_pretrained(tmp_path / "gpt2")
    plain = tmp_path / "plain"  # a bare save_pretrained directory, as any decoder-only checkpoint
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    bart = tmp_path / "bart"
    tiny_generator()[0].save_pretrained(bart)
    assert generator_kind(str(plain)) == "causal" and generator_kind(str(tmp_path / "gpt2")) == "causal"
    assert generator_kind(str(bart)) == "seq2seq" and generator_kind("tiny:llama") == "causal"
    g2 = from_pretrained(str(tmp_path / "gpt2"), max_source_length=40).eval()
    assert isinstance(g2, CausalGenerator) and g2.template == template and g2.tokenizer.pad_token_id is None
    src, mask, labels = _batch(g)
    with torch.no_grad():
        torch.testing.assert_close(
            g2(src, mask, labels.repeat_interleave(2, 0)), g(src, mask, labels.repeat_interleave(2, 0))
        )
    assert isinstance(from_pretrained(str(plain), kind="causal"), CausalGenerator)
    with pytest.raises(ValueError, match="kind"):
        generator_kind(str(plain), "decoder")


def test_prefix_lm_roundtrip_keeps_mode(tmp_path):
    g = _prefix_bert()
    g.save_pretrained(tmp_path)
    g2 = from_pretrained(str(tmp_path), max_source_length=40)  # auto: the saved settings say causal
    assert isinstance(g2, CausalGenerator) and g2.prefix_lm and g2.model.config.is_decoder
    w, _ = g2.output_layer()
    assert w.data_ptr() == g2.model.get_input_embeddings().weight.data_ptr()  # tied to the input embeddings


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert-prefix", "llama-copy", "bert-prefix-copy"])
def test_cached_decoding_steps_equal_training_forward(arch):
    """Prompt once (bidirectional in prefix-LM mode), then one answer token at a time with the KV cache: the
    same logits as the teacher-forced training forward."""
    from rag_lightning.models.decode import CausalSteps

    g = _generator(arch)
    src, mask, labels = _batch(g)
    labels = labels.repeat_interleave(2, 0)  # (R, T)
    want = g(src, mask, labels)  # (R, T, V)
    steps = CausalSteps(g, src, mask)
    rows = torch.arange(4)
    logits, past = steps.first(rows)
    got = [logits]
    for t in range(1, labels.shape[1]):
        logits, past = steps.next(labels[:, t - 1].clamp(min=0), rows, past, t)
        got.append(logits)
    got = torch.stack(got, 1)  # (R, T, V)
    real = labels >= 0
    torch.testing.assert_close(got[real], want[real].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_prompt", [False, True])
def test_copy_head_memory_follows_reordered_cache_rows(keep_prompt):
    """Decoding with the copy head: the prompt's keys ride with the KV cache; after selecting / re-ordering
    cache rows (beams) each row still mixes with its own prompt, as the training forward does."""
    from rag_lightning.models.decode import CausalSteps

    g = _generator("llama-copy")
    src, mask, labels = _batch(g)
    labels = labels.repeat_interleave(2, 0)  # (R, T)
    want = g(src, mask, labels).float()  # (R, T, V)
    steps = CausalSteps(g, src, mask, keep_prompt=keep_prompt)
    rows = torch.tensor([3, 1, 2])  # cache row j <- source row rows[j]
    with torch.no_grad():
        logits, past = steps.first(rows)
        torch.testing.assert_close(logits, want[rows, 0], rtol=1e-5, atol=1e-5)
        order = torch.tensor([2, 0, 1])  # beam re-ordering: cache row j <- old row order[j]
        past = steps.reorder(past, order, same_source=False)
        rows = rows[order]
        logits, past = steps.next(labels[rows, 0], rows, past, 1)
    torch.testing.assert_close(logits, want[rows, 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, g.__class__.forward(_without_copy(g), src, mask, labels).float())


def _without_copy(g: CausalGenerator) -> CausalGenerator:
    plain = CausalGenerator(g.model, g.tokenizer, max_source_length=g.max_source_length)
    return plain.double().eval()


def test_copy_head_roundtrip_and_kind_check(tmp_path):
    g = _generator("llama-copy")
    g.save_pretrained(tmp_path / "copy")
    g2 = from_pretrained(str(tmp_path / "copy")).double().eval()  # the settings file says copy
    assert g2.pointer is not None
    for k, v in g.pointer.state_dict().items():
        assert torch.equal(g2.pointer.state_dict()[k], v), k
    src, mask, labels = _batch(g)
    with torch.no_grad():
        torch.testing.assert_close(
            g2(src, mask, labels.repeat_interleave(2, 0)), g(src, mask, labels.repeat_interleave(2, 0))
        )
    assert from_pretrained(str(tmp_path / "copy"), copy=False).pointer is None
    fresh = from_pretrained("tiny:llama", copy=True)  # a plain LM: a new head
    assert fresh.pointer is not None and fresh.pointer.gate.bias.item() == 0.0
    with pytest.raises(ValueError, match="copy apply to kind=causal only"):
        from_pretrained("tiny:bart", copy=True)


def test_datamodule_builds_causal_targets_for_causal_generators():
    from rag_lightning.data.collate import Item, QACollator
    from rag_lightning.data.datamodule import QADataModule
    from rag_lightning.data.readers import QAExample
    from rag_lightning.tokenization import load_tokenizer

    kind = {name: QADataModule(query_tokenizer="tiny:bert", generator_tokenizer=name)._causal
            for name in ("tiny:bart", "tiny:gpt2", "tiny:llama")}  # fmt: skip
    assert kind == {"tiny:bart": False, "tiny:gpt2": True, "tiny:llama": True}
    assert QADataModule(generator_tokenizer="tiny:bart", generator_kind="causal")._causal
    tok = load_tokenizer("tiny:llama")
    assert tok.pad_token_id is None and tok("x").input_ids[0] == tok.bos_token_id
    collate = QACollator(load_tokenizer("tiny:bert"), tok, causal=True)
    batch = collate([Item(QAExample(question="where is warsaw", answers=["Poland"])),
                     Item(QAExample(question="who", answers=["Maria Skłodowska-Curie"]))])  # fmt: skip
    labels = batch["labels"]
    assert (labels[:, 0] != tok.bos_token_id).all()
    ends = (labels != -100).sum(1) - 1
    assert (labels[torch.arange(2), ends] == tok.eos_token_id).all()


@torch.no_grad()
def test_peft_wrapped_model_scores_through_its_adapters():
    from peft import LoraConfig, get_peft_model

    g = _generator("llama")
    g.model = get_peft_model(g.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in g.model.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.5)  # non-zero adapters: they change the output
    src, mask, labels = _batch(g)
    row = 2
    answer = [t for t in labels[1].tolist() if t != -100]
    prompt = src[row][mask[row].bool()].tolist()
    got = torch.log_softmax(g(src, mask, labels.repeat_interleave(2, 0))[row], -1)
    want = (
        g.model(input_ids=torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1 :].log_softmax(-1)
    )
    torch.testing.assert_close(got[: len(answer)], want)
    with g.model.disable_adapter():  # and without them the scores differ
        plain = torch.log_softmax(g(src, mask, labels.repeat_interleave(2, 0))[row], -1)
    assert not torch.allclose(plain, got)


def test_config_overrides_reach_the_loaded_model(tmp_path, minilm_dir):
    """model.generator.config_overrides (e.g. no dropout for a short run) change the loaded config."""
    drop = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    g = from_pretrained(minilm_dir, kind="causal", prefix_lm=True, num_layers=1, config_overrides=drop)
    assert g.model.config.hidden_dropout_prob == 0.0 and g.model.config.attention_probs_dropout_prob == 0.0
    p = [m.p for m in g.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert p and all(x == 0.0 for x in p)
    b2b = from_pretrained(minilm_dir, kind="bert2bert", num_layers=1, config_overrides=drop)
    assert b2b.model.config.encoder.hidden_dropout_prob == b2b.model.config.decoder.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match="not for tiny"):
        from_pretrained("tiny:gpt2", kind="causal", config_overrides=drop)


@pytest.mark.parametrize("name", ["tiny:gpt2", "tiny:llama"])
def test_frozen_layers_freeze_embeddings_and_bottom_blocks(name):
    g = from_pretrained(name, kind="causal", max_source_length=24, frozen_layers=1)
    lm = g._lm
    n = lm.config.num_hidden_layers
    assert n >= 2
    assert not lm.get_input_embeddings().weight.requires_grad  # and the output layer when tied
    frozen = {k for k, p in lm.named_parameters() if not p.requires_grad}
    trainable = {k for k, p in lm.named_parameters() if p.requires_grad}
    assert any(".0." in k for k in frozen) and not any(".0." in k for k in trainable)
    assert any(f".{n - 1}." in k for k in trainable)
    src, mask = g.build_sources([[5, 6]], [[7, 8, 9]], 1)
    g(src, mask, torch.tensor([[11, 12, g.eos_token_id]])).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in lm.parameters() if not p.requires_grad)
    assert all(p.grad is not None for k, p in lm.named_parameters() if p.requires_grad and f".{n - 1}." in k)
    with pytest.raises(ValueError, match="frozen_layers"):
        from_pretrained(name, kind="causal", frozen_layers=n + 1)
    with pytest.raises(ValueError, match="kind=causal only"):
        from_pretrained("tiny:bart", frozen_layers=1)
