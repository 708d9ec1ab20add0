"""Prepared indexes: a corpus's embeddings saved once under a stamp, at a path derived from the stamp.

stamp = {corpus fingerprint (text, tokenizers, passage prefix and length), document-encoder weights fingerprint,
its pooling and normalization, similarity, factory, vector dtype, embedding precision}
path  = ``<root>/<sha256(stamp)[:16]>`` (``root`` is ``index.root``, by default ``${paths.cache_dir}/indexes``),
holding ``vectors.npy`` (N, d) in the store dtype and ``stamp.json`` (the stamp, the row count ``passages`` and
the size and xxh3-128 checksum of ``vectors.npy``, ``files``). ``scripts/build_index.py`` writes it, and so
does a run that builds its index with a frozen document encoder (``Retriever.keep_vectors``, ``index.keep``);
training, resuming and evaluation compute the stamp of their own corpus and document encoder and load the
directory it names, memory-mapped (each rank reads only its own rows), so nothing is re-embedded by accident.
``verify_prepared`` checks it first (``index.verify``: checksum, row count against the corpus, finite rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rag_lightning import integrity
from rag_lightning.integrity import IntegrityError
from rag_lightning.retrieval.embed import chunk_spans

log = logging.getLogger(__name__)
STAMP_FILE, VECTORS_FILE = "stamp.json", "vectors.npy"
RECORD_KEYS = ("passages", "files")  # in stamp.json, not part of the stamp


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 (16 hex) over the names, dtypes, shapes and bytes of ``module.state_dict()`` (FSDP2-sharded:
    a collective, every rank calls it)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if hasattr(t, "full_tensor"):  # an FSDP2 shard (DTensor): the whole tensor, gathered on every rank
            t = t.full_tensor()
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def stamp_key(stamp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def stamp_text(stamp: dict[str, Any] | None) -> str:
    """One line for logs: ``corpus=... doc_encoder=... factory=Flat dtype=float32 embed=fp32``."""
    return " ".join(f"{k}={v}" for k, v in (stamp or {}).items() if k not in RECORD_KEYS)


def prepared_path(root: str | os.PathLike, stamp: dict[str, Any]) -> Path:
    return Path(root) / stamp_key(stamp)


def read_stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """The stamp of a complete prepared directory with its row count ``passages``, or None (absent, incomplete or
    unreadable)."""
    f = Path(path) / STAMP_FILE
    try:
        rec = json.loads(f.read_text()) if (Path(path) / VECTORS_FILE).is_file() else None
    except (OSError, ValueError):
        return None
    return None if rec is None else {k: v for k, v in rec.items() if k != "files"}


def is_prepared(path: str | os.PathLike) -> bool:
    return read_stamp(path) is not None


def open_vectors(path: str | os.PathLike) -> np.ndarray:
    """(N, d) vectors of a prepared directory, memory-mapped read-only."""
    return np.load(Path(path) / VECTORS_FILE, mmap_mode="r")


def write_prepared(
    target: str | os.PathLike, chunks_dir: str | os.PathLike, n: int, stamp: dict[str, Any], dtype: str
) -> Path:
    """Stream the chunk files ``emb_{s}_{e}.npy`` of ``chunks_dir`` (covering rows 0..n) into
    ``target/vectors.npy`` in ``dtype`` (memory: one chunk), write ``stamp.json``; atomic (tmp dir, rename)."""
    target = Path(target)
    spans = chunk_spans(chunks_dir, n)  # raises naming missing row ranges
    first = np.load(Path(chunks_dir) / f"emb_{spans[0][0]}_{spans[0][1]}.npy", mmap_mode="r")
    with integrity.atomic_dir(target) as tmp:
        out = np.lib.format.open_memmap(tmp / VECTORS_FILE, mode="w+", dtype=dtype, shape=(n, first.shape[1]))
        for s, e in spans:
            chunk = np.load(Path(chunks_dir) / f"emb_{s}_{e}.npy")  # (e - s, d)
            integrity.check_finite_rows(chunk, Path(chunks_dir) / f"emb_{s}_{e}.npy", start=s)
            out[s:e] = chunk
        out.flush()
        del out
        files = integrity.manifest(tmp, [VECTORS_FILE])
        (tmp / STAMP_FILE).write_text(json.dumps({**stamp, "passages": n, "files": files}, indent=1))
    return target


def verify_prepared(path: str | os.PathLike, verify: str = "full", passages: int | None = None) -> int:
    """Check a prepared directory before use; returns its row count. ``IntegrityError`` naming the file when
    (``size``, ``full``) its size or row count differs from ``stamp.json`` or from ``passages`` (the corpus's),
    or (``full``) its checksum differs or a row holds NaN / Inf. See docs/integrity.md."""
    path = Path(path)
    rec = json.loads((path / STAMP_FILE).read_text())
    if integrity.check_level(verify) == "none":
        return int(rec.get("passages", -1))
    if not integrity.verify_manifest(path, rec.get("files"), verify):
        log.warning("%s records no checksums (prepared before they were): sizes and rows checked only", path)
    vectors, f = open_vectors(path), path / VECTORS_FILE
    if vectors.ndim != 2 or len(vectors) != rec.get("passages"):
        raise IntegrityError(f"{f}: {vectors.shape[0]} rows, {STAMP_FILE} says {rec.get('passages')}")
    if passages is not None and len(vectors) != passages:
        raise IntegrityError(f"{f}: {len(vectors)} rows for a corpus of {passages} passages")
    if verify == "full":
        integrity.check_finite_rows(vectors, f)
    return len(vectors)


class IndexStampError(RuntimeError):
    """An index directory was made from another corpus, document encoder, factory or dtype."""
