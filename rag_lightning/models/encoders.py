"""Query / document encoders: any Hugging Face encoder, pooled to one vector per text.

`Encoder.from_pretrained(name_or_path, pooling=...)` loads DPR encoders (pooler output), BERT-like models
with CLS or mean pooling, or a tiny randomly initialized BERT for tests (`tiny:bert`).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from rag_lightning.preflight import require_model
from rag_lightning.tokenization import minilm_dir  # noqa: F401  (re-exported)

POOLINGS = ("cls", "mean", "pooler")


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

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling != "pooler" and getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused: it would get no gradient (and DDP would complain)
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        cfg = model.config
        self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, pooling: str | None = None, gradient_checkpointing: bool = False
    ) -> Encoder:
        """Load weights + tokenizer from a Hub name or a local directory (`tiny:bert` builds a test model)."""
        if name_or_path.startswith("tiny:"):
            from rag_lightning.models.tiny import tiny_encoder

            model, tok = tiny_encoder()
        else:
            require_model(name_or_path)
            config = AutoConfig.from_pretrained(name_or_path)
            model = AutoModel.from_pretrained(name_or_path, config=config)
            tok = AutoTokenizer.from_pretrained(name_or_path)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return cls(model, tok, pooling or _default_pooling(model.config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            return out.pooler_output  # (B, d)
        h = out.last_hidden_state  # (B, L, d)
        if self.pooling == "cls":
            return h[:, 0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
