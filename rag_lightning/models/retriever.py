"""Dense retriever: query encoder, document encoder and the index over the corpus they define.

Retrieval is a non-differentiable top-K search with the detached query; the retrieval scores that the
generation loss sees are then recomputed with gradient, `scores[b, k] = q_b . d_{b,k} / temperature`, so the
loss trains the query encoder (and, with `train_doc_encoder`, the document encoder, by re-encoding the K
passages). `similarity: cosine` makes both encoders return unit vectors (the index then searches cosine by
inner product); the temperature is fixed, or learned as CLIP does (a log-scale parameter, clamped).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from rag_lightning.models.encoders import Encoder
from rag_lightning.retrieval.embed import RowSlice, embed_passages, pad_batch
from rag_lightning.retrieval.index import DenseIndex
from rag_lightning.retrieval.sharded import ShardedIndex, rank_world, shard_range

log = logging.getLogger(__name__)
SIMILARITIES = ("dot", "cosine")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: a learned temperature never goes below 0.01


class Retriever(nn.Module):
    def __init__(
        self,
        query_encoder: Encoder,
        doc_encoder: Encoder | None = None,
        n_docs: int = 5,
        train_query_encoder: bool = True,
        train_doc_encoder: bool = False,
        index: dict[str, Any] | None = None,
        embed_batch_size: int = 128,
        embed_precision: str = "auto",
        similarity: str = "dot",
        temperature: float = 1.0,
        learn_temperature: bool = False,
    ):
        """`doc_encoder=None` uses a copy of the query encoder (DPR-style two towers from one checkpoint).

        embed_precision: autocast dtype for re-embedding the corpus, "auto" (bf16 on CUDA and on CPUs with
        native bf16, else fp32), "bf16", "fp16" or "fp32"; stored vectors are float32 either way.
        similarity: "dot" (raw inner product) or "cosine" (both towers L2-normalize their vectors).
        temperature: p(z|x) = softmax(similarity / temperature); `learn_temperature` makes log(1/temperature)
        a trained parameter (clamped to 1/temperature <= 100).
        """
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"retriever.similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not temperature > 0:
            raise ValueError(f"retriever.temperature must be > 0, got {temperature}")
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder if doc_encoder is not None else copy.deepcopy(query_encoder)
        self.n_docs = n_docs
        self.train_doc_encoder = train_doc_encoder
        self.index_kwargs = dict(index or {})
        self.index_mode = self.index_kwargs.pop("mode", "replicated")  # replicated | sharded (under DDP)
        self.embed_batch_size = embed_batch_size
        self.embed_precision = embed_precision
        self.similarity = similarity
        self.query_encoder.normalize = self.doc_encoder.normalize = similarity == "cosine"
        scale = torch.tensor(-math.log(temperature), dtype=torch.float32)  # log(1 / temperature)
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale, persistent=False)
        self.query_encoder.requires_grad_(train_query_encoder)
        self.doc_encoder.requires_grad_(train_doc_encoder)
        if not train_doc_encoder:
            self.doc_encoder.eval()
        self.index: ShardedIndex | None = None  # not a parameter: rebuilt or reloaded, never in state_dict

    def train(self, mode: bool = True) -> Retriever:
        super().train(mode)
        if not self.train_doc_encoder:
            self.doc_encoder.eval()  # frozen: no dropout, so index and scores agree
        return self

    @property
    def doc_encoder_changes(self) -> bool:
        """Whether re-embedding the corpus can give anything new."""
        return self.train_doc_encoder

    def build_index(self, corpus, progress: bool = True, stats: dict | None = None) -> ShardedIndex:
        """Embed the passages with the current document encoder and build a new index (not swapped in).

        Replicated: every rank embeds and indexes the whole corpus. Sharded (Atlas-style, exact): rank r embeds
        and indexes rows `shard_range(N, r, world)` only, and search merges the top-k of all shards.
        """
        device = next(self.doc_encoder.parameters()).device
        rank, world = rank_world()
        start, end = (
            shard_range(len(corpus), rank, world) if self.index_mode == "sharded" else (0, len(corpus))
        )
        view = corpus.doc_token_view()
        emb = embed_passages(
            self.doc_encoder,
            view if (start, end) == (0, len(corpus)) else RowSlice(view, start, end),
            batch_size=self.embed_batch_size,
            device=device,
            pad_id=self.doc_encoder.tokenizer.pad_token_id or 0,
            progress=progress,
            stats=stats,
            amp_dtype=self.embed_precision,
        )  # (N, d)
        local = DenseIndex(dim=emb.shape[1], **self.index_kwargs)
        local.build(emb)  # (end - start, d)
        index = ShardedIndex(local, start, self.index_mode)
        index.meta["corpus"] = getattr(corpus, "fingerprint", None)
        index.meta["similarity"] = self.similarity
        return index

    def load_index(self, path: str) -> ShardedIndex:
        return ShardedIndex.load(path, self.index_mode)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, corpus=None, return_vectors=False
    ) -> tuple[torch.Tensor, ...]:
        """Top-k for a batch of questions -> (doc_scores (B, k) with grad, ids (B, k) global passage ids), and
        with `return_vectors` also the query vectors (B, d) and passage vectors (B, k, d) that scored them."""
        if self.index is None:
            raise RuntimeError("the retriever has no index yet: build_index() first")
        q = self.query_encoder(input_ids, attention_mask)  # (B, d)
        _, ids, vecs = self.index.search_with_vectors(q.detach(), k)  # (B, k), (B, k, d)
        ids = ids.to(q.device)
        if self.train_doc_encoder and self.training:
            tokens = corpus.doc_tokens(ids.flatten().tolist())
            d = self._encode_docs(tokens, q.device).view(*ids.shape, -1)  # (B, k, d), with grad
        else:
            d = vecs.to(device=q.device, dtype=q.dtype)
        scores = self.score(q, d)  # (B, k)
        return (scores, ids, q, d) if return_vectors else (scores, ids)

    def score(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """float32 q . d / temperature (also under autocast): q (B, d) with d (B, k, d) -> (B, k), each
        question against its own passages, or with d (N, d) -> (B, N), every question against all N."""
        with torch.autocast(q.device.type, enabled=False):
            scale = self.logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
            eq = "bd,bkd->bk" if d.dim() == 3 else "bd,nd->bn"
            return torch.einsum(eq, q.float(), d.float()) * scale

    def encode_passages(self, rows: list[int], corpus, device: torch.device) -> torch.Tensor:
        """Document vectors (len(rows), d) of corpus rows, with gradient only if the document encoder trains."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_doc_encoder):
            return self._encode_docs(corpus.doc_tokens(rows), device)

    def _encode_docs(self, tokens: list[list[int]], device: torch.device) -> torch.Tensor:
        ids, mask = pad_batch(tokens, self.doc_encoder.tokenizer.pad_token_id or 0)  # (B*k, L)
        return self.doc_encoder(ids.to(device), mask.to(device))  # (B*k, d)
