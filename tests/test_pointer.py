"""The pointer (copy) head's math: p(y) = (1 - g) p_vocab(y) + g sum_{i: x_i = y} a_i, in float64."""

from __future__ import annotations

import torch

from rag_lightning.models.pointer import Pointer, PointerHead, copy_logprobs, mix, mix_distribution

R, T, S, V, H = 3, 4, 6, 11, 8


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, T, V, generator=g, dtype=torch.float64)
    src = torch.randint(0, V, (R, S), generator=g)
    src[0, :2] = src[0, 3]  # a token that occurs three times in one prompt
    mask = torch.ones(R, S, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    head = PointerHead(H).double()
    h = torch.randn(R, T, H, generator=g, dtype=torch.float64)
    states = torch.randn(R, S, H, generator=g, dtype=torch.float64)
    return logits, head(h, head.keys(states), mask, src), mask


def _naive(logits, ptr: Pointer, mask):
    """(R, T, V) probabilities, one (row, position, vocabulary id) at a time."""
    p_vocab, a, g = logits.softmax(-1), ptr.attn_lp.exp(), ptr.gate.sigmoid()
    out = torch.zeros_like(p_vocab)
    for r in range(R):
        for t in range(T):
            for v in range(V):
                copied = sum(a[r, t, i] for i in range(S) if mask[r, i] and ptr.src[r, i] == v)
                out[r, t, v] = (1 - g[r, t]) * p_vocab[r, t, v] + g[r, t] * copied
    return out


def test_attention_ignores_padding_and_is_normalized():
    _, ptr, mask = _case()
    a = ptr.attn_lp.exp()
    assert a.dtype == torch.float64 and a.shape == (R, T, S)
    torch.testing.assert_close(a.sum(-1), torch.ones(R, T, dtype=torch.float64))
    assert (a[1, :, :2] == 0).all()  # padded prompt positions are never pointed at


def test_mix_distribution_is_the_pointer_generator_mixture():
    logits, ptr, mask = _case()
    got = mix_distribution(logits, ptr).exp()  # (R, T, V)
    torch.testing.assert_close(got, _naive(logits, ptr, mask))
    torch.testing.assert_close(got.sum(-1), torch.ones(R, T, dtype=torch.float64))


def test_target_scores_equal_the_full_distribution():
    """What the training loss uses (targets only) is the full mixture at the targets, including targets that
    occur several times in the prompt, once, or not at all."""
    logits, ptr, _ = _case(1)
    targets = torch.randint(0, V, (R, T), generator=torch.Generator().manual_seed(3))
    targets[0, 0] = ptr.src[0, 3]  # copied from three positions
    vocab_lp = logits.log_softmax(-1).gather(2, targets[..., None]).squeeze(-1)
    got = mix(vocab_lp, copy_logprobs(ptr, targets), ptr.gate)
    want = mix_distribution(logits, ptr).gather(2, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want)


def test_absent_target_gets_only_the_written_share_and_finite_gradients():
    logits, ptr, _ = _case(2)
    logits.requires_grad_(True)
    ptr = Pointer(ptr.attn_lp.detach(), ptr.gate.detach().requires_grad_(True), ptr.src)
    absent = next(v for v in range(V) if not (ptr.src == v).any())
    targets = torch.full((R, T), absent)
    targets[2, 1] = -100  # padding counts as absent
    clp = copy_logprobs(ptr, targets)
    assert (clp < -1e30).all()
    vocab_lp = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    got = mix(vocab_lp, clp, ptr.gate)
    torch.testing.assert_close(got, torch.nn.functional.logsigmoid(-ptr.gate) + vocab_lp)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    full = mix_distribution(logits, ptr)  # log of an exact 0 copy share: finite too
    full.sum().backward()
    assert (
        torch.isfinite(full).all()
        and torch.isfinite(logits.grad).all()
        and torch.isfinite(ptr.gate.grad).all()
    )


def test_gate_bias_starts_even():
    head = PointerHead(H)
    assert head.gate.bias.item() == 0.0 and head.dim == H
    assert PointerHead(H, dim=4).query.out_features == 4
