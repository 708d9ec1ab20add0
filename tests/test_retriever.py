"""Retriever similarity: cosine (normalized towers, the index searches the same), temperature, float32 scores."""

from __future__ import annotations

import math

import pytest
import torch

from rag_lightning.models.encoders import Encoder
from rag_lightning.models.retriever import Retriever
from rag_lightning.retrieval.sharded import ShardedIndex


def _retriever(**kw) -> Retriever:
    return Retriever(
        Encoder.from_pretrained("tiny:bert", pooling="mean"), n_docs=3, **kw
    ).eval()  # no dropout


def _batch(r: Retriever, texts: list[str]):
    t = r.query_encoder.tokenizer(texts, padding=True, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


PASSAGES = ["the eiffel tower is in paris", "rome is in italy", "a cat sat", "steam engines", "warsaw", "dna"]


def _index(r: Retriever) -> None:
    ids, mask = _batch(r, PASSAGES)
    with torch.no_grad():
        r.index = ShardedIndex.from_embeddings(r.doc_encoder(ids, mask), mode="replicated", factory="Flat")


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_scores_are_similarity_over_temperature(similarity):
    r = _retriever(similarity=similarity, temperature=0.05)
    _index(r)
    ids, mask = _batch(r, ["where is the eiffel tower", "tell me about cats"])
    scores, top = r(ids, mask, k=3)  # (2, 3)
    with torch.no_grad():
        q = r.query_encoder(ids, mask)
        d = r.doc_encoder(*_batch(r, PASSAGES))
    if similarity == "cosine":
        torch.testing.assert_close(q.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(r.index.local.vectors(torch.arange(6)).norm(dim=-1), torch.ones(6))
        want = torch.nn.functional.cosine_similarity(q[:, None], d[None], dim=-1)  # (2, 6)
    else:
        assert q.norm(dim=-1).sub(1).abs().max() > 1e-3  # raw vectors
        want = q @ d.T
    torch.testing.assert_close(scores, want.gather(1, top) / 0.05, atol=1e-4, rtol=1e-4)
    assert (
        want.gather(1, top)[:, 0] >= want.max(-1).values - 1e-5
    ).all()  # index searched the same similarity


def test_learned_temperature_trains_and_is_clamped():
    r = _retriever(similarity="cosine", temperature=0.5, learn_temperature=True)
    assert isinstance(r.logit_scale, torch.nn.Parameter) and "logit_scale" in r.state_dict()
    _index(r)
    scores, _ = r(*_batch(r, ["where is the eiffel tower"]), k=3)
    scores.logsumexp(-1).sum().backward()
    assert r.logit_scale.grad is not None and r.logit_scale.grad.abs() > 0
    with torch.no_grad():
        r.logit_scale.fill_(10.0)  # 1/temperature = e^10 > 100: clamped
        s1, _ = r(*_batch(r, ["where is the eiffel tower"]), k=3)
        r.logit_scale.fill_(math.log(100.0))
        s2, _ = r(*_batch(r, ["where is the eiffel tower"]), k=3)
    torch.testing.assert_close(s1, s2)
    fixed = _retriever(temperature=0.5)
    assert "logit_scale" not in fixed.state_dict()  # a fixed temperature leaves checkpoints as they were


def test_scores_float32_under_autocast():
    r = _retriever(similarity="cosine")
    _index(r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = r(*_batch(r, ["where is the eiffel tower"]), k=3)
    assert scores.dtype == torch.float32


def test_bad_similarity_and_temperature():
    with pytest.raises(ValueError, match="similarity"):
        _retriever(similarity="l2")
    with pytest.raises(ValueError, match="temperature"):
        _retriever(temperature=0.0)
