"""The fused output-layer kernel's logits cache: kept (within the budget) or recomputed, the same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rag_lightning.models import token_logprob as TL
from rag_lightning.models.marginalize import answer_logprobs_fused, rag_loss
from rag_lightning.models.token_logprob import fused_cache_budget, linear_token_logprobs, token_logprobs
from rag_lightning.module import RagModule
from rag_lightning.readers import from_pretrained

V, H, N = 9, 4, 7
ROW_MB = V * 8 / 2**20  # one float64 row of logits, in MiB
BUDGETS = {"recompute": 0.0, "partial": 5 * ROW_MB, "kept": None}  # blocks of 2 rows: 4 of 7 rows kept


def _leaves(seed: int, dtype: torch.dtype = torch.float64, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) if bias else None
    return h, w, b, torch.randint(0, V, (N,), generator=g)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(TL, "FUSED_CHUNK_ELEMS", 2 * V)  # blocks of 2 rows


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_against_unfused(budget, bias):
    """float64: values = the unfused reference (logits then log-softmax), gradients pass gradcheck."""
    h, w, b, y = _leaves(0, bias=bias)
    mb = BUDGETS[budget]

    def fn(h, w, b=None):
        return linear_token_logprobs(h, w, b, y, mean=True, cache_mb=mb)

    args = (h, w, b) if bias else (h, w)
    assert torch.autograd.gradcheck(fn, args)
    tok, mean = fn(*args)
    ref_tok, ref_mean = token_logprobs(F.linear(h, w, b), y, mean=True)
    torch.testing.assert_close(tok, ref_tok)
    torch.testing.assert_close(mean, ref_mean)
    grads = torch.autograd.grad((tok - 0.3 * mean).sum(), args)
    ref = torch.autograd.grad((ref_tok - 0.3 * ref_mean).sum(), args)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r)


def _rag_grads(mb: float | None, variant: str, autocast: bool):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2 * 3, 5, H, generator=g).requires_grad_(True)  # (B*K, T, H), float32
    weight = torch.randn(V, H, generator=g).requires_grad_(True)
    bias = torch.randn(V, generator=g).requires_grad_(True)
    scores = torch.randn(2, 3, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[1, 3:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lp = answer_logprobs_fused(hidden, weight, bias, labels, 3, smooth=True, cache_mb=mb)
        loss = rag_loss(lp, scores, variant, epsilon=0.1).sum()
    return [loss.detach(), *torch.autograd.grad(loss, (hidden, weight, bias, scores))]


@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("autocast", [False, True])
def test_kept_equals_recomputed_bitwise(variant, autocast):
    """float32 (and bf16 autocast): the loss and every gradient are bitwise equal, kept or recomputed."""
    want = _rag_grads(0.0, variant, autocast)
    for mb in (3 * V * 4 / 2**20, None):  # 2 of 5 blocks kept; all kept
        for a, r in zip(_rag_grads(mb, variant, autocast), want):
            assert torch.equal(a, r)


def _count_logits(monkeypatch) -> list[int]:
    calls = [0]
    call = TL._Logits.__call__

    def counted(self, s, out=None):
        calls[0] += 1
        return call(self, s, out)

    monkeypatch.setattr(TL._Logits, "__call__", counted)
    return calls


@pytest.mark.parametrize(("budget", "recomputed"), [("recompute", 4), ("partial", 2), ("kept", 0)])
def test_backward_recomputes_only_what_was_not_kept(budget, recomputed, monkeypatch):
    h, w, b, y = _leaves(2)
    calls = _count_logits(monkeypatch)
    tok, _ = linear_token_logprobs(h, w, b, y, cache_mb=BUDGETS[budget])
    assert calls[0] == 4  # forward: 4 blocks (2 + 2 + 2 + 1 rows)
    tok.sum().backward()
    assert calls[0] == 4 + recomputed


def test_budget_context_and_second_backward(monkeypatch):
    h, w, b, y = _leaves(3)
    calls = _count_logits(monkeypatch)
    with fused_cache_budget(0):
        tok, _ = linear_token_logprobs(h, w, b, y)
    tok.sum().backward()
    assert calls[0] == 8  # nothing kept within fused_cache_budget(0)
    calls[0] = 0
    tok, _ = linear_token_logprobs(h, w, b, y)  # default budget: all kept
    first = torch.autograd.grad(tok.sum(), (h, w, b), retain_graph=True)
    second = torch.autograd.grad(tok.sum(), (h, w, b))  # the cache was consumed: recomputed, same gradients
    assert calls[0] == 4 + 4
    for a, r in zip(first, second):
        assert torch.equal(a, r)
    budgets = []
    rows = TL._cached_rows
    monkeypatch.setattr(TL, "_cached_rows", lambda *a: budgets.append(a[-1]) or rows(*a))
    with torch.no_grad():  # no backward: nothing kept, the same values
        assert torch.equal(linear_token_logprobs(h, w, b, y)[0], tok.detach())
    assert budgets == [0.0]
    with pytest.raises(ValueError, match="cache budget"):
        linear_token_logprobs(h, w, b, y, cache_mb=-1.0)


def test_module_budget(monkeypatch):
    """model.fused_loss_cache_mb reaches the kernel (0: every block recomputed); a negative one is refused."""
    gen = from_pretrained("tiny:bart", max_source_length=24)
    src, mask = gen.build_sources([[5, 6, 7]], [[7, 8, 9], [3]], 2)
    labels = torch.tensor([[5, 20, 102]])
    calls = _count_logits(monkeypatch)
    for mb, extra in ((0.0, 1), (256.0, 0)):
        calls[0] = 0
        module = RagModule(None, gen, variant="token", fused_loss_cache_mb=mb)
        lp = module.token_logprobs(src, mask, labels)
        forward = calls[0]
        lp.seq_lp.sum().backward()
        assert forward >= 1 and calls[0] == forward * (1 + extra)
    with pytest.raises(ValueError, match="fused_loss_cache_mb"):
        RagModule(None, gen, variant="token", fused_loss_cache_mb=-1)
