"""Chunked per-token log-prob kernels and the fused output layer + RAG marginal loss, against the logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rag_lightning.models import token_logprob as TL
from rag_lightning.models.marginalize import (
    answer_logprobs,
    answer_logprobs_fused,
    label_positions,
    rag_loss,
    rag_sequence_nll,
    rag_token_nll,
)
from rag_lightning.models.token_logprob import linear_token_logprobs, token_logprobs


def _case(b=3, k=4, t=6, h=5, v=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b * k, t, h, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    scores = torch.randn(b, k, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 4:] = -100  # trailing padding
    labels[1, 2] = -100  # padding in the middle
    labels[-1, 1:] = -100
    return hidden, weight, bias, scores, labels


def test_token_logprobs_match_log_softmax():
    x = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (9,))
    tok, mean = token_logprobs(x, y, mean=True)
    lsm = F.log_softmax(x, -1)
    torch.testing.assert_close(tok, lsm.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(mean, lsm.mean(-1))
    assert torch.autograd.gradcheck(lambda a: token_logprobs(a, y, mean=True), (x,))
    rows = torch.tensor([7, 0, 3])  # a subset: unscored rows get zero gradient
    assert torch.autograd.gradcheck(lambda a: token_logprobs(a, y[:3], True, rows), (x,))
    with torch.no_grad():
        x[5] = 1e30  # huge logits in an unscored row: still exactly zero gradient there, no nan
    (grad,) = torch.autograd.grad(token_logprobs(x, y[:3], True, rows)[0].sum(), x)
    assert torch.isfinite(grad).all() and (grad[[1, 2, 4, 5, 6, 8]] == 0).all()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_kernel_gradcheck(bias, monkeypatch):
    monkeypatch.setattr(TL, "FUSED_CHUNK_ELEMS", 20)  # several chunks of 2 rows
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 9, (7,), generator=g)
    args = (h, w, b) if bias else (h, w)

    def fn(h, w, b=None):
        return linear_token_logprobs(h, w, b, y, mean=True)

    assert torch.autograd.gradcheck(fn, args)
    tok, mean = fn(*args)
    ref_tok, ref_mean = token_logprobs(F.linear(h, w, b), y, mean=True)
    torch.testing.assert_close(tok, ref_tok)
    torch.testing.assert_close(mean, ref_mean)


@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("chunk", [1 << 21, 30])
def test_fused_equals_logits_path(variant, eps, chunk, monkeypatch):
    """Value and gradients (hidden, W, bias, doc scores) of the fused loss = the logits path, float64, 1e-5."""
    monkeypatch.setattr(TL, "CHUNK_ELEMS", chunk)
    monkeypatch.setattr(TL, "FUSED_CHUNK_ELEMS", chunk)
    hidden, weight, bias, scores, labels = _case(seed=2)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias, scores)]
    ref_fn = {"token": rag_token_nll, "sequence": rag_sequence_nll}[variant]
    ref = ref_fn(F.linear(leaves[0], leaves[1], leaves[2]), leaves[3], labels, epsilon=eps)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    fused = [x.clone().requires_grad_(True) for x in (hidden, weight, bias, scores)]
    lp = answer_logprobs_fused(fused[0], fused[1], fused[2], labels, 4, smooth=eps > 0)
    got = rag_loss(lp, fused[3], variant, eps)
    grads = torch.autograd.grad(got.sum(), fused)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert got[-1] > 0 and ref_grads[0].abs().sum() > 0


def test_seq_lp_and_positions():
    hidden, weight, bias, scores, labels = _case(seed=3)
    logits = F.linear(hidden, weight, bias)  # (B*K, T, V)
    lp = answer_logprobs(logits, labels, 4, positions=label_positions(labels))
    lsm = F.log_softmax(logits, -1).view(3, 4, 6, -1)
    tgt = labels.masked_fill(labels == -100, 0)[:, None, :, None].expand(3, 4, 6, 1)
    want = lsm.gather(-1, tgt).squeeze(-1).masked_fill((labels == -100)[:, None, :], 0.0)  # (B, K, T)
    torch.testing.assert_close(lp.tok_lp, want)
    torch.testing.assert_close(lp.seq_lp, want.sum(-1))
    fused = answer_logprobs_fused(hidden, weight, bias, labels, 4)
    torch.testing.assert_close(fused.seq_lp, want.sum(-1))
    # RAG-Sequence loss is -logsumexp(doc_lp + seq_lp)
    torch.testing.assert_close(
        rag_loss(lp, scores, "sequence"), -torch.logsumexp(scores.log_softmax(-1) + want.sum(-1), 1)
    )
    with pytest.raises(ValueError, match="smoothing"):
        rag_loss(lp, scores, "token", epsilon=0.1)
    with pytest.raises(ValueError, match="variant"):
        rag_loss(lp, scores, "tokens")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision(dtype):
    hidden, weight, bias, scores, labels = _case(seed=4, v=40, h=8)
    h = hidden.to(dtype).requires_grad_(True)
    w = weight.to(dtype).requires_grad_(True)
    lp = answer_logprobs_fused(h, w, bias.to(dtype), labels, 4, smooth=True)
    assert lp.tok_lp.dtype == torch.float32
    loss = rag_loss(lp, scores.float(), "token", 0.1).sum()
    loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype and torch.isfinite(w.grad.float()).all()
    ref = rag_token_nll(
        F.linear(h.double(), w.double(), bias.to(dtype).double()), scores, labels, epsilon=0.1
    )
    torch.testing.assert_close(loss.double(), ref.sum(), atol=1e-2, rtol=1e-3)


def test_fused_under_cpu_autocast():
    hidden, weight, bias, scores, labels = _case(seed=5, v=40, h=8, dtype=torch.float32)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = answer_logprobs_fused(hidden, w, bias, labels, 4)
        loss = rag_loss(lp, scores, "sequence").sum()
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = rag_sequence_nll(F.linear(hidden, weight, bias), scores, labels).sum()
    torch.testing.assert_close(loss, ref, atol=0.05 * ref.abs().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_fused_cuda_bf16_autocast(variant):
    """On the GPU under bf16 autocast (trainer precision bf16-mixed): close to the float64 logits path, and
    label positions given by the collator keep the loss free of host-device syncs."""
    hidden, weight, bias, scores, labels = _case(seed=6, v=300, h=16)
    dev = torch.device("cuda")
    h = hidden.float().to(dev).requires_grad_(True)
    w = weight.float().to(dev).requires_grad_(True)
    pos = label_positions(labels).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.set_sync_debug_mode("error")
        try:
            lp = answer_logprobs_fused(h, w, bias.float().to(dev), labels.to(dev), 4, positions=pos)
            loss = rag_loss(lp, scores.float().to(dev), variant).sum()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ref_fn = {"token": rag_token_nll, "sequence": rag_sequence_nll}[variant]
    ref = ref_fn(F.linear(hidden, weight, bias), scores, labels).sum()
    torch.testing.assert_close(loss.double().cpu(), ref, atol=0.03 * ref.abs().item(), rtol=0)
    assert torch.isfinite(w.grad).all() and w.grad.dtype == torch.float32
