"""Embedding a tokenized passage corpus: length-sorted batches, inference mode, autocast; resumable chunks.

``embed_passages`` computes ``E[i] = encoder(tokens[i])`` (N, d) float32 on CPU, in the original row order.
Rows are embedded in windows of ``sort_window`` batches; inside a window rows are sorted by token length so
each batch pads to a near-uniform length (global sort when N fits in one window), then scattered back.
A background thread reads, pads and pins the batches ahead of the encoder; host-to-device copies are
non-blocking, and device-to-host copies are synchronized once per 16 batches, so the GPU does not wait.

``embed_chunks`` / ``merge_chunks`` split the corpus into fixed chunks saved as ``emb_{start}_{end}.npy``
(written atomically), so an interrupted or sharded run (``num_shards`` processes) only redoes missing chunks.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

_CHUNK_RE = re.compile(r"^emb_(\d+)_(\d+)\.npy$")


def _fetch(tokens: Any, ids: list[int]) -> list[list[int]]:
    """Token lists for ``ids`` from a plain sequence of lists or an object with ``__getitem__(list)``."""
    if isinstance(tokens, (list, tuple)):
        return [tokens[i] for i in ids]
    return tokens[ids]


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers
    return any(getattr(torch.cpu, f, lambda: False)() for f in probes)


def amp_dtype_for(device: torch.device, precision: str | torch.dtype | None = "auto") -> torch.dtype | None:
    """The autocast dtype for embedding on ``device``: ``"auto"`` (or None) is bf16 on CUDA and on CPUs with
    native bf16, fp32 (no autocast) elsewhere; ``"bf16"`` / ``"fp16"`` / ``"fp32"`` or a dtype force one."""
    if isinstance(precision, torch.dtype):
        dtype = precision
    elif precision in (None, "auto"):
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        dtype = torch.bfloat16 if native else torch.float32
    elif precision in _DTYPES:
        dtype = _DTYPES[precision]
    else:
        raise ValueError(f"embedding precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return None if dtype == torch.float32 else dtype


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (input_ids (B, L) int64, attention_mask (B, L) int64)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def embed_passages(
    encoder: nn.Module,
    tokens: Any,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    pad_id: int = 0,
    progress: bool = True,
    amp_dtype: str | torch.dtype | None = "auto",
    desc: str = "embedding corpus",
    stats: dict | None = None,
    sort_window: int = 64,
) -> torch.Tensor:
    """Embed every row of ``tokens`` with ``encoder(input_ids, attention_mask) -> (B, d)``.

    tokens: ``__len__`` + ``__getitem__(list[int]) -> list[list[int]]`` (or a plain list of token lists).
    device: defaults to the encoder's parameter device; otherwise the encoder is moved there and back.
    amp_dtype: autocast dtype, see ``amp_dtype_for`` (default: bf16 on CUDA and on CPUs with native bf16,
        where it is about 2x faster than fp32; "fp32" disables it). Embeddings are returned in float32.
    stats: if given, filled with ``seconds``, ``passages_per_s``, ``tokens``, ``padded_tokens``, ``dtype``.
    Returns (N, d) float32 CPU in the original row order; ``encoder.training`` is restored.
    """
    t0 = time.perf_counter()
    n = len(tokens)
    param = next(encoder.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    amp = amp_dtype_for(device, amp_dtype)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    was_training = encoder.training
    encoder.eval().to(device)
    out: torch.Tensor | None = None
    n_tok = n_pad = 0
    on_cuda = device.type == "cuda"
    batches = _prefetch(_padded_batches(tokens, n, batch_size, sort_window, pad_id, on_cuda), depth=4)
    try:
        with (
            torch.inference_mode(),
            autocast,
            tqdm(total=n, desc=desc, unit="psg", disable=not progress) as bar,
        ):
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, (b, d) on CPU, maybe in flight)
            for rows, input_ids, mask in batches:  # padded and pinned by a background thread
                n_tok, n_pad = n_tok + int(mask.sum()), n_pad + mask.numel()
                emb = encoder(input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
                if out is None:
                    with torch.inference_mode(False):  # a normal tensor, usable with autograd later
                        out = torch.empty((n, emb.shape[-1]), dtype=torch.float32)  # (N, d)
                pending.append((rows, emb.float().to("cpu", non_blocking=on_cuda)))  # no sync per batch
                if len(pending) >= 16:
                    _scatter(out, pending, device)
                bar.update(len(rows))
            if pending:
                _scatter(out, pending, device)
    finally:
        batches.close()
        encoder.train(was_training).to(home)
    if out is None:
        out = torch.empty((0, getattr(encoder, "dim", 0)), dtype=torch.float32)
    if stats is not None:
        secs = time.perf_counter() - t0
        stats.update(seconds=secs, passages_per_s=n / max(secs, 1e-9), tokens=n_tok, padded_tokens=n_pad)
        stats["dtype"] = str(amp or torch.float32).removeprefix("torch.")
    return out


def _padded_batches(tokens: Any, n: int, batch_size: int, sort_window: int, pad_id: int, pin: bool):
    """(original rows (b,), input_ids (b, L), mask (b, L)) per batch: windows of ``sort_window`` batches read
    at once, sorted by length inside the window so each batch pads to a near-uniform length."""
    window = batch_size * sort_window
    for w0 in range(0, n, window):
        rows = _fetch(tokens, list(range(w0, min(n, w0 + window))))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # ascending length
        for b0 in range(0, len(order), batch_size):
            sel = order[b0 : b0 + batch_size]
            input_ids, mask = pad_batch([rows[i] for i in sel], pad_id)  # (b, L)
            if pin:
                input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
            yield torch.as_tensor(sel) + w0, input_ids, mask


class _prefetch:
    """Iterate ``it`` in a background thread, ``depth`` items ahead (Arrow reads, padding and pinning overlap
    the encoder); an exception in the thread is raised in the consumer; ``close()`` stops the thread."""

    _END = object()

    def __init__(self, it, depth: int = 4) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self.thread.start()

    def _run(self, it) -> None:
        try:
            for item in it:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.q.put(e)

    def __iter__(self):
        while (item := self.q.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _scatter(out: torch.Tensor, pending: list, device: torch.device) -> None:
    """Write finished batches back to their original rows (one sync for the whole list)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for rows, emb in pending:
        out[rows] = emb
    pending.clear()


# --------------------------------------------------------------------------- resumable chunked embedding
def plan_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Contiguous chunks [start, end) of at most ``chunk_size`` rows covering 0..n."""
    return [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]


def chunk_path(out_dir: str | os.PathLike, start: int, end: int) -> Path:
    return Path(out_dir) / f"emb_{start}_{end}.npy"


def _write_plan(out_dir: Path, plan: dict) -> None:
    """Record (n, chunk_size, fingerprint); refuse to mix chunks from a different plan."""
    f = out_dir / "plan.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old != plan:
            raise ValueError(f"{out_dir} holds chunks for a different plan {old}, requested {plan}")
        return
    tmp = out_dir / f".plan.json.{os.getpid()}"
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, f)


def embed_chunks(
    encoder: nn.Module,
    tokens: Any,
    out_dir: str | os.PathLike,
    chunk_size: int = 100_000,
    num_shards: int = 1,
    shard_id: int = 0,
    fingerprint: str = "",
    **embed_kwargs: Any,
) -> list[tuple[int, int]]:
    """Embed this shard's missing chunks (chunk i belongs to shard ``i % num_shards``) into ``out_dir``.

    Each chunk is written to a temporary name and renamed, so a present ``emb_{start}_{end}.npy`` is complete
    and skipped on resume. Returns the chunks computed by this call.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, {"n": len(tokens), "chunk_size": chunk_size, "fingerprint": fingerprint})
    done = []
    for i, (s, e) in enumerate(plan_chunks(len(tokens), chunk_size)):
        path = chunk_path(out, s, e)
        if i % num_shards != shard_id or path.exists():
            continue
        emb = embed_passages(encoder, RowSlice(tokens, s, e), desc=f"chunk {s}-{e}", **embed_kwargs)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(tmp, emb.numpy())
        os.replace(tmp, path)
        done.append((s, e))
    return done


def chunk_spans(out_dir: str | os.PathLike, n: int) -> list[tuple[int, int]]:
    """Sorted (start, end) of the chunk files in ``out_dir``; raises naming the row ranges not covered."""
    out = Path(out_dir)
    spans = sorted((int(m[1]), int(m[2])) for f in out.iterdir() if (m := _CHUNK_RE.match(f.name)))
    pos, missing = 0, []
    for s, e in spans:
        if s < pos:
            raise ValueError(f"overlapping chunk files in {out}: emb_{s}_{e}.npy")
        if s > pos:
            missing.append((pos, s))
        pos = e
    if pos < n:
        missing.append((pos, n))
    if missing:
        raise FileNotFoundError(f"{out} lacks embeddings for row ranges {missing}; rerun the embed step")
    return spans


def merge_chunks(out_dir: str | os.PathLike, n: int | None = None) -> torch.Tensor:
    """Concatenate all chunk files of ``out_dir`` into (N, d) float32; raises naming missing ranges."""
    out = Path(out_dir)
    if n is None:
        n = json.loads((out / "plan.json").read_text())["n"]
    parts = [np.load(chunk_path(out, s, e)) for s, e in chunk_spans(out, n)]
    return torch.from_numpy(np.concatenate(parts, axis=0)) if parts else torch.empty((0, 0))


class RowSlice:
    """View of rows [start, end) of a token source, with the same ``__getitem__(list)`` interface."""

    def __init__(self, tokens: Any, start: int, end: int) -> None:
        self.tokens, self.start, self.end = tokens, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, ids: Sequence[int]) -> list[list[int]]:
        return _fetch(self.tokens, [self.start + i for i in ids])
