"""Retriever objectives against float64 python loops written from the papers' definitions."""

from __future__ import annotations

import math

import pytest
import torch

from rag_lightning.models.objectives import (
    contrastive_loss,
    emdr2_loss,
    entropy,
    lsr_loss,
    pdist_loss,
    scale_grad,
)


def _inputs(b=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_lp = -torch.rand(b, k, generator=g, dtype=torch.float64) * 8  # log-likelihoods <= 0
    scores = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    return seq_lp, scores


def _softmax(xs, t=1.0):
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    return [v / sum(e) for v in e]


def _ref(name, seq_lp, scores, t=1.0, tt=1.0):
    out = []
    for lp_row, s_row in zip(seq_lp.tolist(), scores.tolist()):
        pr = _softmax(s_row, t)
        if name == "emdr2":  # -log sum_z p_R(z|x) p(y|x,z)
            out.append(-math.log(sum(p * math.exp(lp) for p, lp in zip(pr, lp_row))))
            continue
        q = _softmax(lp_row, tt)
        if name == "pdist":  # KL(Q || P_R)
            out.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, pr)))
        else:  # lsr: KL(P_R || Q)
            out.append(sum(pi * math.log(pi / qi) for qi, pi in zip(q, pr)))
    return torch.tensor(out, dtype=torch.float64)


FNS = {"emdr2": emdr2_loss, "pdist": pdist_loss, "lsr": lsr_loss}


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.5, 2.0), (3.0, 0.25)])
def test_matches_definition(name, temps):
    seq_lp, scores = _inputs(seed=sorted(FNS).index(name))
    t, tt = temps
    kw = {"temperature": t} if name == "emdr2" else {"temperature": t, "target_temperature": tt}
    got = FNS[name](seq_lp, scores, **kw)
    assert got.shape == (4,) and got.dtype == torch.float64
    torch.testing.assert_close(got, _ref(name, seq_lp, scores, t, tt), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(FNS))
def test_gradient_only_into_scores(name):
    """The generator's likelihoods are a stop-gradient target: no gradient reaches seq_lp."""
    seq_lp, scores = _inputs(seed=3)
    seq_lp.requires_grad_(True)
    scores.requires_grad_(True)
    FNS[name](seq_lp, scores).sum().backward()
    assert seq_lp.grad is None
    assert scores.grad is not None and scores.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(FNS))
def test_gradcheck(name):
    seq_lp, scores = _inputs(b=2, k=3, seed=5)
    scores.requires_grad_(True)
    kw = {"temperature": 0.7} if name == "emdr2" else {"temperature": 0.7, "target_temperature": 1.3}
    assert torch.autograd.gradcheck(lambda s: FNS[name](seq_lp, s, **kw), (scores,))


def test_emdr2_gradient_is_prior_minus_posterior():
    """d emdr2 / d scores = (p_R - posterior) / temperature: the retriever moves towards the posterior."""
    seq_lp, scores = _inputs(seed=7)
    t = 2.0
    scores.requires_grad_(True)
    emdr2_loss(seq_lp, scores, temperature=t).sum().backward()
    prior = torch.softmax(scores.detach() / t, -1)
    post = prior * seq_lp.exp()
    post = post / post.sum(-1, keepdim=True)
    torch.testing.assert_close(scores.grad, (prior - post) / t)


def test_kl_objectives_vanish_at_the_target():
    seq_lp, _ = _inputs(seed=9)
    for fn in (pdist_loss, lsr_loss):
        got = fn(seq_lp, seq_lp.clone() * 2.0, temperature=2.0, target_temperature=1.0)  # same distribution
        torch.testing.assert_close(got, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
        assert (fn(*_inputs(seed=11)) > 0).all()


def _contrastive_ref(scores, gold, t):
    out = []
    for s_row, g_row in zip(scores.tolist(), gold.tolist()):
        if not any(g_row):
            out.append(0.0)
            continue
        p = _softmax(s_row, t)
        out.append(-math.log(sum(pi for pi, g in zip(p, g_row) if g)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("t", [1.0, 0.05])
def test_contrastive_matches_definition(t):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, generator=g, dtype=torch.float64)
    gold = torch.zeros(5, 7, dtype=torch.bool)
    gold[0, 0] = True  # DPR: one positive, the others negatives
    gold[1, [2, 5]] = True  # two gold passages among the candidates
    gold[2, 6] = True
    gold[4, :] = True  # every candidate is gold: loss 0
    got = contrastive_loss(scores, gold, temperature=t)  # row 3 has no gold: 0
    torch.testing.assert_close(got, _contrastive_ref(scores, gold, t), atol=1e-10, rtol=1e-10)
    assert got[3] == 0 and abs(got[4]) < 1e-12
    s = scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, gold, temperature=t), (s,))
    s.grad = None
    contrastive_loss(s, gold).sum().backward()
    assert (s.grad[3] == 0).all()  # a row without gold sends no gradient


def test_contrastive_ignores_padded_candidates():
    scores = torch.tensor([[2.0, 1.0, float("-inf")]])
    gold = torch.tensor([[True, False, False]])
    want = -torch.log_softmax(torch.tensor([2.0, 1.0]), -1)[0]
    torch.testing.assert_close(contrastive_loss(scores, gold), want[None])


def test_entropy_and_scale_grad():
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy(s), torch.tensor([math.log(4), 0.0]), atol=1e-6, rtol=0)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    for w in (0.0, 0.25, 1.0):
        x.grad = None
        y = scale_grad(x, w)
        torch.testing.assert_close(y.detach(), x.detach())
        if w == 0:
            assert not y.requires_grad
            continue
        (3 * y).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((2,), 3 * w))


def test_bad_shapes_and_temperatures():
    seq_lp, scores = _inputs()
    with pytest.raises(ValueError, match="one shape"):
        emdr2_loss(seq_lp, scores[:, :3])
    with pytest.raises(ValueError, match="> 0"):
        pdist_loss(seq_lp, scores, target_temperature=0.0)
    with pytest.raises(ValueError, match="one shape"):
        contrastive_loss(scores, torch.zeros(4, 2, dtype=torch.bool))


def test_float32_inputs_stay_float32():
    seq_lp, scores = _inputs()
    for fn in (emdr2_loss, pdist_loss, lsr_loss):
        assert fn(seq_lp.float(), scores.half()).dtype == torch.float32
