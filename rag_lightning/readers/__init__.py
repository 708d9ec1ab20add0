"""Readers: the registry and the one factory (``from_pretrained``, the Hydra ``_target_`` of model.generator).

``READERS[family][variant]`` is the reader class for a model family (``seq2seq``: encoder-decoder and
bert2bert models; ``causal``: decoder-only LMs and prefix LMs) and ``model.variant``. Adding a reader: one
file with a ``ReaderBase`` subclass (``readers/base.py``), one entry here, its tests (docs/readers.md).
"""

from __future__ import annotations

from typing import Any

from rag_lightning.readers.base import Reader, ReaderBase
from rag_lightning.readers.causal import CausalGenerator
from rag_lightning.readers.concat import ConcatGenerator
from rag_lightning.readers.fid import FidGenerator
from rag_lightning.readers.seq2seq import Generator
from rag_lightning.tokenization import generator_kind

__all__ = ["FUSION", "READERS", "VARIANTS", "Reader", "ReaderBase", "from_pretrained", "reader_class"]

READERS: dict[str, dict[str, type[ReaderBase]]] = {
    "seq2seq": {"token": Generator, "sequence": Generator, "fid": FidGenerator},
    "causal": {"token": CausalGenerator, "sequence": CausalGenerator, "concat": ConcatGenerator},
}
VARIANTS = tuple(dict.fromkeys(v for family in READERS.values() for v in family))
FUSION = tuple(dict.fromkeys(v for f in READERS.values() for v, cls in f.items() if cls.fusion))
_FAMILY = {"seq2seq": "seq2seq", "bert2bert": "seq2seq", "causal": "causal"}


def reader_class(kind: str, variant: str) -> type[ReaderBase]:
    """The reader for a resolved model kind (seq2seq | bert2bert | causal) and model.variant."""
    family = READERS[_FAMILY[kind]]
    if variant not in family:
        raise ValueError(
            f"model.variant={variant} does not apply to a {kind} generator; expected one of {sorted(family)}"
        )
    return family[variant]


def from_pretrained(
    name_or_path: str, variant: str = "token", kind: str = "auto", **kwargs: Any
) -> ReaderBase:
    """Build the reader for ``model.variant`` around ``name_or_path`` (``kind`` auto-detected, see
    ``tokenization.generator_kind``); ``kwargs`` go to the class's ``from_pretrained``."""
    resolved = generator_kind(name_or_path, kind)
    cls = reader_class(resolved, variant)
    if _FAMILY[resolved] == "seq2seq":
        return cls.from_pretrained(name_or_path, kind=resolved, **kwargs)
    if kwargs.pop("tie_encoder_decoder", False):
        raise ValueError("model.generator.tie_encoder_decoder: for encoder-decoder generators only")
    overrides = dict(kwargs.pop("config_overrides", None) or {})
    return cls.from_pretrained(name_or_path, **kwargs, **overrides)
