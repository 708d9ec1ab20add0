"""Query / document encoders: any Hugging Face encoder, pooled to one vector per text.

`Encoder.from_pretrained(name_or_path, pooling=...)` loads DPR encoders (pooler output), BERT-like models
with CLS or mean pooling, decoder-based embedders pooled at their last non-padding token (`last`, left or
right padding), or a tiny randomly initialized BERT for tests (`tiny:bert`). With `normalize` the vector is
scaled to unit L2 norm (cosine similarity = inner product; the Retriever sets it for `similarity: cosine`, so
the index holds normalized vectors too).

Each side's text conventions travel with its encoder: `prefix` (E5's "query: " / "passage: ", BGE's query
instruction) and `max_length` (tokens). They are applied where the text is tokenized, not here: queries in
the collator (`data.query_prefix`), passages once, when the corpus is converted (`data.doc_prefix`, part of
the corpus fingerprint); the data config reads both from `retriever.*_encoder`. `Encoder.sibling` gives the
other side's conventions over the same tower (`retriever.shared_encoder`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from rag_lightning.preflight import require_model
from rag_lightning.tokenization import minilm_dir  # noqa: F401  (re-exported)

POOLINGS = ("cls", "mean", "pooler", "last")


def _is_dpr(config) -> bool:
    return config.model_type == "dpr"


def _default_pooling(config) -> str:
    if _is_dpr(config):
        return "pooler"  # DPR's question/context encoders expose the CLS projection as pooler_output
    if config.model_type == "bert" and getattr(config, "hidden_size", 0) == 384:
        return "mean"  # sentence-transformers MiniLM family is trained with mean pooling
    return "cls"


class Encoder(nn.Module):
    """Text -> vector. `forward(input_ids (B, L), attention_mask (B, L)) -> (B, d)`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pooling: str = "cls",
        normalize: bool = False,
        prefix: str = "",
        max_length: int | None = None,
        drop_pooler: bool = True,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "pooler" and getattr(model, "pooler", True) is None:
            raise ValueError(
                "pooling 'pooler' needs the model's pooler (the other side of the tower dropped it)"
            )
        if drop_pooler and pooling != "pooler" and getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused: it would get no gradient (and DDP would complain)
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.prefix = prefix or ""  # prepended to every text of this side where it is tokenized
        self.max_length = max_length
        cfg = model.config
        self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooling: str | None = None,
        gradient_checkpointing: bool = False,
        normalize: bool = False,
        prefix: str = "",
        max_length: int | None = None,
        key: str = "retriever.query_encoder.name_or_path (or doc_encoder)",
    ) -> Encoder:
        """Load weights + tokenizer from a Hub name or a local directory (`tiny:bert` builds a test model);
        ``key`` is the config key an offline error names."""
        if name_or_path.startswith("tiny:"):
            from rag_lightning.models.tiny import tiny_encoder

            model, tok = tiny_encoder()
        else:
            require_model(name_or_path, key)
            config = AutoConfig.from_pretrained(name_or_path)
            model = AutoModel.from_pretrained(name_or_path, config=config)
            tok = AutoTokenizer.from_pretrained(name_or_path)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        pooling = pooling or _default_pooling(model.config)
        return cls(model, tok, pooling, normalize=normalize, prefix=prefix, max_length=max_length)

    def sibling(
        self,
        pooling: str | None = None,
        normalize: bool | None = None,
        prefix: str = "",
        max_length: int | None = None,
    ) -> Encoder:
        """The same tower (same parameters, one copy) under another side's conventions; unset ones are ours."""
        return Encoder(
            self.model,
            self.tokenizer,
            pooling or self.pooling,
            self.normalize if normalize is None else normalize,
            prefix,
            max_length,
            drop_pooler=False,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        v = self.pool(
            self.model(input_ids=input_ids, attention_mask=attention_mask), attention_mask
        )  # (B, d)
        return F.normalize(v.float(), dim=-1).to(v.dtype) if self.normalize else v

    def pool(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            return out.pooler_output  # (B, d)
        h = out.last_hidden_state  # (B, L, d)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "last":
            return last_token(h, attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def last_token(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last non-padding token, left or right padded: (B, L, d) -> (B, d)."""
    L = attention_mask.shape[1]
    last = L - 1 - attention_mask.flip(1).to(torch.long).argmax(1)  # (B,) position of the last 1
    return h[torch.arange(h.shape[0], device=h.device), last]
