"""Decoder-only generator: a prompt per (question, passage) row, the answer scored after it.

Row b*K + k is ``template(question_b, passage_{b,k})`` built from token ids: the template's literal text is
tokenized once, the question and the passage (the corpus' generator tokens, ``title / text``) are inserted as
ids, and the passage is cut to fit ``max_source_length`` (the question never is). Rows are LEFT-padded, so the
answer starts at the same position S in every row; position ids count only real tokens, so padding changes
nothing. The model reads ``prompt + answer[:-1]`` and position S-1+t predicts ``labels[:, t]`` (the answer
tokens plus EOS, see ``data/collate.py``): logits (B*K, T, V) aligned with the labels like a seq2seq model's,
so ``rag_token_nll`` / ``rag_sequence_nll`` apply unchanged.

``prefix_lm=True``: attention is bidirectional inside the prompt and causal over the answer (a prefix LM, e.g.
an encoder checkpoint such as MiniLM loaded as ``BertLMHeadModel`` with its output layer tied to the input
embeddings). Decoding runs the prompt once with the same mask and then steps the answer with the KV cache.

``copy=True`` adds a pointer head (``models/pointer.py``): each answer token is written by the LM head or
copied from the prompt, p = (1 - g) p_vocab + g p_copy. The training loss scores the targets of the mixture;
decoding gets the full mixture as its log-probs, the prompt's keys riding along with the KV cache.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedTokenizerBase,
)

from rag_lightning.models.pointer import Pointer, PointerHead, copy_logprobs, mix, mix_distribution
from rag_lightning.preflight import require_model
from rag_lightning.retrieval.embed import pad_batch
from rag_lightning.tokenization import SETTINGS_FILE

DEFAULT_TEMPLATE = "context: {passage} question: {question} answer:"
POINTER_FILE = "rag_pointer.safetensors"  # the copy head's weights, next to the transformers files
# config.json's model_type when plain transformers cannot run the saved generator (prefix-LM attention, copy
# head): AutoConfig / AutoModel refuse it, naming this, instead of loading weights that decode garbage; the
# real type is kept in rag_generator.json ("transformers_model_type") and restored by from_pretrained
REFUSED_MODEL_TYPE = (
    "rag_lightning-generator (not runnable by plain transformers: see README.md in this directory)"
)
_FIELD = re.compile(r"\{(passage|question|input)\}")  # {input}: the example's input, {question} its alias


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest row: (input_ids (R, S) int64, attention_mask (R, S) int64)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def prefix_lm_mask(mask: torch.Tensor, prompt_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (R, 1, L, L) from a padding mask (R, L): query i sees key j if j is a real
    token and (j <= i or both lie in the prompt, the first ``prompt_len`` positions)."""
    r, n = mask.shape
    pos = torch.arange(n, device=mask.device)
    allowed = (pos[None, :] <= pos[:, None]) | ((pos[None, :] < prompt_len) & (pos[:, None] < prompt_len))
    allowed = allowed[None] & mask[:, None, :].bool()  # (R, L, L)
    out = torch.zeros(r, 1, n, n, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def _leading_specials(tok: PreTrainedTokenizerBase) -> list[int]:
    """Special ids the tokenizer puts before a text (Llama: BOS; BERT: CLS; GPT-2: none)."""
    bare = tok("omega", add_special_tokens=False).input_ids
    full = tok("omega").input_ids
    i = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), 0)
    return full[:i]


def freeze_bottom(model: nn.Module, n: int) -> None:
    """Freeze the input embeddings (and, when tied, the output layer) and the first ``n`` transformer blocks:
    every parameter registered before the blocks and those of blocks[:n]. Backward then stops at block n:
    nothing below it needs a gradient."""
    num = model.config.num_hidden_layers
    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num), None)
    if blocks is None or not 0 <= n <= num:
        raise ValueError(
            f"model.generator.frozen_layers={n}: need 0 <= n <= {num} and a list of {num} blocks"
        )
    in_blocks = {id(p) for p in blocks.parameters()}
    first = next(p for p in blocks.parameters())
    for p in model.parameters():  # registration order, tied weights once (where first registered)
        if p is first:
            break
        if id(p) not in in_blocks:
            p.requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)


def _restored_config(path: str, model_type: str, overrides: Mapping[str, Any]) -> Any:
    """The transformers config of a directory `save_pretrained` marked REFUSED_MODEL_TYPE, with its real type."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(path)
    config_dict["model_type"] = model_type
    return CONFIG_MAPPING[model_type].from_dict(config_dict, **overrides)


class ListSources:
    """`build_sources` from token-id lists, for both generator kinds: pads them and calls the kind's own
    vectorized `assemble_sources(q, q_len, p, p_len, n_docs)` (used by tests and decoding references; the
    training step gathers padded rows straight from the corpus)."""

    pad_token_id: int

    def build_sources(
        self, questions: Sequence[Sequence[int]], passages: Sequence[Sequence[int]], n_docs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """questions: B id lists (no specials); passages: B*K id lists -> src ids, mask (B*K, S)."""
        if len(passages) != len(questions) * n_docs:
            raise ValueError(f"expected {len(questions)} x {n_docs} passages, got {len(passages)}")
        q, qm = pad_batch([list(x) for x in questions], self.pad_token_id)
        p, pm = pad_batch([list(x) for x in passages], self.pad_token_id)
        return self.assemble_sources(q, qm.sum(1), p, pm.sum(1), n_docs)


class CausalGenerator(ListSources, nn.Module):
    """A Hugging Face causal LM plus the prompt assembly RAG needs (interface of ``generator.Generator``)."""

    kind = "causal"
    decoder_start_token_id = None  # the prompt's last token starts the answer

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_source_length: int = 256,
        template: str = DEFAULT_TEMPLATE,
        prefix_lm: bool = False,
        lora: Mapping[str, Any] | None = None,
        copy: bool = False,
    ):
        super().__init__()
        cfg = model.config
        for attr in ("final_logit_softcapping", "logit_scale"):  # heads that are more than one linear layer
            if getattr(cfg, attr, None) not in (None, 1.0):
                raise ValueError(
                    f"causal generator: {cfg.model_type} with {attr}={getattr(cfg, attr)} unsupported"
                )
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(
                f"causal generator needs a decoder-only model, got {cfg.model_type} (encoder-decoder)"
            )
        from rag_lightning.models.generator import apply_lora  # (generator.py imports this module)

        self.model = apply_lora(model, lora)
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.template = template
        self.prefix_lm = prefix_lm
        self.eos_token_id = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        if self.eos_token_id is None:
            raise ValueError("causal generator: the tokenizer has neither an EOS nor a SEP token")
        # no pad token (GPT-2, Llama): pad with EOS; padded positions are masked out and never scored
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        )
        self.pieces = self._parse(template)
        # the copy head (None: the LM head alone); outside the peft wrapper, so it trains also under LoRA
        self.pointer = PointerHead(cfg.hidden_size).to(model.dtype) if copy else None

    def _parse(self, template: str) -> list[list[int] | str]:
        """Template -> [ids of literal text | "passage" | "question"], the leading specials (BOS) first.
        ``{input}`` (any task's input text) and ``{question}`` are the same field."""
        fields = sorted("question" if f == "input" else f for f in _FIELD.findall(template))
        if fields != ["passage", "question"]:
            raise ValueError(
                f"generator template must hold {{passage}} and {{input}} (or {{question}}) once each: {template!r}"
            )
        pieces: list[list[int] | str] = [_leading_specials(self.tokenizer)]
        for i, part in enumerate(_FIELD.split(template)):  # literal, field, literal, field, literal
            if i % 2:
                pieces.append("question" if part == "input" else part)
            elif part:
                pieces.append(self.tokenizer(part, add_special_tokens=False).input_ids)
        return pieces

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_source_length: int | None = None,
        template: str | None = None,
        prefix_lm: bool | None = None,
        gradient_checkpointing: bool = False,
        num_layers: int | None = None,
        lora: Mapping[str, Any] | None = None,
        empty_init: bool = False,
        frozen_layers: int = 0,
        copy: bool | None = None,
        **model_kwargs: Any,
    ) -> CausalGenerator:
        """Any ``AutoModelForCausalLM`` directory or Hub id, or ``tiny:gpt2`` / ``tiny:llama``. Settings left
        None come from the directory's ``rag_generator.json`` (written by ``save_pretrained``), else defaults.
        ``prefix_lm`` loads encoder checkpoints (BERT family) with ``is_decoder=True``; ``num_layers`` keeps
        the first N layers; ``frozen_layers`` freezes the embeddings and the first N blocks (`freeze_bottom`);
        ``copy`` adds the pointer head (trained weights from the directory's ``rag_pointer.safetensors`` when
        it has them, else new); ``model_kwargs`` change attributes of the transformers config (e.g. dropout)."""
        saved: dict[str, Any] = {}
        if name_or_path.startswith("tiny:"):
            from rag_lightning.models.tiny import tiny_causal_lm

            if model_kwargs:
                raise ValueError(f"generator config overrides {sorted(model_kwargs)}: not for tiny: models")
            model, tok = tiny_causal_lm(name_or_path.removeprefix("tiny:"))
        else:
            require_model(name_or_path, "model.generator.name_or_path")
            settings = os.path.join(name_or_path, SETTINGS_FILE)
            if os.path.isfile(settings):
                with open(settings, encoding="utf-8") as f:
                    saved = json.load(f)
            real_type = saved.get("transformers_model_type")  # marked by save_pretrained: the real type back
            restored = {"config": _restored_config(name_or_path, real_type, {})} if real_type else {}
            tok = AutoTokenizer.from_pretrained(name_or_path, **restored)
            prefix = prefix_lm if prefix_lm is not None else saved.get("prefix_lm", False)
            if prefix:
                model_kwargs["is_decoder"] = True  # BERT family: the causal-LM head class needs it
            if num_layers is not None:
                model_kwargs["num_hidden_layers"] = num_layers
            if real_type:
                model_kwargs = {"config": _restored_config(name_or_path, real_type, model_kwargs)}
            if empty_init:  # FSDP ranks > 0: the architecture on the meta device, weights come from rank 0
                config = model_kwargs.get("config") or AutoConfig.from_pretrained(
                    name_or_path, **model_kwargs
                )
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(config)
            else:
                model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if frozen_layers:
            freeze_bottom(model, frozen_layers)

        def pick(value: Any, key: str, default: Any) -> Any:
            return value if value is not None else saved.get(key, default)

        gen = cls(
            model,
            tok,
            max_source_length=pick(max_source_length, "max_source_length", 256),
            template=pick(template, "template", DEFAULT_TEMPLATE),
            prefix_lm=pick(prefix_lm, "prefix_lm", False),
            lora=lora,
            copy=pick(copy, "copy", False),
        )
        weights = os.path.join(name_or_path, POINTER_FILE)
        if gen.pointer is not None and not empty_init and os.path.isfile(weights):
            from safetensors.torch import load_file

            gen.pointer.load_state_dict(load_file(weights))
        return gen

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """A transformers directory plus the settings file; LoRA adapters are merged first (in place). When plain
        transformers cannot run it (`unsupported_by_transformers`), config.json's model_type is
        REFUSED_MODEL_TYPE, so `AutoModelForCausalLM.from_pretrained` fails instead of decoding garbage;
        `Generator.from_pretrained` loads it."""
        from rag_lightning.models.generator import merge_lora, set_special_ids

        self.model = merge_lora(self.model)
        set_special_ids(self.model, self.eos_token_id, self.pad_token_id)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        settings = {"kind": self.kind, "template": self.template, "prefix_lm": self.prefix_lm,
                    "max_source_length": self.max_source_length, "copy": self.pointer is not None}  # fmt: skip
        if (
            self.unsupported_by_transformers()
        ):  # plain AutoModel must refuse the directory, not decode garbage
            config_file = os.path.join(path, "config.json")
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            settings["transformers_model_type"] = config["model_type"]
            config["model_type"] = REFUSED_MODEL_TYPE
            with open(config_file, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        if self.pointer is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.pointer.state_dict().items()},
                      os.path.join(path, POINTER_FILE))  # fmt: skip
        with open(os.path.join(path, SETTINGS_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)

    def unsupported_by_transformers(self) -> list[str]:
        """What a plain transformers model loaded from `save_pretrained`'s directory would not do."""
        out = []
        if self.prefix_lm:
            out.append(
                "prefix-LM attention (bidirectional over the prompt, causal over the answer): a plain "
                "transformers model attends causally everywhere"
            )
        if self.pointer is not None:
            out.append(
                f"the copy head ({POINTER_FILE}): p = (1 - g) p_vocab + g p_copy, copying answer tokens from "
                f"the prompt; a plain transformers model has the LM head alone"
            )
        return out

    # ---------------------------------------------------------------- inputs
    def assemble_sources(
        self, q: torch.Tensor, q_len: torch.Tensor, p: torch.Tensor, p_len: torch.Tensor, n_docs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorized template: q (B, Lq) / q_len (B,), p (B*K, Lp) / p_len (B*K,) right-padded token ids ->
        prompt ids, mask (B*K, S), LEFT-padded (the answer follows at the same position in every row); the
        passage is cut to fit max_source_length, never the question."""
        r = p.shape[0]
        if r != q.shape[0] * n_docs:
            raise ValueError(f"expected {q.shape[0]} x {n_docs} passages, got {r}")
        budget = max(self.max_source_length - sum(len(x) for x in self.pieces if not isinstance(x, str)), 0)
        ql = q_len.clamp(max=budget).repeat_interleave(n_docs)  # (R,)
        pl = torch.minimum(p_len, (budget - ql).clamp(min=0))  # (R,)
        fields = {"question": (q.repeat_interleave(n_docs, 0), ql), "passage": (p, pl)}
        toks, keep = [], []
        for piece in self.pieces:
            if isinstance(piece, str):  # a field: its first n tokens
                x, n = fields[piece]
                keep.append(torch.arange(x.shape[1]) < n[:, None])
            else:  # the template's literal token ids
                x = torch.tensor(piece, dtype=torch.long).expand(r, len(piece))
                keep.append(torch.ones(x.shape, dtype=torch.bool))
            toks.append(x.long())
        toks, keep = torch.cat(toks, 1), torch.cat(keep, 1)  # (R, W)
        order = torch.argsort(keep.to(torch.uint8), dim=1, stable=True)  # dropped first, kept last, in order
        order = order[:, order.shape[1] - max(1, int(keep.sum(1).max())) :]  # (R, S)
        kept = keep.gather(1, order)
        return toks.gather(1, order).masked_fill_(~kept, self.pad_token_id), kept.long()

    def _teacher_forced_inputs(
        self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Inputs prompt + labels[:, :-1] (R, S+T-1), attention mask and position ids (real tokens counted)."""
        answer = labels[:, :-1]  # (R, T-1): token t is read to predict labels[:, t+1]
        real = answer != -100
        ids = torch.cat([src, answer.masked_fill(~real, self.pad_token_id)], 1)  # (R, S+T-1)
        attn = torch.cat([mask, real.to(mask.dtype)], 1)  # (R, S+T-1)
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)
        if self.prefix_lm:
            attn = prefix_lm_mask(attn, src.shape[1], self.model.dtype)
        return {"input_ids": ids, "attention_mask": attn, "position_ids": pos}

    # ---------------------------------------------------------------- scoring
    @property
    def _lm(self) -> nn.Module:
        """The transformers model, also under a peft wrapper (whose adapters sit inside it, in place)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM head: weight (V, H), bias (V,) or None; logits = hidden_states @ weight.T + bias."""
        head = self._lm.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def _pre_head(self, h: torch.Tensor) -> torch.Tensor:
        """BERT-family heads transform (dense, activation, LayerNorm) before the output layer."""
        predictions = getattr(getattr(self._lm, "cls", None), "predictions", None)
        return predictions.transform(h) if predictions is not None else h

    def _body(self, **inputs: Any):
        """The transformer without its LM head: hidden states for every position, no (R, L, V) logits."""
        return self._lm.base_model(**inputs, return_dict=True)

    def _states(
        self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, pointer: bool = True
    ) -> tuple[torch.Tensor, Pointer | None]:
        h = self._body(**self._teacher_forced_inputs(src, mask, labels), use_cache=False).last_hidden_state
        s = src.shape[1]
        answer = h[:, s - 1 :]  # (R, T, H): position S-1+t predicts labels[:, t]
        ptr = None
        if pointer and self.pointer is not None:
            ptr = self.pointer(answer, self.pointer.keys(h[:, :s]), mask, src)  # (R, T, S)
        return self._pre_head(answer), ptr

    def hidden_states(self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B*K, T, H) at the positions predicting labels (B*K, T), before the LM head."""
        return self._states(src, mask, labels, pointer=False)[0]

    def answer_states(
        self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Pointer | None]:
        """`hidden_states` and, with the copy head, its `Pointer` (R, T, S) at the same positions."""
        return self._states(src, mask, labels)

    def copy_mix(self, tok_lp: torch.Tensor, ptr: Pointer, targets: torch.Tensor) -> torch.Tensor:
        """The LM head's target log-probs (R, T) -> the mixture's, targets (R, T) (negative = padding)."""
        return mix(tok_lp, copy_logprobs(ptr, targets), ptr.gate)

    def forward(self, src: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B*K, T, V) for labels (B*K, T) (-100 = padding); with the copy head, the
        mixture's log-probs (normalized logits: their log-softmax is themselves)."""
        hidden, ptr = self._states(src, mask, labels)
        logits = self._lm.get_output_embeddings()(hidden)
        return logits if ptr is None else mix_distribution(logits, ptr)

    # ---------------------------------------------------------------- decoding (see models/decode.py)
    def prompt_step(self, src: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompts (R, S): next-token logits (R, V) float32 and their KV cache. With the copy head the
        logits are the mixture's log-probs and the cache carries the prompt's keys (``cache.pointer_memory``:
        keys (R, S, d), mask (R, S), ids (R, S); `reorder_cache` selects its rows too)."""
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        attn = prefix_lm_mask(mask, src.shape[1], self.model.dtype) if self.prefix_lm else mask
        cache = DynamicCache(config=self.model.config)
        out = self._body(
            input_ids=src, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
        )
        past, h = out.past_key_values, out.last_hidden_state
        if self.pointer is not None:
            past.pointer_memory = (self.pointer.keys(h), mask, src)
        return self._logits(h[:, -1], past), past

    def answer_step(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: DynamicCache
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Feed one answer token per row: tokens (R,), mask (R, S+t) over cache + token, positions (R,)."""
        out = self._body(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], past_key_values=past,
            use_cache=True,
        )  # fmt: skip
        return self._logits(out.last_hidden_state[:, -1], out.past_key_values), out.past_key_values

    def _logits(self, h: torch.Tensor, past: DynamicCache) -> torch.Tensor:
        """h (R, H) last states -> next-token logits (R, V) float32 (with the copy head: the mixture)."""
        logits = self._lm.get_output_embeddings()(self._pre_head(h))
        if self.pointer is None:
            return logits.float()
        keys, mask, src = past.pointer_memory
        return mix_distribution(logits[:, None], self.pointer(h[:, None], keys, mask, src))[:, 0].float()

    @staticmethod
    def reorder_cache(past: DynamicCache, idx: torch.Tensor) -> DynamicCache:
        """Select cache rows ``idx`` (beam re-ordering), the copy head's prompt memory with them."""
        past.reorder_cache(idx)
        memory = getattr(past, "pointer_memory", None)
        if memory is not None:
            past.pointer_memory = tuple(m.index_select(0, idx) for m in memory)
        return past

    def decode(self, ids: torch.Tensor) -> list[str]:
        from rag_lightning.models.generator import join_wordpiece_punct  # (generator.py imports this module)

        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        wordpiece = type(model).__name__ == "WordPiece"
        return [join_wordpiece_punct(t).strip() if wordpiece else t.strip() for t in texts]
