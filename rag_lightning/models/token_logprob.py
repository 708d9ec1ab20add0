"""Per-token log-probabilities of targets, chunked, with one gradient buffer: pure tensor kernels.

For rows n (one per scored target position) with logits x_n (V,) and target y_n:

    tok_lp[n]  = x_n[y_n] - lse(x_n)               log p(y_n)
    mean_lp[n] = mean_v(x_n) - lse(x_n)            (1/V) sum_v log p(v)   (label smoothing, optional)

    d tok_lp / d x_n  = onehot(y_n) - softmax(x_n)
    d mean_lp / d x_n = 1/V          - softmax(x_n)

Two autograd functions compute them without a (N, V) log-softmax or any second (N, V) temporary:

* :func:`token_logprobs` takes the logits (N, V). Forward keeps only the (N,) normalizers; backward writes
  ``g * (onehot - p) + g_mean * (1/V - p)`` into ONE (N, V) buffer, chunk by chunk.
* :func:`linear_token_logprobs` takes the hidden states (N, H) and the output layer (W (V, H), bias (V,)) and
  never holds the (N, V) logits: each chunk's logits are computed, reduced to the (N,) statistics and dropped;
  backward recomputes them chunk by chunk and accumulates grad_hidden = G W, grad_W += G^T h, grad_b += sum G
  (Liger's fused linear cross-entropy / Apple's Cut Cross-Entropy idea).

Statistics are float32 (float64 for float64 inputs) also for bf16 / fp16 inputs; the matmuls of the fused
kernel run in the autocast dtype when autocast is on (else in the hidden states' dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_token_logprobs", "token_logprobs"]

CHUNK_ELEMS = 1 << 20  # elements of one float32 chunk of logits (4 MiB); rows per chunk = CHUNK_ELEMS // V
# the fused kernel streams W (V, H) once per chunk and per matmul: larger chunks (32 MiB of logits)
FUSED_CHUNK_ELEMS = 1 << 23


def stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(v: int, elems: int | None = None) -> int:
    return max(1, (elems or CHUNK_ELEMS) // max(v, 1))


def _stats(x: Tensor, y: Tensor, mean: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (n, V) float logits, y (n,) -> lse (n,), tok_lp (n,), mean_lp (n,) | None."""
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    tok = x.gather(1, y[:, None]).squeeze(1) - lse
    return lse, tok, (x.mean(-1) - lse) if mean else None


def _grad_logits_(x: Tensor, lse: Tensor, y: Tensor, g: Tensor, gm: Tensor | None) -> Tensor:
    """In place: x (n, V) float logits -> d(sum g tok_lp + gm mean_lp)/dx = g onehot + gm/V - (g + gm) p."""
    gs = g if gm is None else g + gm  # (n,)
    x.sub_(lse[:, None]).exp_().mul_(-gs[:, None])  # -(g + gm) softmax
    x.scatter_add_(1, y[:, None], g[:, None])
    if gm is not None:
        x.add_(gm[:, None] / x.shape[1])
    return x


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, y: Tensor, mean: bool):  # x (M, V), rows (N,), y (N,)
        n, v = rows.shape[0], x.shape[1]
        dt, step = stat_dtype(x), _rows(v)
        lse, tok = x.new_empty(n, dtype=dt), x.new_empty(n, dtype=dt)
        mlp = x.new_empty(n, dtype=dt) if mean else None
        for i in range(0, n, step):
            s = slice(i, i + step)
            lse[s], tok[s], m = _stats(x.index_select(0, rows[s]).to(dt), y[s], mean)
            if mean:
                mlp[s] = m
        ctx.save_for_backward(x, rows, y, lse)
        return tok, mlp if mean else tok.new_zeros(0)

    @staticmethod
    def backward(ctx, g: Tensor, gm: Tensor):
        x, rows, y, lse = ctx.saved_tensors
        mean = gm is not None and gm.numel() > 0
        m, dt = x.shape[0], lse.dtype
        # in row order over all M rows: unscored rows get g = 0 and lse = +inf, so p = 0 and their gradient is 0
        lse = lse.new_full((m,), float("inf")).index_copy_(0, rows, lse)
        g = g.new_zeros(m).index_copy_(0, rows, g)
        gm = gm.new_zeros(m).index_copy_(0, rows, gm) if mean else gm
        y = y.new_zeros(m).index_copy_(0, rows, y)
        grad = torch.empty_like(x)  # the one (M, V) buffer, written chunk by chunk in place
        step = _rows(x.shape[1])
        for i in range(0, m, step):
            s = slice(i, i + step)
            xc = grad[s].copy_(x[s]) if x.dtype == dt else x[s].to(dt)  # in the buffer when dtypes agree
            gc = _grad_logits_(xc, lse[s], y[s], g[s].to(dt), gm[s].to(dt) if mean else None)
            if gc.data_ptr() != grad[s].data_ptr():
                grad[s] = gc
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, targets: Tensor, mean: bool = False, rows: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """logits (M, V), targets (N,) int -> tok_lp (N,), mean_lp (N,) or None; float32 (float64 for float64).

    ``rows`` (N,) int, distinct, any order: the rows of ``logits`` that are scored (default all, N = M); the
    others (padding) are not scored and get exactly zero gradient.
    """
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    if logits.dim() != 2 or targets.shape != rows.shape:
        raise ValueError(
            f"expected logits (M, V), targets (N,), rows (N,); got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(rows.shape)}"
        )
    tok, mlp = _TokenLogProb.apply(logits, rows.long(), targets.long(), mean)
    return tok, (mlp if mean else None)


def _mm_dtype(h: Tensor) -> torch.dtype:
    dev = h.device.type
    if h.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class _LinearTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, mean: bool, mm: torch.dtype):
        n, v = h.shape[0], w.shape[0]
        dt, step = stat_dtype(h), _rows(v, FUSED_CHUNK_ELEMS)
        hm, wm = h.to(mm), w.to(mm)
        lse, tok = h.new_empty(n, dtype=dt), h.new_empty(n, dtype=dt)
        mlp = h.new_empty(n, dtype=dt) if mean else None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, n, step):
                s = slice(i, i + step)
                x = _logits(hm[s], wm, b, dt)  # (n, V), dropped after the statistics
                lse[s], tok[s], m = _stats(x, y[s], mean)
                if mean:
                    mlp[s] = m
        ctx.save_for_backward(h, w, b, y, lse)
        ctx.mm = mm
        return tok, mlp if mean else tok.new_zeros(0)

    @staticmethod
    def backward(ctx, g: Tensor, gm: Tensor):
        h, w, b, y, lse = ctx.saved_tensors
        mean = gm is not None and gm.numel() > 0
        mm, dt, step = ctx.mm, lse.dtype, _rows(w.shape[0], FUSED_CHUNK_ELEMS)
        hm, wm = h.to(mm), w.to(mm)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=dt, device=w.device) if need_w else None
        gb = torch.zeros(w.shape[0], dtype=dt, device=w.device) if need_b and b is not None else None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], step):
                s = slice(i, i + step)
                x = _logits(hm[s], wm, b, dt)  # recomputed chunk logits (n, V)
                gx = _grad_logits_(x, lse[s], y[s], g[s].to(dt), gm[s].to(dt) if mean else None)
                if gb is not None:
                    gb += gx.sum(0)
                gxm = gx.to(mm)
                if gh is not None:
                    gh[s] = gxm @ wm  # (n, H)
                if gw is not None:
                    if mm == dt:
                        gw.addmm_(gxm.t(), hm[s])  # (V, H)
                    else:
                        gw += (gxm.t() @ hm[s]).to(dt)
        gw = None if gw is None else gw.to(w.dtype)
        gb = None if gb is None else gb.to(b.dtype)
        return gh, gw, gb, None, None, None


def _logits(h: Tensor, w: Tensor, b: Tensor | None, dt: torch.dtype) -> Tensor:
    x = (h @ w.t()).to(dt)  # (n, V)
    return x if b is None else x.add_(b.to(dt))


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, mean: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Same as ``token_logprobs(hidden @ weight.T + bias, targets, mean)`` without the (N, V) logits.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int -> tok_lp (N,), mean_lp (N,) or None.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H), weight (V, H); got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(
            f"expected targets (N,), bias (V,); got {tuple(targets.shape)}, {bias and tuple(bias.shape)}"
        )
    tok, mlp = _LinearTokenLogProb.apply(hidden, weight, bias, targets.long(), mean, _mm_dtype(hidden))
    return tok, (mlp if mean else None)
