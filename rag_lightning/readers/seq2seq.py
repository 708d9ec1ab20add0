"""Seq2seq reader (RAG-Token / RAG-Sequence marginal): one encoder-decoder pass per (question, passage) row.

Input of row b*K + k is `template(question_b, passage_{b,k})`, the tokenizer's own sentence-pair template
(BERT: [CLS] q [SEP] p [SEP]; BART: <s> q </s></s> p </s>; T5: q </s> p </s>), truncated to
`max_source_length` from the passage side so the question is never cut. Any ``AutoModelForSeq2SeqLM`` (BART,
T5, ...) or a bert2bert ``EncoderDecoderModel``; ``readers.from_pretrained`` picks the reader class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    PreTrainedTokenizerBase,
)

from rag_lightning.preflight import require_model
from rag_lightning.readers.base import ReaderBase, States, join_wordpiece_punct  # noqa: F401 (re-exported)
from rag_lightning.readers.lora import apply_lora, merge_lora, set_special_ids
from rag_lightning.tokenization import generator_kind


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


class Generator(ReaderBase, nn.Module):
    """A Hugging Face seq2seq model plus the input assembly RAG needs (the marginal seq2seq reader)."""

    kind = "seq2seq"

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
        self._head = _head_kind(model)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_source_length: int | None = None,
        kind: str = "auto",
        tie_encoder_decoder: bool = False,
        gradient_checkpointing: bool = False,
        num_layers: int | None = None,
        template: str | None = None,
        prefix_lm: bool | None = None,
        lora: Mapping[str, Any] | None = None,
        empty_init: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        frozen_layers: int = 0,
        copy: bool | None = None,
    ) -> Generator:
        """`kind`: "seq2seq" (BART, T5, ...), "bert2bert" (warm-start an EncoderDecoderModel from one encoder
        checkpoint, e.g. MiniLM) or "auto" (seq2seq for encoder-decoder configs, else bert2bert; decoder-only
        models are `readers.causal`'s, and `readers.from_pretrained` picks the class for every kind).
        bert2bert: `num_layers` keeps the first N layers of the checkpoint (in both encoder and decoder).
        `lora`: LoRA adapters on the generator (see `apply_lora`), for every kind. `empty_init`: build the
        model on the meta device, without weights (FSDP ranks > 0, see `models/sharding.py`).
        `config_overrides`: attributes of the transformers config to change, e.g. `{dropout: 0.0}` (BART) or
        `{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}` (BERT family; bert2bert: both halves).
        `frozen_layers`, `copy`, `template`, `prefix_lm`: causal readers only (an error here)."""
        kind = generator_kind(name_or_path, kind)
        overrides = dict(config_overrides or {})
        if kind == "causal":
            raise ValueError(f"{name_or_path}: a decoder-only model; build it with readers.from_pretrained")
        if frozen_layers or copy:
            raise ValueError(f"model.generator.frozen_layers / copy apply to kind=causal only, not {kind}")
        if template is not None or prefix_lm:
            raise ValueError(f"model.generator.template / prefix_lm apply to kind=causal only, not {kind}")
        if name_or_path.startswith("tiny:"):
            from rag_lightning.models.tiny import tiny_generator, tiny_t5

            if overrides:
                raise ValueError("model.generator.config_overrides: not for tiny: models (built in code)")
            builders = {"tiny:bart": tiny_generator, "tiny:t5": tiny_t5}
            if name_or_path not in builders:
                raise ValueError(f"unknown tiny seq2seq model {name_or_path!r}: {sorted(builders)}")
            model, tok = builders[name_or_path]()
            if gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return cls(model, tok, max_source_length or 128, lora=lora)
        require_model(name_or_path, "model.generator.name_or_path")
        config = AutoConfig.from_pretrained(name_or_path, **overrides)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        if kind == "bert2bert" and not config.is_encoder_decoder:
            layers = overrides if num_layers is None else {**overrides, "num_hidden_layers": num_layers}
            if empty_init:  # the architecture from_encoder_decoder_pretrained builds, without weights
                enc = AutoConfig.from_pretrained(
                    name_or_path, **layers, is_decoder=False, add_cross_attention=False
                )
                dec = AutoConfig.from_pretrained(
                    name_or_path, **layers, is_decoder=True, add_cross_attention=True
                )
                both = EncoderDecoderConfig.from_encoder_decoder_configs(
                    enc, dec, tie_encoder_decoder=tie_encoder_decoder
                )
                with torch.device("meta"):
                    model = EncoderDecoderModel(config=both)
            else:
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
        elif empty_init:  # FSDP ranks > 0: the architecture on the meta device, weights come from rank 0
            with torch.device("meta"):
                if config.model_type == "encoder-decoder":
                    model = EncoderDecoderModel(config=config)
                else:
                    model = AutoModelForSeq2SeqLM.from_config(config)
        elif config.model_type == "encoder-decoder":
            model = EncoderDecoderModel.from_pretrained(name_or_path, config=config)
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, config=config)
        if gradient_checkpointing:  # activations recomputed in backward, layer by layer
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return cls(model, tok, max_source_length or 128, lora=lora)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """A plain transformers directory (`from_pretrained` loads it); LoRA adapters are merged first, in
        place, so the generator is a plain model afterwards."""
        self.model = merge_lora(self.model)
        set_special_ids(self.model, self.eos_token_id, self.pad_token_id, self.decoder_start_token_id)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def unsupported_by_transformers(self) -> list[str]:
        """What a plain transformers model loaded from `save_pretrained`'s directory would not do: nothing."""
        return []

    def assemble_sources(
        self, q: torch.Tensor, q_len: torch.Tensor, p: torch.Tensor, p_len: torch.Tensor, n_docs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorized template: q (B, Lq) / q_len (B,), p (B*K, Lp) / p_len (B*K,) right-padded token ids ->
        src ids, mask (B*K, S), S = the longest assembled row; passages truncated so S <= max_source_length."""
        r = p.shape[0]
        if r != q.shape[0] * n_docs:
            raise ValueError(f"expected {q.shape[0]} x {n_docs} passages, got {r}")
        budget = self.max_source_length - len(self.prefix) - len(self.middle) - len(self.suffix)
        ql = q_len.clamp(max=budget).repeat_interleave(n_docs)  # (R,)
        pl = torch.minimum(p_len, budget - ql)  # (R,)
        qr = q.repeat_interleave(n_docs, 0)  # (R, Lq)
        pieces = [(self.prefix, None), (qr, ql), (self.middle, None), (p, pl), (self.suffix, None)]
        toks, keep = [], []
        for x, n in pieces:
            if n is None:  # constant special ids
                x = torch.tensor(x, dtype=torch.long).expand(r, len(x))
                keep.append(torch.ones(x.shape, dtype=torch.bool))
            else:
                keep.append(torch.arange(x.shape[1]) < n[:, None])
            toks.append(x.long())
        toks, keep = torch.cat(toks, 1), torch.cat(keep, 1)  # (R, W)
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # kept entries first, in order
        order = order[:, : max(1, int(keep.sum(1).max()))]  # (R, S)
        kept = keep.gather(1, order)
        return toks.gather(1, order).masked_fill_(~kept, self.pad_token_id), kept.long()

    def forward(self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B*K, T, V) for labels (B*K, T) (-100 = padding)."""
        dec = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        return self.model(input_ids=src, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits

    # The fused loss (models.marginalize.answer_logprobs_fused) needs the two halves of `forward`:
    # forward(src, mask, labels) == hidden_states(src, mask, labels) @ W.T + bias, (W, bias) = output_layer().
    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight (V, H), bias (V,) or None) of the LM head; None for an architecture without a split
        (then RagModule scores from the logits of `forward`)."""
        m = self.model
        if self._head == "bart":
            return m.get_output_embeddings().weight, m.final_logits_bias.view(-1)
        if self._head == "t5":
            return m.get_output_embeddings().weight, None
        if self._head == "bert2bert":
            head = m.decoder.cls.predictions.decoder
            return head.weight, head.bias
        return None

    def hidden_states(self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final decoder states (B*K, T, H) as the LM head sees them (after T5's d_model**-0.5 rescaling, after
        BERT's prediction-head transform), for labels (B*K, T) (-100 = padding)."""
        return self._read_states(src, mask, labels).hidden

    def _read_states(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        segments: torch.Tensor | None = None,
        attention: bool = False,
    ) -> States:
        """What the fused loss reads: `hidden_states`; no copy head, no passage attention (one per row)."""
        return States(self.decoder_states(self.encode(src, mask), mask, labels)[0], None)

    def encode(self, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder states (R, S, H) of sources (R, S), as the decoder's cross-attention reads them."""
        m = self.model
        if self._head is None:
            raise NotImplementedError(
                f"{type(m).__name__}: no hidden-states / output-layer split (output_layer() is None)"
            )
        enc = m.get_encoder()(input_ids=src, attention_mask=mask)[0]
        if self._head == "bert2bert" and hasattr(m, "enc_to_dec_proj"):
            enc = m.enc_to_dec_proj(enc)
        return enc

    def decoder_states(
        self, enc: torch.Tensor, enc_mask: torch.Tensor, labels: torch.Tensor, attention: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Teacher-forced decoder over encoder states enc (R, N, H) / enc_mask (R, N) for labels (R, T): final
        states (R, T, H) as the LM head sees them and, with ``attention``, the cross-attention probabilities
        per layer ((R, heads, T, N) each; needs the eager attention implementation)."""
        dec = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        m = self.model
        kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=False)
        if attention:
            kw.update(output_attentions=True, return_dict=True)
        if self._head == "bert2bert":
            out = m.decoder.bert(input_ids=dec, **kw)
            h = m.decoder.cls.predictions.transform(out[0])
        else:
            out = m.get_decoder()(input_ids=dec, **kw)
            h = out[0]
            if self._head == "t5" and m.config.scale_decoder_outputs:
                h = h * (m.model_dim**-0.5)
        return h, (out.cross_attentions if attention else None)


def _head_kind(model: nn.Module) -> str | None:
    """Which hidden-states / output-layer split `Generator.hidden_states` knows for this model, if any."""
    if isinstance(model, EncoderDecoderModel):
        dec = model.decoder
        ok = hasattr(dec, "bert") and hasattr(dec, "cls") and hasattr(dec.cls, "predictions")
        return "bert2bert" if ok else None
    if hasattr(model, "final_logits_bias") and model.base_model is not model:  # BART, mBART, Pegasus, Marian
        return "bart"
    if model.config.model_type in ("t5", "mt5") and hasattr(model.config, "scale_decoder_outputs"):
        return "t5"
    return None
