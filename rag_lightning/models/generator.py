"""Seq2seq generator: assembles (question, passage) inputs from token ids and scores targets.

Input of row b*K + k is `template(question_b, passage_{b,k})`, the tokenizer's own sentence-pair template
(BERT: [CLS] q [SEP] p [SEP]; BART: <s> q </s></s> p </s>; T5: q </s> p </s>), truncated to
`max_source_length` from the passage side so the question is never cut.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    EncoderDecoderModel,
    PreTrainedTokenizerBase,
)

from rag_lightning.preflight import require_model
from rag_lightning.retrieval.embed import pad_batch


def pair_template(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int], list[int]]:
    """(prefix, middle, suffix) special ids the tokenizer puts around a sentence pair."""
    a = tok("alpha", add_special_tokens=False).input_ids
    b = tok("omega", add_special_tokens=False).input_ids
    full = tok("alpha", "omega").input_ids
    i = next(i for i in range(len(full)) if full[i : i + len(a)] == a)
    j = next(j for j in range(i + len(a), len(full)) if full[j : j + len(b)] == b)
    return full[:i], full[i + len(a) : j], full[j + len(b) :]


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: (B, T) labels (-100 = pad) -> (B, T) [start, y_1 .. y_{T-1}]."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill_(out == -100, pad_id)


def apply_lora(model: nn.Module, lora: Mapping[str, Any] | None) -> nn.Module:
    """Wrap `model` with peft LoRA adapters (`lora`: r, alpha, dropout, target_modules; None = no LoRA).

    The base weights are frozen, only the adapters train. The returned `peft.PeftModel` forwards calls and
    attributes to the model (`get_encoder`, `config`, `generate`), so decoding needs no change.
    `target_modules: null` takes peft's default for the architecture (e.g. q_proj, v_proj)."""
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    unknown = set(lora) - {"r", "alpha", "dropout", "target_modules"}
    if unknown:
        raise ValueError(
            f"model.generator.lora: unknown keys {sorted(unknown)} (r, alpha, dropout, target_modules)"
        )
    targets = lora.get("target_modules")
    config = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=float(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets) if targets is not None else None,
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain transformers model with the LoRA updates folded into the base weights (in place)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


class Generator(nn.Module):
    """A Hugging Face seq2seq model plus the input assembly RAG needs."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_source_length: int = 128,
        lora: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        encoder = model.get_encoder()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # bert2bert: the encoder's pooler feeds nothing (and DDP would complain)
        self.model = apply_lora(model, lora)
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.prefix, self.middle, self.suffix = pair_template(tokenizer)
        cfg = model.config
        self.pad_token_id = tokenizer.pad_token_id
        self.decoder_start_token_id = cfg.decoder_start_token_id
        self.eos_token_id = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        if self.decoder_start_token_id is None:
            raise ValueError("generator config has no decoder_start_token_id")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_source_length: int = 128,
        kind: str = "auto",
        tie_encoder_decoder: bool = False,
        gradient_checkpointing: bool = False,
        num_layers: int | None = None,
        lora: Mapping[str, Any] | None = None,
    ) -> Generator:
        """`kind`: "seq2seq" (BART, T5, ...), "bert2bert" (warm-start an EncoderDecoderModel from one encoder
        checkpoint, e.g. MiniLM), or "auto" (seq2seq unless the checkpoint is encoder-only). bert2bert only:
        `num_layers` keeps the first N layers of the checkpoint in both encoder and decoder (a cheaper model).
        `lora`: see `apply_lora`."""
        if name_or_path.startswith("tiny:"):
            from rag_lightning.models.tiny import tiny_generator

            model, tok = tiny_generator()
            return cls(model, tok, max_source_length, lora=lora)
        require_model(name_or_path, "model.generator.name_or_path")
        config = AutoConfig.from_pretrained(name_or_path)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        if kind == "auto":
            kind = "seq2seq" if config.is_encoder_decoder else "bert2bert"
        if kind == "bert2bert" and not config.is_encoder_decoder:
            layers = {} if num_layers is None else {"num_hidden_layers": num_layers}
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(
                name_or_path,
                name_or_path,
                tie_encoder_decoder=tie_encoder_decoder,
                **{f"encoder_{k}": v for k, v in layers.items()},
                **{f"decoder_{k}": v for k, v in layers.items()},
            )
            model.config.decoder_start_token_id = tok.cls_token_id
            model.config.pad_token_id = tok.pad_token_id
            model.config.eos_token_id = tok.sep_token_id
        elif config.model_type == "encoder-decoder":
            model = EncoderDecoderModel.from_pretrained(name_or_path)
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return cls(model, tok, max_source_length, lora=lora)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """A plain transformers directory (`from_pretrained` loads it); LoRA adapters are merged first, in
        place, so the generator is a plain model afterwards."""
        self.model = merge_lora(self.model)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def build_sources(
        self, questions: Sequence[Sequence[int]], passages: Sequence[Sequence[int]], n_docs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """questions: B id lists (no specials); passages: B*K id lists -> src ids, mask (B*K, S)."""
        if len(passages) != len(questions) * n_docs:
            raise ValueError(f"expected {len(questions)} x {n_docs} passages, got {len(passages)}")
        n_special = len(self.prefix) + len(self.middle) + len(self.suffix)
        budget = self.max_source_length - n_special
        rows = []
        for i, p in enumerate(passages):
            q = list(questions[i // n_docs])[:budget]
            rows.append(self.prefix + q + self.middle + list(p)[: budget - len(q)] + self.suffix)
        return pad_batch(rows, self.pad_token_id)  # (B*K, S)

    def forward(self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B*K, T, V) for labels (B*K, T) (-100 = padding)."""
        dec = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        return self.model(input_ids=src, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits

    def decode(self, ids: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [join_wordpiece_punct(t) for t in texts] if self._wordpiece else texts

    @property
    def _wordpiece(self) -> bool:
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        return type(model).__name__ == "WordPiece"


_NUM_PUNCT = re.compile(r"(?<=\d) ?([.,:]) ?(?=\d)")  # 0. 2 -> 0.2, 1, 000 -> 1,000, 10 : 30 -> 10:30
_WORD_PUNCT = re.compile(r"(?<=\w) ?([-/]) ?(?=\w)")  # mid - 14th -> mid-14th, and / or -> and/or


def join_wordpiece_punct(text: str) -> str:
    """WordPiece loses the spacing around punctuation ("0.2" decodes as "0. 2", "mid-14th" as "mid - 14th");
    SQuAD normalization then drops the punctuation and splits the token. Rejoin punctuation between word
    characters where that is unambiguous: `.,:` between digits, `-/` between word characters."""
    return _WORD_PUNCT.sub(r"\1", _NUM_PUNCT.sub(r"\1", text))
