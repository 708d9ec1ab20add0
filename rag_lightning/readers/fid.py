"""Fusion-in-Decoder (Izacard & Grave 2021): the encoder reads each (question, passage) pair alone, the decoder
reads all of them at once.

    enc = encoder(template(q_b, p_{b,k}))            # (B*K, S, H): the seq2seq reader's rows, encoded separately
    fused = enc.view(B, K*S, H), mask.view(B, K*S)   # concatenated per question, with the matching mask
    log p(y|x, z_1..z_K) = decoder(fused, y)         # one decoder pass, (B, T); the fused output-layer loss

No marginal over passages: ``score`` gives one read per question (B, 1, T) and ``marginal_inputs`` a prior of
p = 1 on it. Decoding (greedy or beam) runs ``models.decode`` on the fused states (the encoder once, then the
decoder stepped with its KV cache). Any encoder-decoder the seq2seq reader takes (BART, T5, bert2bert), with
LoRA, gradient checkpointing, bf16 and FSDP as the seq2seq reader has them (same model, same units).

Retriever training (the reader has no per-passage likelihood of its own): ``attention=True`` gives the
decoder's cross-attention mass on each passage's encoder row, averaged over layers, heads and target tokens
(``models.objectives.passage_attention``, the ``adist`` target); ``score_each`` the per-passage
likelihoods of Atlas's "loop" mode (each row alone through encoder and decoder) for pdist / emdr2 / lsr.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput

from rag_lightning.models import decode
from rag_lightning.models.marginalize import AnswerLogProbs, answer_logprobs, answer_logprobs_fused
from rag_lightning.models.objectives import passage_attention
from rag_lightning.readers.base import States, one_read
from rag_lightning.readers.seq2seq import Generator, shift_right


class FidGenerator(Generator):
    """A seq2seq model read as Fusion-in-Decoder (``model.variant=fid``)."""

    fusion = True
    variants = ("fid",)
    fsdp_methods = (*Generator.fsdp_methods, "pair_states")

    def scored_rows(self, src: Tensor, labels: Tensor) -> int:
        return 1  # one read of all K passages per question

    def fuse(self, enc: Tensor, mask: Tensor, n_questions: int) -> tuple[Tensor, Tensor]:
        """Per-pair encoder states (B*K, S, H) and mask (B*K, S) -> (B, K*S, H), (B, K*S)."""
        return enc.reshape(n_questions, -1, enc.shape[-1]), mask.reshape(n_questions, -1)

    def _read_states(
        self,
        src: Tensor,
        mask: Tensor,
        labels: Tensor,
        segments: Tensor | None = None,
        attention: bool = False,
    ) -> States:
        """src / mask (B*K, S), labels (B, T) -> decoder states (B, T, H) over the fused encoder states; with
        ``attention`` the cross-attention mass on each passage (B, K)."""
        b, s = labels.shape[0], src.shape[1]
        k = src.shape[0] // b
        enc, fmask = self.fuse(self.encode(src, mask), mask, b)  # (B, K*S, H), (B, K*S)
        h, cross = self.decoder_states(enc, fmask, labels, attention)
        mass = None
        if attention:
            seg = (torch.arange(k * s, device=src.device) // s).expand(b, -1)  # (B, K*S): the row's passage
            mass = passage_attention(torch.stack(cross).detach(), seg, k, labels != -100)  # a target: no grad
        return States(h, None, mass)

    def forward(self, src: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) for sources (B*K, S) and labels (B, T)."""
        b = labels.shape[0]
        enc = self.model.get_encoder()(input_ids=src, attention_mask=mask)[0]  # (B*K, S, H)
        enc, fmask = self.fuse(enc, mask, b)
        dec = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=fmask,
            decoder_input_ids=dec, use_cache=False,
        )  # fmt: skip
        return out.logits

    def marginal_inputs(self, doc_scores: Tensor, variant: str) -> tuple[Tensor, str]:
        return one_read(doc_scores), "token"  # one read: p = 1, the loss is -sum_t log p(y_t | x, z_1..z_K)

    def single_sources(
        self, q: Tensor, q_len: Tensor, p: Tensor, p_len: Tensor, n_docs: int
    ) -> tuple[Tensor, Tensor]:
        """Single-passage inputs for the loop pass: the same (question, passage) rows."""
        return self.assemble_sources(q, q_len, p, p_len, n_docs)

    def score_each(
        self, src: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> AnswerLogProbs:
        """Atlas's "loop": log p(y_t | x, z_k, y_<t) (B, K, T) with each (question, passage) row alone through
        encoder and decoder (the seq2seq reader's pass over the same rows)."""
        k = src.shape[0] // labels.shape[0]
        rep = labels.repeat_interleave(k, 0)  # (B*K, T)
        head = self.output_layer()
        if head is None:
            return answer_logprobs(Generator.forward(self, src, mask, rep), labels, k, positions=positions)
        h = self.pair_states(src, mask, rep)  # (B*K, T, H)
        return answer_logprobs_fused(h, *self.output_layer(), labels, k, positions=positions)

    def pair_states(self, src: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Decoder states (B*K, T, H) of each (question, passage) row alone, labels (B*K, T)."""
        return self.decoder_states(self.encode(src, mask), mask, labels)[0]

    def generate(
        self, src: Tensor, mask: Tensor, doc_scores: Tensor, variant: str, mode: str = "fast", **kw: Any
    ) -> Tensor:
        """Greedy / beam decoding from the fused encoder states -> (B, L) ids."""
        b = doc_scores.shape[0]
        model = _FusedEncoder(self.model, src.shape[0] // b)
        return decode.rag_token_generate(
            model, src.reshape(b, -1), mask.reshape(b, -1), one_read(doc_scores), **kw
        )


class _FusedEncoder:
    """The transformers model seen by ``models.decode.Seq2SeqSteps`` with a FiD encoder: sources (B, K*S) are
    split into the K rows of S tokens, encoded separately and concatenated back to (B, K*S, H)."""

    def __init__(self, model: Any, n_docs: int):
        self.model, self.n_docs = model, n_docs

    def get_encoder(self) -> Any:
        return self._encode

    def _encode(self, input_ids: Tensor, attention_mask: Tensor, return_dict: bool = True) -> BaseModelOutput:
        b = input_ids.shape[0]
        rows, rows_mask = input_ids.reshape(b * self.n_docs, -1), attention_mask.reshape(b * self.n_docs, -1)
        enc = self.model.get_encoder()(input_ids=rows, attention_mask=rows_mask, return_dict=True)
        h = enc.last_hidden_state  # (B*K, S, H)
        return BaseModelOutput(last_hidden_state=h.reshape(b, -1, h.shape[-1]))

    def __call__(self, **kw: Any) -> Any:
        return self.model(**kw)


__all__ = ["FidGenerator"]
