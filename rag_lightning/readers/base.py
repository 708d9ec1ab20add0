"""The reader axis: how a question and its K retrieved passages become a target's log-likelihood and an answer.

Every reader is an ``nn.Module`` holding a transformers model and its tokenizer, and provides (``Reader``):

* ``assemble_sources(q, q_len, p, p_len, n_docs)``: its inputs from question rows (B, Lq) and passage rows
  (B*K, Lp) of token ids (right-padded, lengths given) -> ``(src, mask)``, or ``(src, mask, segments)`` for
  readers that join the passages in one input (``segments`` (B, S): the passage each token belongs to, -1
  for none; attention distillation needs it);
* ``score(src, mask, labels, ...)`` -> ``Read``: the per-token target log-probs ``AnswerLogProbs`` (B, K', T),
  fused with the output layer where the reader exposes it (no (rows, T, V) logits); K' = K for the marginal
  readers (one row per passage, marginalized by ``models.marginalize``), 1 for fusion readers (one read of
  all passages); with ``attention=True`` a fusion reader also gives the attention mass on each passage (B, K);
* ``marginal_inputs(doc_scores, variant)``: the prior and marginal that turn ``score``'s log-probs into the loss;
* ``generate(src, mask, doc_scores, variant, **decoding)``: answer ids (B, L); ``decode(ids)``: texts;
* ``fsdp_methods``: the methods besides ``forward`` that run the model (FSDP2 unshards for them); the
  transformer blocks of ``.model`` are the sharded units (``models/sharding.py``);
* ``save_pretrained(path)``: a plain transformers directory (LoRA merged) that ``from_pretrained`` reloads.

Kinds (``READERS`` in ``readers/__init__.py``, chosen by ``model.variant`` and the model's kind):
token / sequence marginal over per-passage rows (``seq2seq.Generator``, ``causal.CausalGenerator``),
Fusion-in-Decoder (``fid.FidGenerator``) and one prompt with every passage (``concat.ConcatGenerator``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from rag_lightning.models import decode
from rag_lightning.models.marginalize import AnswerLogProbs, answer_logprobs, answer_logprobs_fused
from rag_lightning.retrieval.embed import pad_batch


class States(NamedTuple):
    """A teacher-forced pass: final states (R, T, H) as the output layer reads them, the copy head's pointer
    (or None) and, when asked, the attention mass on each passage (B, K) (or None)."""

    hidden: Tensor
    pointer: Any
    attention: Tensor | None = None


class Read(NamedTuple):
    """What ``score`` returns: target log-probs (B, K', T) and the passage attention (B, K) or None."""

    lp: AnswerLogProbs
    attention: Tensor | None = None


@runtime_checkable
class Reader(Protocol):
    """What RagModule asks of a reader (see the module docstring)."""

    kind: str  # "seq2seq" | "causal": the model family
    fusion: bool  # True: reads all K passages at once (no per-passage likelihood of its own)
    variants: tuple[str, ...]  # the model.variant values it serves
    fsdp_methods: tuple[str, ...]
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int | None

    def assemble_sources(
        self, q: Tensor, q_len: Tensor, p: Tensor, p_len: Tensor, n_docs: int
    ) -> tuple[Tensor, ...]: ...

    def score(
        self, src: Tensor, mask: Tensor, labels: Tensor, *, fused: bool = True, smooth: bool = False,
        positions: Tensor | None = None, segments: Tensor | None = None, attention: bool = False,
    ) -> Read: ...  # fmt: skip

    def marginal_inputs(self, doc_scores: Tensor, variant: str) -> tuple[Tensor, str]: ...

    def generate(self, src: Tensor, mask: Tensor, doc_scores: Tensor, variant: str, **kw: Any) -> Tensor: ...

    def decode(self, ids: Tensor) -> list[str]: ...

    def save_pretrained(self, path: str | os.PathLike) -> None: ...


class ReaderBase:
    """Shared implementation: the marginal readers' scoring and decoding, list inputs for tests.

    A subclass provides ``assemble_sources``, ``_read_states(src, mask, labels, segments, attention)`` ->
    ``States``, ``output_layer()`` (or None: score from ``forward``'s logits) and ``forward``."""

    fusion = False
    variants: tuple[str, ...] = ("token", "sequence")
    fsdp_methods: tuple[str, ...] = ("answer_states", "hidden_states", "read_states")
    pad_token_id: int

    def build_sources(
        self, questions: Sequence[Sequence[int]], passages: Sequence[Sequence[int]], n_docs: int
    ) -> tuple[Tensor, ...]:
        """questions: B id lists (no specials); passages: B*K id lists -> ``assemble_sources``' output."""
        if len(passages) != len(questions) * n_docs:
            raise ValueError(f"expected {len(questions)} x {n_docs} passages, got {len(passages)}")
        q, qm = pad_batch([list(x) for x in questions], self.pad_token_id)
        p, pm = pad_batch([list(x) for x in passages], self.pad_token_id)
        return self.assemble_sources(q, qm.sum(1), p, pm.sum(1), n_docs)

    def scored_rows(self, src: Tensor, labels: Tensor) -> int:
        """Rows per question that score the target: K (one per passage) for the marginal readers."""
        return src.shape[0] // labels.shape[0]

    def read_states(
        self,
        src: Tensor,
        mask: Tensor,
        labels: Tensor,
        segments: Tensor | None = None,
        attention: bool = False,
    ) -> States:
        """The teacher-forced pass the fused loss reads (the subclass's ``_read_states``; the public methods
        that run the model never call one another, so FSDP2 unshards once per call)."""
        return self._read_states(src, mask, labels, segments=segments, attention=attention)

    def answer_states(self, src: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Any]:
        """(final states (R, T, H), pointer or None) for labels (R, T)."""
        st = self._read_states(src, mask, labels)
        return st.hidden, st.pointer

    def score(
        self,
        src: Tensor,
        mask: Tensor,
        labels: Tensor,
        *,
        fused: bool = True,
        smooth: bool = False,
        positions: Tensor | None = None,
        segments: Tensor | None = None,
        attention: bool = False,
    ) -> Read:
        """Target log-probs for labels (B, T), one pass. ``fused`` with an exposed output layer: the final
        states go straight into the fused output-layer + log-prob kernel (``answer_logprobs_fused``), else
        from ``forward``'s logits. ``positions``: non-padding targets (``batch["label_positions"]``)."""
        k = self.scored_rows(src, labels)
        rep = labels.repeat_interleave(k, 0)  # (B*K', T)
        copy = getattr(self, "pointer", None) is not None  # label smoothing of a copy mixture: the full (V,)
        if fused and self.output_layer() is not None and not (copy and smooth):
            st = self.read_states(src, mask, rep, segments=segments, attention=attention)
            head = self.output_layer()  # after the pass: under FSDP2 the root unit is unsharded now
            lp = answer_logprobs_fused(st.hidden, *head, labels, k, smooth=smooth, positions=positions)
            if st.pointer is not None:
                tok = self.copy_mix(lp.tok_lp.flatten(0, 1), st.pointer, rep).view_as(lp.tok_lp)  # (B, K', T)
                lp = AnswerLogProbs(tok.masked_fill(~lp.mask[:, None], 0.0), None, lp.mask)
            return Read(lp, st.attention)
        if attention:
            raise ValueError("passage attention (adist) needs the fused path: model.fused_loss=true")
        logits = self(src, mask, rep)  # (B*K', T, V) (with a copy head: the mixture's log-probs)
        return Read(answer_logprobs(logits, labels, k, smooth=smooth, positions=positions))

    def marginal_inputs(self, doc_scores: Tensor, variant: str) -> tuple[Tensor, str]:
        """The marginal readers marginalize ``score``'s K rows with p(z|x) = softmax(doc_scores)."""
        return doc_scores, variant

    def steps_model(self) -> Any:
        """What ``models.decode`` steps: the transformers seq2seq model, or a causal reader itself."""
        return self.model

    def generate(
        self, src: Tensor, mask: Tensor, doc_scores: Tensor, variant: str, mode: str = "fast", **kw: Any
    ) -> Tensor:
        """RAG-Token or RAG-Sequence decoding over the K per-passage rows -> (B, L) ids."""
        if variant == "sequence":
            return decode.rag_sequence_generate(self.steps_model(), src, mask, doc_scores, mode=mode, **kw)
        return decode.rag_token_generate(self.steps_model(), src, mask, doc_scores, **kw)

    def use_eager_attention(self) -> None:
        """Attention probabilities are returned by the eager implementation only (adist asks for them)."""
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        lm.set_attn_implementation("eager")

    def decode(self, ids: Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        if type(model).__name__ == "WordPiece":
            texts = [join_wordpiece_punct(t) for t in texts]
        return [t.strip() for t in texts] if self.kind == "causal" else texts


def one_read(doc_scores: Tensor) -> Tensor:
    """The prior of a fusion reader's single read of all passages: p = 1, doc_scores (B, K) -> zeros (B, 1)."""
    return doc_scores.new_zeros(doc_scores.shape[0], 1)


_NUM_PUNCT = re.compile(r"(?<=\d) ?([.,:]) ?(?=\d)")  # 0. 2 -> 0.2, 1, 000 -> 1,000, 10 : 30 -> 10:30
_WORD_PUNCT = re.compile(r"(?<=\w) ?([-/]) ?(?=\w)")  # mid - 14th -> mid-14th, and / or -> and/or


def join_wordpiece_punct(text: str) -> str:
    """WordPiece loses the spacing around punctuation ("0.2" decodes as "0. 2", "mid-14th" as "mid - 14th");
    SQuAD normalization then drops the punctuation and splits the token. Rejoin punctuation between word
    characters where that is unambiguous: `.,:` between digits, `-/` between word characters."""
    return _WORD_PUNCT.sub(r"\1", _NUM_PUNCT.sub(r"\1", text))
