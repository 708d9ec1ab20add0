"""Per-token log-probabilities of targets, chunked, with one gradient buffer: pure tensor kernels.

For rows n (one per scored target position) with logits x_n (V,) and target y_n:

    tok_lp[n]  = x_n[y_n] - lse(x_n)               log p(y_n)
    mean_lp[n] = mean_v(x_n) - lse(x_n)            (1/V) sum_v log p(v)   (label smoothing, optional)

    d tok_lp / d x_n  = onehot(y_n) - softmax(x_n)
    d mean_lp / d x_n = 1/V          - softmax(x_n)

Two autograd functions compute them without a (N, V) log-softmax or any second (N, V) temporary:

* :func:`token_logprobs` takes the logits (M, V) and the N scored rows; its backward writes
  ``g * onehot + gm / V - (g + gm) * softmax`` into ONE (M, V) buffer. When most rows are scored and the logits
  are float32 / float64, forward writes the log-softmax of every row into that buffer (one op) and backward
  turns it into the gradient in place (exp, one scaling op); otherwise forward keeps only its inputs and
  backward recomputes the softmax block by block.
* :func:`linear_token_logprobs` takes the hidden states (N, H) and the output layer (W (V, H), bias (V,)) and
  computes the logits block by block, reduces each to the (N,) statistics, and in backward accumulates
  grad_hidden = G W, grad_W += G^T h, grad_b += sum G (Liger's fused linear cross-entropy / Apple's Cut
  Cross-Entropy idea). The blocks' logits that fit in a memory budget (``cache_mb``, default
  ``FUSED_CACHE_MB`` or :func:`fused_cache_budget`'s) are kept for backward, which turns them into the
  gradient in place (three matmuls, like the unfused layer); the other blocks' logits are dropped and
  recomputed in backward (a fourth matmul, no (N, V) tensor). Kept or recomputed, backward sees the same
  logits (same blocks, same ops), so both give bitwise the same results.

Blocks are sized by an element budget (``CHUNK_ELEMS``, ``FUSED_CHUNK_ELEMS``), split evenly, so that every
op is large: a CPU op pays one fork / join of its threads, and on a machine whose cores are shared a join
waits for a descheduled thread, so many small ops cost far more than a few large ones (and more with more
threads). Each block is a handful of ops: one fused (log-)softmax kernel (which reads a row while it is in
cache) instead of max / sub / exp / sum, one scaling op, matmuls with the bias fused (``addmm``), outputs
written in place into one reused buffer, and no ``index_select`` (its CPU kernel is slow under contention):
the logits kernel walks contiguous row slices when most rows are scored and gathers the scored rows with
advanced indexing otherwise.

Statistics are float32 (float64 for float64 inputs) also for bf16 / fp16 inputs; the matmuls of the fused
kernel run in the autocast dtype when autocast is on (else in the hidden states' dtype).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["fused_cache_budget", "linear_token_logprobs", "token_logprobs"]

CHUNK_ELEMS = 1 << 22  # elements of one block of logits (16 MiB of float32): rows ~ CHUNK_ELEMS // V
FUSED_CHUNK_ELEMS = 1 << 23  # the fused kernel's blocks (their logits are recomputed by a matmul)
FUSED_CACHE_MB = (
    256.0  # the fused kernel keeps up to this many MiB of logits for backward (model.fused_loss_cache_mb)
)
DENSE = 0.6  # the logits kernel walks all M rows in slices when at least this share of them is scored


_CACHE_MB: ContextVar[float | None] = ContextVar("fused_loss_cache_mb", default=None)


@contextmanager
def fused_cache_budget(mb: float | None) -> Iterator[None]:
    """Within the block, :func:`linear_token_logprobs` without ``cache_mb`` keeps up to ``mb`` MiB of logits
    for backward (None: ``FUSED_CACHE_MB``; 0: recompute them all)."""
    if mb is not None and mb < 0:
        raise ValueError(f"the fused loss's cache budget must be >= 0 MiB, got {mb}")
    token = _CACHE_MB.set(mb)
    try:
        yield
    finally:
        _CACHE_MB.reset(token)


def _cached_rows(blocks: list[slice], v: int, dt: torch.dtype, mb: float | None) -> int:
    """Rows of the leading whole blocks whose (rows, V) logits in ``dt`` fit in ``mb`` MiB."""
    mb = _CACHE_MB.get() if mb is None else mb
    mb = FUSED_CACHE_MB if mb is None else mb
    fit = int(mb * 2**20) // (v * torch.finfo(dt).bits // 8)
    return max([0] + [s.stop for s in blocks if s.stop <= fit])


def stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocks(n: int, v: int, elems: int) -> list[slice]:
    """n rows of width v in even blocks of about ``elems`` elements (at least one row each)."""
    per = max(1, elems // max(v, 1))
    count = -(-n // per)
    step = -(-n // max(count, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _scratch(buf: Tensor | None, n: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A (rows, V) scratch buffer reused by every block: made on first use (the first block is the largest)."""
    if buf is None:
        buf = torch.empty((n, like.shape[1]), dtype=dtype, device=like.device)
    return buf


def _scale_(p: Tensor, g: Tensor, gm: Tensor | None, y: Tensor) -> Tensor:
    """In place: p (n, V) = softmax -> d(sum g tok_lp + gm mean_lp)/dx = g onehot + gm/V - (g + gm) p."""
    if gm is None:
        p.mul_(-g[:, None])
    else:
        torch.addcmul(gm[:, None] / p.shape[1], p, -(g + gm)[:, None], out=p)
    return p.scatter_add_(1, y[:, None], g[:, None])


class _TokenLogProb(torch.autograd.Function):
    """Visits either every row of x in slices (``dense``: the per-row inputs live on all M rows, unscored rows
    get g = 0) or the N scored rows in index blocks (gathered); ``pick`` maps back to the N scored rows."""

    @staticmethod
    def _plan(x: Tensor, rows: Tensor, *vals: Tensor) -> tuple[bool, list, list[Tensor]]:
        m, n = x.shape[0], rows.shape[0]
        dense = n >= DENSE * m
        if dense:  # per-row values on all M rows (0 at unscored rows): no gather, no host sync
            vals = [v.new_zeros(m).index_copy_(0, rows, v) for v in vals]
        idx = _blocks(m if dense else n, x.shape[1], CHUNK_ELEMS)
        return dense, [s if dense else rows[s] for s in idx], [*vals]

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, y: Tensor, mean: bool):  # x (M, V), rows (N,), y (N,)
        dt = stat_dtype(x)
        dense, blocks, (yv,) = _TokenLogProb._plan(x, rows, y)
        tok = x.new_empty(yv.shape[0], dtype=dt)  # (L,) L = M (dense) or N
        mlp = torch.empty_like(tok) if mean else None
        buf, at, ctx.lsm = None, 0, None
        ctx.whole = dense and x.dtype == dt
        if ctx.whole:  # one op over all rows, into the buffer that backward makes the gradient
            buf = ctx.lsm = torch.empty_like(x)
            blocks = [slice(0, x.shape[0])]
        for blk in blocks:
            xb = x[blk]  # (n, V): a view (dense) or a gathered copy
            n, s = xb.shape[0], slice(at, at + xb.shape[0])
            if dense or xb.dtype != dt:
                buf = _scratch(buf, n, x, dt)
                out = buf[:n]
            else:
                out = xb  # the gathered copy is ours: in place
            lsm = torch.log_softmax(xb, -1, dtype=dt, out=out)
            tok[s] = lsm.gather(1, yv[s, None]).squeeze(1)
            if mean:
                mlp[s] = lsm.mean(-1)
            at += n
        ctx.save_for_backward(x, rows, y)
        if dense:
            tok, mlp = tok[rows], (mlp[rows] if mean else None)
        return tok, mlp if mean else tok.new_zeros(0)

    @staticmethod
    def backward(ctx, g: Tensor, gm: Tensor):
        x, rows, y = ctx.saved_tensors
        mean = gm is not None and gm.numel() > 0
        dt = stat_dtype(x)
        vals = (y, g.to(dt), gm.to(dt)) if mean else (y, g.to(dt))
        dense, blocks, vals = _TokenLogProb._plan(x, rows, *vals)
        yv, gv, gmv = vals[0], vals[1], (vals[2] if mean else None)
        if ctx.whole:  # forward's log-softmax of every row: exp -> softmax -> gradient, in place
            grad, ctx.lsm = ctx.lsm, None  # used once; a second backward (retain_graph) computes it again
            if grad is None:
                grad = torch.log_softmax(x, -1, dtype=dt, out=torch.empty_like(x))
            return _scale_(grad.exp_(), gv, gmv, yv), None, None, None
        # the one (M, V) buffer; unscored rows: exactly 0 (sparse), or (g + gm) = 0 times softmax (dense)
        grad = torch.empty_like(x) if dense else torch.zeros_like(x)
        buf, at = None, 0
        for blk in blocks:
            xb = x[blk]
            n, s = xb.shape[0], slice(at, at + xb.shape[0])
            if dense and x.dtype == dt:
                out = grad[blk]  # softmax straight into the gradient buffer
            elif x.dtype == dt:
                out = xb  # the gathered copy
            else:
                buf = _scratch(buf, n, x, dt)
                out = buf[:n]
            p = torch.softmax(xb, -1, dtype=dt, out=out)
            gb = _scale_(p, gv[s], None if gmv is None else gmv[s], yv[s])
            if dense and gb.data_ptr() != grad[blk].data_ptr():
                grad[blk] = gb
            elif not dense:
                grad.index_copy_(0, blk, gb.to(x.dtype))
            at += n
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, targets: Tensor, mean: bool = False, rows: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """logits (M, V), targets (N,) int -> tok_lp (N,), mean_lp (N,) or None; float32 (float64 for float64).

    ``rows`` (N,) int, distinct, any order: the rows of ``logits`` that are scored (default all, N = M); the
    others (padding) are not scored and get zero gradient.
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


class _Logits:
    """Block logits h[s] W^T + b in the statistics dtype, into ``out`` or a reused buffer (bias fused in addmm)."""

    def __init__(self, h: Tensor, w: Tensor, b: Tensor | None, mm: torch.dtype, dt: torch.dtype) -> None:
        self.h, self.w, self.mm, self.dt = h.to(mm), w.to(mm), mm, dt
        self.b = None if b is None else b.to(mm if mm == dt else dt)
        self.buf: Tensor | None = None
        self.buf_mm: Tensor | None = None

    def __call__(self, s: slice, out: Tensor | None = None) -> Tensor:
        h, n = self.h[s], s.stop - s.start
        if out is None:
            self.buf = _scratch(self.buf, n, self.w.t(), self.dt)
            out = self.buf[:n]
        if self.mm == self.dt:
            if self.b is None:
                return torch.mm(h, self.w.t(), out=out)
            return torch.addmm(self.b, h, self.w.t(), out=out)
        self.buf_mm = _scratch(self.buf_mm, n, self.w.t(), self.mm)
        out.copy_(torch.mm(h, self.w.t(), out=self.buf_mm[:n]))
        return out if self.b is None else out.add_(self.b)


class _LinearTokenLogProb(torch.autograd.Function):
    """Blocks of rows; the logits of the leading ``ctx.kept`` rows are kept (``ctx.cache`` (kept, V)) when a
    gradient is needed, the others recomputed in backward."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, mean: bool, mm: torch.dtype, mb):
        dt = stat_dtype(h)
        tok = h.new_empty(h.shape[0], dtype=dt)
        mlp = torch.empty_like(tok) if mean else None
        logits = _Logits(h, w, b, mm, dt)
        blocks = _blocks(h.shape[0], w.shape[0], FUSED_CHUNK_ELEMS)
        ctx.kept = _cached_rows(blocks, w.shape[0], dt, mb) if any(ctx.needs_input_grad[:3]) else 0
        ctx.cache = h.new_empty((ctx.kept, w.shape[0]), dtype=dt) if ctx.kept else None  # (kept, V)
        lsm_buf = None
        with torch.autocast(h.device.type, enabled=False):
            for s in blocks:
                if s.stop <= ctx.kept:  # kept: the logits stay, the log-softmax goes to a scratch block
                    x = logits(s, ctx.cache[s])  # (n, V)
                    lsm_buf = _scratch(lsm_buf, s.stop - s.start, x, dt)
                    lsm = torch.log_softmax(x, -1, out=lsm_buf[: s.stop - s.start])
                else:
                    x = logits(s)  # (n, V), overwritten by the next block
                    lsm = torch.log_softmax(x, -1, out=x)
                tok[s] = lsm.gather(1, y[s, None]).squeeze(1)
                if mean:
                    mlp[s] = lsm.mean(-1)
        ctx.save_for_backward(h, w, b, y)
        ctx.mm = mm
        return tok, mlp if mean else tok.new_zeros(0)

    @staticmethod
    def backward(ctx, g: Tensor, gm: Tensor):
        h, w, b, y = ctx.saved_tensors
        mean = gm is not None and gm.numel() > 0
        mm, dt = ctx.mm, stat_dtype(h)
        cache, ctx.cache = ctx.cache, None  # used once (in place); a second backward recomputes every block
        logits = _Logits(h, w, b, mm, dt)
        hm, wm = logits.h, logits.w
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=dt, device=w.device) if need_w else None
        gb = torch.zeros(w.shape[0], dtype=dt, device=w.device) if need_b and b is not None else None
        g, gm = g.to(dt), (gm.to(dt) if mean else None)
        with torch.autocast(h.device.type, enabled=False):
            for s in _blocks(h.shape[0], w.shape[0], FUSED_CHUNK_ELEMS):
                x = cache[s] if cache is not None and s.stop <= ctx.kept else logits(s)  # (n, V)
                gx = _scale_(torch.softmax(x, -1, out=x), g[s], None if gm is None else gm[s], y[s])
                if gb is not None:
                    gb += gx.sum(0)
                gxm = gx.to(mm)
                if gh is not None and gh.dtype == mm:
                    torch.mm(gxm, wm, out=gh[s])  # (n, H)
                elif gh is not None:
                    gh[s] = gxm @ wm
                if gw is not None:
                    if mm == dt:
                        gw.addmm_(gxm.t(), hm[s])  # (V, H)
                    else:
                        gw += (gxm.t() @ hm[s]).to(dt)
        gw = None if gw is None else gw.to(w.dtype)
        gb = None if gb is None else gb.to(b.dtype)
        return gh, gw, gb, None, None, None, None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mean: bool = False,
    cache_mb: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Same as ``token_logprobs(hidden @ weight.T + bias, targets, mean)``, holding at most ``cache_mb`` MiB of
    logits (None: :func:`fused_cache_budget`'s or ``FUSED_CACHE_MB``; 0: none, all recomputed in backward).

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
    if cache_mb is not None and cache_mb < 0:
        raise ValueError(f"the fused loss's cache budget must be >= 0 MiB, got {cache_mb}")
    mb = cache_mb if torch.is_grad_enabled() else 0.0  # no backward (eval): nothing to keep
    tok, mlp = _LinearTokenLogProb.apply(hidden, weight, bias, targets.long(), mean, _mm_dtype(hidden), mb)
    return tok, (mlp if mean else None)
