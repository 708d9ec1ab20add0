"""rag_sequence_nll / rag_token_nll against brute-force float64 python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rag_lightning.models import token_logprob as TL
from rag_lightning.models.marginalize import rag_sequence_nll, rag_token_nll


def _inputs(b=3, k=4, t=5, v=7, dtype=torch.float64, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b * k, t, v, generator=g, dtype=torch.float64) * 2
    scores = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    if pad:
        labels[0, 3:] = -100  # trailing padding
        labels[1, 1] = -100  # padding in the middle (still ignored)
        labels[-1, :] = -100  # all padding
    return logits.to(dtype), scores.to(dtype), labels


def _brute_one(lp_rows, prior, labels_row, kind, lp_fn):
    """One question. lp_rows[z]: (T, V) log-softmax under passage z; lp_fn(lp, j) -> token log-prob."""
    k, t = len(prior), len(labels_row)
    if kind == "seq":
        tot = 0.0
        for z in range(k):
            prod = 1.0
            for j in range(t):
                if labels_row[j] != -100:
                    prod *= math.exp(lp_fn(lp_rows[z], j))
            tot += prior[z] * prod
        return -math.log(tot)
    tot = 0.0
    for j in range(t):
        if labels_row[j] != -100:
            tot += -math.log(sum(prior[z] * math.exp(lp_fn(lp_rows[z], j)) for z in range(k)))
    return tot


def _brute(logits, scores, labels, kind, eps=0.0):
    """Loops over questions, passages and tokens, float64, straight from the definitions."""
    logits, scores = logits.double(), scores.double()
    b, k = scores.shape
    out = []
    for i in range(b):
        prior = [math.exp(s) for s in scores[i].tolist()]
        prior = [p / sum(prior) for p in prior]
        lp_rows = [F.log_softmax(logits[i * k + z], -1) for z in range(k)]  # (T, V) each
        row = labels[i].tolist()
        nll = _brute_one(lp_rows, prior, row, kind, lambda lp, j, row=row: lp[j, row[j]].item())
        smooth = _brute_one(lp_rows, prior, row, kind, lambda lp, j: lp[j].mean().item())
        out.append((1 - eps) * nll + eps * smooth)
    return torch.tensor(out, dtype=torch.float64)


FNS = {"seq": rag_sequence_nll, "tok": rag_token_nll}


@pytest.mark.parametrize("kind", ["seq", "tok"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(kind, seed):
    logits, scores, labels = _inputs(seed=seed)
    got = FNS[kind](logits, scores, labels)
    assert got.shape == (3,) and got.dtype == torch.float64
    torch.testing.assert_close(got, _brute(logits, scores, labels, kind), atol=1e-10, rtol=1e-10)
    assert got[-1].item() == 0.0  # all-padding row


@pytest.mark.parametrize("kind", ["seq", "tok"])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_label_smoothing_brute_force(kind, eps):
    logits, scores, labels = _inputs(seed=3)
    got = FNS[kind](logits, scores, labels, epsilon=eps)
    torch.testing.assert_close(got, _brute(logits, scores, labels, kind, eps), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["seq", "tok"])
def test_reductions_and_ignore_index(kind):
    logits, scores, labels = _inputs(seed=4)
    fn = FNS[kind]
    none = fn(logits, scores, labels)
    torch.testing.assert_close(fn(logits, scores, labels, reduction="sum"), none.sum())
    torch.testing.assert_close(fn(logits, scores, labels, reduction="mean"), none.mean())
    other = labels.masked_fill(labels == -100, 0 - 1)
    torch.testing.assert_close(fn(logits, scores, other, ignore_index=-1), none)
    with pytest.raises(ValueError, match="reduction"):
        fn(logits, scores, labels, reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        fn(logits[:-1], scores, labels)


@pytest.mark.parametrize("kind", ["seq", "tok"])
def test_gradcheck(kind):
    logits, scores, labels = _inputs(b=2, k=3, t=4, v=5, seed=5)
    labels[1, 2:] = -100
    logits.requires_grad_(True)
    scores.requires_grad_(True)
    fn = FNS[kind]
    assert torch.autograd.gradcheck(lambda a, s: fn(a, s, labels), (logits, scores))
    assert torch.autograd.gradcheck(lambda a, s: fn(a, s, labels, epsilon=0.2), (logits, scores))


@pytest.mark.parametrize("kind", ["seq", "tok"])
def test_grad_reaches_doc_scores(kind):
    logits, scores, labels = _inputs(seed=6, pad=False)
    scores = scores.float().requires_grad_(True)
    FNS[kind](logits.float(), scores, labels, reduction="sum").backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 1e-4
    # softmax invariance: the doc-score gradient sums to zero per question
    torch.testing.assert_close(scores.grad.sum(1), torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["seq", "tok"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gives_float32(kind, dtype):
    logits, scores, labels = _inputs(seed=7, v=50)
    lo, slo = logits.to(dtype), scores.to(dtype)
    got = FNS[kind](lo.requires_grad_(True), slo, labels, epsilon=0.1)
    assert got.dtype == torch.float32
    ref = FNS[kind](lo.double(), slo.double(), labels, epsilon=0.1)  # same rounded inputs
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)
    got.sum().backward()
    assert lo.grad.dtype == dtype and torch.isfinite(lo.grad.float()).all()


def test_k1_is_token_cross_entropy():
    logits, scores, labels = _inputs(k=1, seed=8)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    torch.testing.assert_close(rag_sequence_nll(logits, scores, labels), ce)
    torch.testing.assert_close(rag_token_nll(logits, scores, labels), ce)
    ce_ls = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=-100, reduction="none", label_smoothing=0.3
    ).sum(1)  # with K=1 our smoothing coincides with torch's label_smoothing
    torch.testing.assert_close(rag_token_nll(logits, scores, labels, epsilon=0.3), ce_ls)


def test_chunked_logsumexp(monkeypatch):
    monkeypatch.setattr(TL, "CHUNK_ELEMS", 10)  # force several chunks
    logits, scores, labels = _inputs(seed=9)
    logits.requires_grad_(True)
    got = rag_token_nll(logits, scores, labels, reduction="sum")
    (g,) = torch.autograd.grad(got, logits)
    monkeypatch.setattr(TL, "CHUNK_ELEMS", 1 << 24)
    ref = rag_token_nll(logits, scores, labels, reduction="sum")
    (gref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, gref)


@pytest.mark.parametrize("kind", ["seq", "tok"])
def test_gradcheck_without_padding(kind):
    """Every row scored, K > 1: the kernel's rows come in (position, passage) order, not row order."""
    logits, scores, labels = _inputs(b=2, k=3, t=4, v=5, seed=10, pad=False)
    logits.requires_grad_(True)
    fn = FNS[kind]
    assert torch.autograd.gradcheck(lambda a: fn(a, scores, labels, epsilon=0.2), (logits,))
