"""One prompt with every passage, for decoder-only generators (``model.variant=concat``).

Row b is ``template(question_b, passages_b)`` where the ``{passage}`` field holds the K passages in retrieval
order, each cut to a per-passage budget and followed by ``separator`` (not after the last):

    {passage} = p_1[:n_1] sep p_2[:n_2] sep ... p_K[:n_K],   n_k = min(len(p_k), passage_length)

``passage_length`` null: each passage gets what the single-passage prompt leaves it (``max_source_length``
minus the template and the question), so with K = 1 the prompt is the marginal reader's. The question is never
cut. The answer is scored once (B, 1, T) after the joint prompt (left-padded, as the causal reader's) and
decoded from it; the copy head (``models/pointer.py``) points over the whole prompt.

Retriever training: ``attention=True`` gives the answer tokens' attention mass on each passage's span of the
prompt, averaged over layers, heads and answer tokens (``adist``); ``score_each`` the per-passage likelihoods
of single-passage prompts (the causal reader's), one extra batched pass (Atlas's "loop", pdist / emdr2 / lsr).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from rag_lightning.models.marginalize import AnswerLogProbs
from rag_lightning.readers.base import one_read
from rag_lightning.readers.causal import CausalGenerator
from rag_lightning.tokenization import SETTINGS_FILE


class ConcatGenerator(CausalGenerator):
    """A causal LM reading the K passages in one prompt."""

    fusion = True
    variants = ("concat",)
    passage_length: int | None = None
    separator_ids: list[int]

    def __init__(
        self, *args: Any, passage_length: int | None = None, separator: str | None = None, **kw: Any
    ):
        super().__init__(*args, **kw)
        self.set_passages(passage_length, separator)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, passage_length: int | None = None, separator: str | None = None, **kw: Any
    ) -> ConcatGenerator:
        """The causal reader's ``from_pretrained``; ``passage_length``: tokens kept per passage (null: what a
        single-passage prompt leaves); ``separator``: text between passages (null: the tokenizer's SEP token
        if it has one, else a newline)."""
        gen = super().from_pretrained(name_or_path, **kw)
        saved = {}
        path = os.path.join(name_or_path, SETTINGS_FILE)
        if os.path.isfile(path):  # a directory saved by a concat reader: its settings unless given
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        gen.set_passages(
            passage_length if passage_length is not None else saved.get("passage_length"),
            separator if separator is not None else saved.get("separator"),
        )
        return gen

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "passage_length": self.passage_length, "separator": self.separator}

    def set_passages(self, passage_length: int | None, separator: str | None) -> None:
        if passage_length is not None and passage_length < 1:
            raise ValueError(f"model.generator.passage_length must be >= 1, got {passage_length}")
        self.passage_length = passage_length
        tok = self.tokenizer
        text = separator if separator is not None else (tok.sep_token or "\n")
        self.separator = text
        self.separator_ids = tok(text, add_special_tokens=False).input_ids

    def assemble_sources(
        self, q: Tensor, q_len: Tensor, p: Tensor, p_len: Tensor, n_docs: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, Lq) / q_len (B,), p (B*K, Lp) / p_len (B*K,) right-padded ids -> prompt ids, mask and the
        passage index of each prompt token (-1: template, question or separator), all (B, S), left-padded."""
        b, r = q.shape[0], p.shape[0]
        if r != b * n_docs:
            raise ValueError(f"expected {b} x {n_docs} passages, got {r}")
        budget = max(self.max_source_length - sum(len(x) for x in self.pieces if not isinstance(x, str)), 0)
        ql = q_len.clamp(max=budget)  # (B,)
        per = (
            (budget - ql).clamp(min=0)
            if self.passage_length is None
            else torch.full_like(ql, self.passage_length)
        )
        pl = torch.minimum(p_len.view(b, n_docs), per[:, None])  # (B, K)
        lp, sep = p.shape[1], torch.tensor(self.separator_ids, dtype=torch.long)
        keep_p = torch.arange(lp) < pl[..., None]  # (B, K, Lp)
        keep_s = torch.ones(b, n_docs, len(sep), dtype=torch.bool)
        keep_s[:, -1] = False  # no separator after the last passage
        ids = torch.cat(
            [p.long().view(b, n_docs, lp), sep.expand(b, n_docs, len(sep))], -1
        )  # (B, K, Lp+|sep|)
        k_idx = torch.arange(n_docs)[:, None]
        seg = torch.cat([k_idx.expand(n_docs, lp), torch.full((n_docs, len(sep)), -1)], -1)  # (K, Lp+|sep|)
        fields = {
            "question": (q, torch.arange(q.shape[1]) < ql[:, None], None),
            "passage": (
                ids.view(b, -1),
                torch.cat([keep_p, keep_s], -1).view(b, -1),
                seg.view(1, -1).expand(b, -1),
            ),
        }
        return self.fill_template(fields, b)

    def marginal_inputs(self, doc_scores: Tensor, variant: str) -> tuple[Tensor, str]:
        return one_read(doc_scores), "token"  # one read: p = 1, the loss is -sum_t log p(y_t | prompt)

    def single_sources(
        self, q: Tensor, q_len: Tensor, p: Tensor, p_len: Tensor, n_docs: int
    ) -> tuple[Tensor, Tensor]:
        """Single-passage prompts (B*K, S) for the loop pass: the causal reader's."""
        return CausalGenerator.assemble_sources(self, q, q_len, p, p_len, n_docs)

    def score_each(
        self, src: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> AnswerLogProbs:
        """log p(y_t | x, z_k, y_<t) (B, K, T) from single-passage prompts (B*K, S) (``single_sources``)."""
        return self.score(src, mask, labels, positions=positions).lp

    def generate(
        self, src: Tensor, mask: Tensor, doc_scores: Tensor, variant: str, mode: str = "fast", **kw: Any
    ) -> Tensor:
        """Greedy / beam decoding after the joint prompts (B, S) -> (B, L) ids."""
        return super().generate(src, mask, one_read(doc_scores), "token", **kw)
