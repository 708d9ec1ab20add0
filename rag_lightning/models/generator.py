"""Seq2seq generator: assembles (question, passage) inputs from token ids and scores targets.

``Generator.from_pretrained`` is the one factory (Hydra ``_target_``) for every kind: decoder-only models
(``kind=causal``, or ``auto`` on a decoder-only config) come back as a ``models.causal.CausalGenerator``.

Input of row b*K + k is `template(question_b, passage_{b,k})`, the tokenizer's own sentence-pair template
(BERT: [CLS] q [SEP] p [SEP]; BART: <s> q </s></s> p </s>; T5: q </s> p </s>), truncated to
`max_source_length` from the passage side so the question is never cut.
"""

from __future__ import annotations

import os
import re
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

from rag_lightning.models.causal import CausalGenerator, ListSources
from rag_lightning.preflight import require_model
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


def apply_lora(model: nn.Module, lora: Mapping[str, Any] | None) -> nn.Module:
    """Add peft LoRA adapters to `model` in place (`lora`: r, alpha, dropout, target_modules; None = no LoRA)
    and return it: the same transformers class (so `base_model`, `get_encoder`, `get_output_embeddings` and
    decoding work unchanged), the base weights frozen, only the adapters train. `target_modules: null` takes
    peft's default for the architecture (e.g. q_proj, v_proj; query, value for BERT)."""
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
    get_peft_model(model, config)  # injects the adapters into `model` and freezes everything else
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # frozen embeddings + reentrant checkpointing: keep the graph
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place); returns `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return model


def set_special_ids(model: nn.Module, eos: int, pad: int, decoder_start: int | None = None) -> None:
    """EOS / pad (/ decoder start) ids in the model's config and generation config, so that a saved directory
    stops and pads in `generate` as the generator did (a BERT config, e.g., has no EOS)."""
    from transformers import GenerationConfig

    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    gen_cfg = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    gen_cfg.eos_token_id, gen_cfg.pad_token_id = eos, pad
    if decoder_start is not None:
        gen_cfg.decoder_start_token_id = decoder_start
    model.generation_config = gen_cfg


class Generator(ListSources, nn.Module):
    """A Hugging Face seq2seq model plus the input assembly RAG needs."""

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
    ) -> Generator | CausalGenerator:
        """`kind`: "seq2seq" (BART, T5, ...), "bert2bert" (warm-start an EncoderDecoderModel from one encoder
        checkpoint, e.g. MiniLM), "causal" (any decoder-only LM, or an encoder as a prefix LM with
        `prefix_lm=True`: see `models/causal.py`, which also takes `template`), or "auto" (seq2seq for
        encoder-decoder configs, causal for decoder-only ones, else bert2bert). bert2bert and causal:
        `num_layers` keeps the first N layers of the checkpoint (in both encoder and decoder).
        `lora`: LoRA adapters on the generator (see `apply_lora`), for every kind. `empty_init`: build the
        model on the meta device, without weights (FSDP ranks > 0, see `models/sharding.py`).
        `config_overrides`: attributes of the transformers config to change, e.g. `{dropout: 0.0}` (BART) or
        `{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}` (BERT family; bert2bert: both halves).
        `frozen_layers` (causal only): the embeddings and the first N blocks do not train (`freeze_bottom`).
        `copy` (causal only): a pointer head that copies answer tokens from the prompt (`models/pointer.py`)."""
        kind = generator_kind(name_or_path, kind)
        overrides = dict(config_overrides or {})
        if kind == "causal":
            return CausalGenerator.from_pretrained(
                name_or_path, max_source_length=max_source_length, template=template, prefix_lm=prefix_lm,
                gradient_checkpointing=gradient_checkpointing, num_layers=num_layers, lora=lora,
                empty_init=empty_init, frozen_layers=frozen_layers, copy=copy, **overrides,
            )  # fmt: skip
        if frozen_layers or copy:
            raise ValueError(f"model.generator.frozen_layers / copy apply to kind=causal only, not {kind}")
        if template is not None or prefix_lm:
            raise ValueError(f"model.generator.template / prefix_lm apply to kind=causal only, not {kind}")
        if name_or_path.startswith("tiny:"):
            from rag_lightning.models.tiny import tiny_generator

            if overrides:
                raise ValueError("model.generator.config_overrides: not for tiny: models (built in code)")
            model, tok = tiny_generator()
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
        return self._hidden_states(src, mask, labels)

    def answer_states(
        self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """What RagModule's fused loss reads: `hidden_states` and the copy head's pointer, which seq2seq
        generators do not have (causal.py)."""
        return self._hidden_states(src, mask, labels), None

    def _hidden_states(self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dec = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        m = self.model
        if self._head == "bart":
            return m.base_model(input_ids=src, attention_mask=mask, decoder_input_ids=dec, use_cache=False)[0]
        if self._head == "t5":
            enc = m.get_encoder()(input_ids=src, attention_mask=mask)[0]
            h = m.get_decoder()(
                input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask, use_cache=False
            )[0]
            return h * (m.model_dim**-0.5) if m.config.scale_decoder_outputs else h
        if self._head == "bert2bert":
            enc = m.encoder(input_ids=src, attention_mask=mask)[0]
            if hasattr(m, "enc_to_dec_proj"):
                enc = m.enc_to_dec_proj(enc)
            h = m.decoder.bert(
                input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask, use_cache=False
            )[0]
            return m.decoder.cls.predictions.transform(h)
        raise NotImplementedError(
            f"{type(m).__name__}: no hidden-states / output-layer split (output_layer() is None)"
        )

    def decode(self, ids: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [join_wordpiece_punct(t) for t in texts] if self._wordpiece else texts

    @property
    def _wordpiece(self) -> bool:
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        return type(model).__name__ == "WordPiece"


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


_NUM_PUNCT = re.compile(r"(?<=\d) ?([.,:]) ?(?=\d)")  # 0. 2 -> 0.2, 1, 000 -> 1,000, 10 : 30 -> 10:30
_WORD_PUNCT = re.compile(r"(?<=\w) ?([-/]) ?(?=\w)")  # mid - 14th -> mid-14th, and / or -> and/or


def join_wordpiece_punct(text: str) -> str:
    """WordPiece loses the spacing around punctuation ("0.2" decodes as "0. 2", "mid-14th" as "mid - 14th");
    SQuAD normalization then drops the punctuation and splits the token. Rejoin punctuation between word
    characters where that is unambiguous: `.,:` between digits, `-/` between word characters."""
    return _WORD_PUNCT.sub(r"\1", _NUM_PUNCT.sub(r"\1", text))
