"""Encoders and generator: real `from_pretrained` code paths through `save_pretrained` to a temp dir."""

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRQuestionEncoder,
)

from rag_lightning.models.encoders import Encoder
from rag_lightning.models.tiny import tiny_tokenizer
from rag_lightning.readers import from_pretrained
from rag_lightning.readers.seq2seq import Generator, join_wordpiece_punct, pair_template, shift_right


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _tiny_bert(tok) -> BertModel:
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)  # fmt: skip
    return BertModel(cfg)


def test_encoder_roundtrip_mean_and_cls(tmp_path, tok):
    model = _tiny_bert(tok).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    x = tok(["who wrote hamlet", "paris"], padding=True, return_tensors="pt")
    cls_enc = Encoder.from_pretrained(str(tmp_path), pooling="cls").eval()
    mean_enc = Encoder.from_pretrained(str(tmp_path), pooling="mean").eval()
    h = model(**x).last_hidden_state
    torch.testing.assert_close(cls_enc(x.input_ids, x.attention_mask), h[:, 0])
    m = x.attention_mask.unsqueeze(-1).float()
    torch.testing.assert_close(mean_enc(x.input_ids, x.attention_mask), (h * m).sum(1) / m.sum(1))
    assert cls_enc.dim == 16


def test_mean_pooling_ignores_padding(tmp_path, tok):
    enc = Encoder(_tiny_bert(tok).eval(), tok, pooling="mean")
    a = tok(["who wrote hamlet"], return_tensors="pt")
    b = tok(["who wrote hamlet", "a much longer question about something else entirely"], padding=True,
            return_tensors="pt")  # fmt: skip
    torch.testing.assert_close(enc(a.input_ids, a.attention_mask)[0], enc(b.input_ids, b.attention_mask)[0])


def test_dpr_encoder_defaults_to_pooler(tmp_path, tok):
    cfg = DPRConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, projection_dim=8)  # fmt: skip
    DPRQuestionEncoder(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = Encoder.from_pretrained(str(tmp_path))
    assert enc.pooling == "pooler" and enc.dim == 8
    x = tok(["q"], return_tensors="pt")
    assert enc(x.input_ids, x.attention_mask).shape == (1, 8)


def test_bad_pooling():
    with pytest.raises(ValueError, match="pooling"):
        Encoder(torch.nn.Linear(1, 1), None, pooling="max")


def test_pair_templates(tok):
    assert pair_template(tok) == ([tok.cls_token_id], [tok.sep_token_id], [tok.sep_token_id])


def test_build_sources_truncates_passage_never_question(tok):
    gen = from_pretrained("tiny:bart", max_source_length=10)
    q = [[11, 12, 13]]
    src, mask = gen.build_sources(q, [list(range(100, 120)), [7]], n_docs=2)  # (B*K, S)
    assert src.shape == (2, 10)
    assert src[0].tolist() == [101, 11, 12, 13, 102, 100, 101, 102, 103, 102]
    assert src[1].tolist()[:7] == [101, 11, 12, 13, 102, 7, 102] and mask[1].sum() == 7
    long_q = [list(range(200, 230))]  # longer than the budget: cut to fit, passage gets nothing
    src, _ = gen.build_sources(long_q, [[1, 2]], n_docs=1)
    assert src.shape[1] == 10 and src[0, 0] == 101
    with pytest.raises(ValueError, match="expected 1 x 2 passages"):
        gen.build_sources(q, [[1]], n_docs=2)


def test_shift_right():
    labels = torch.tensor([[5, 6, 7], [8, -100, -100]])
    assert shift_right(labels, 2, 0).tolist() == [[2, 5, 6], [2, 8, 0]]


def test_generator_seq2seq_roundtrip(tmp_path, tok):
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=102)  # fmt: skip
    BartForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gen = from_pretrained(str(tmp_path), max_source_length=16)
    assert isinstance(gen.model, BartForConditionalGeneration)
    assert gen.decoder_start_token_id == 102 and gen.eos_token_id == 102
    src, mask = gen.build_sources([[5, 6]], [[7, 8, 9]], 1)
    logits = gen(src, mask, torch.tensor([[5, 102]]))
    assert logits.shape == (1, 2, tok.vocab_size)


def test_generator_bert2bert_warm_start(tmp_path, tok):
    _tiny_bert(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gen = from_pretrained(str(tmp_path), kind="auto", max_source_length=16)
    assert gen.model.config.model_type == "encoder-decoder"
    assert gen.decoder_start_token_id == tok.cls_token_id
    src, mask = gen.build_sources([[5, 6]], [[7, 8, 9]], 1)
    assert gen(src, mask, torch.tensor([[5, 102]])).shape == (1, 2, tok.vocab_size)
    out = tmp_path / "saved"
    gen.save_pretrained(out)  # an EncoderDecoderModel dir loads back as one
    again = from_pretrained(str(out))
    assert again.model.config.model_type == "encoder-decoder"


@pytest.mark.parametrize(
    "raw, joined",
    [("0. 2", "0.2"), ("mid - 14th century", "mid-14th century"), ("earth's crustal rock", "earth's crustal rock"),
     ("1, 000", "1,000"), ("10 : 30", "10:30"), ("paris, france", "paris, france"),
     ("st. louis", "st. louis"), ("and / or", "and/or")],
)  # fmt: skip
def test_join_wordpiece_punct(raw, joined):
    assert join_wordpiece_punct(raw) == joined


def test_wordpiece_decode_round_trips_numbers(tok):
    gen = from_pretrained("tiny:bart")
    ids = torch.tensor([tok("0.2 and mid-14th", add_special_tokens=False).input_ids])
    assert gen.decode(ids) == ["0.2 and mid-14th"]


def _t5(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                   num_heads=2, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("arch", ["bart", "bert2bert", "t5"])
def test_hidden_states_times_output_layer_is_forward(arch, tok, tmp_path):
    """The fused loss's split: hidden_states @ W.T + bias == forward's logits, for each supported family."""
    if arch == "bart":
        gen = from_pretrained("tiny:bart", max_source_length=16)
        torch.nn.init.normal_(gen.model.final_logits_bias)  # non-zero, so a missing bias would show
    elif arch == "bert2bert":
        _tiny_bert(tok).save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        gen = from_pretrained(str(tmp_path), kind="bert2bert", max_source_length=16)
    else:
        gen = Generator(_t5(tok), tok, max_source_length=16)
    gen.eval()
    src, mask = gen.build_sources([[5, 6], [9]], [[7, 8, 9], [3], [4, 4], [5, 6, 7, 8]], 2)
    labels = torch.tensor([[5, 102, -100], [5, 6, 102], [8, 102, -100], [8, -100, -100]])
    w, b = gen.output_layer()
    h = gen.hidden_states(src, mask, labels)  # (B*K, T, H)
    assert h.shape[:2] == labels.shape and w.shape == (tok.vocab_size, h.shape[-1])
    torch.testing.assert_close(
        torch.nn.functional.linear(h, w, b), gen(src, mask, labels), atol=1e-5, rtol=1e-5
    )


def test_assemble_sources_matches_lists(tok):
    gen = from_pretrained("tiny:bart", max_source_length=12)
    qs = [[11, 12, 13], list(range(30, 45))]
    ps = [list(range(100, 120)), [7], [], [1, 2]]
    src, mask = gen.build_sources(qs, ps, 2)
    for r in range(4):  # the template row by row, from the definition
        q = qs[r // 2][:9]
        want = [101, *q, 102, *ps[r][: 9 - len(q)], 102]
        assert src[r, : len(want)].tolist() == want and mask[r].sum() == len(want)
        assert (src[r, len(want) :] == gen.pad_token_id).all()
