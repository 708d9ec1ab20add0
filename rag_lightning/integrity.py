"""Checksums of the files this package writes and reads back: prepared and saved indexes, checkpoints.

Digest: xxh3-128 (``xxhash``), streamed in 16 MiB chunks. It detects corruption (flipped bits, truncation,
another file copied over), not tampering by someone who can rewrite the digest too. One pass over the file;
xxh3 hashes several GB/s per core, so a file costs about one read of it from disk (see docs/integrity.md).

``verify`` levels (``index.verify``): ``full`` = sizes, digests, row counts, and every vector row finite;
``size`` = sizes and row counts only (no full read); ``none`` = nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash

ALGO = "xxh3_128"
CHUNK = 16 << 20
VERIFY_LEVELS = ("full", "size", "none")


class IntegrityError(RuntimeError):
    """A file does not match its recorded size or digest, or holds non-finite / too few or many rows."""


def new_hasher() -> Any:
    return xxhash.xxh3_128()


def file_digest(path: str | os.PathLike) -> str:
    """xxh3-128 hex digest of a file, read in chunks (memory: one chunk)."""
    h = new_hasher()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "xxh3_128": hex}`` of one file."""
    return {"size": os.path.getsize(path), ALGO: file_digest(path)}


def manifest(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: file_record}`` for files of ``folder``."""
    return {name: file_record(Path(folder) / name) for name in names}


def check_level(verify: str) -> str:
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"index.verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    return verify


def verify_file(path: str | os.PathLike, record: dict[str, Any], verify: str = "full") -> None:
    """IntegrityError naming ``path`` when its size (``size``, ``full``) or digest (``full``) differs."""
    if check_level(verify) == "none":
        return
    path = Path(path)
    size = path.stat().st_size
    if size != record.get("size"):
        raise IntegrityError(f"{path}: {size} bytes, {record.get('size')} recorded when it was written (truncated or replaced)")  # fmt: skip
    if verify == "full" and ALGO in record and (found := file_digest(path)) != record[ALGO]:
        raise IntegrityError(f"{path}: checksum {ALGO} {found} does not match {record[ALGO]} recorded when it was written (corrupt file)")  # fmt: skip


def verify_manifest(folder: str | os.PathLike, files: dict[str, dict[str, Any]] | None, verify: str) -> bool:
    """Verify every recorded file of ``folder``; False when nothing was recorded (written before checksums)."""
    if not files:
        return False
    for name, record in files.items():
        if not (Path(folder) / name).is_file():
            raise IntegrityError(f"{Path(folder) / name}: missing (recorded when the directory was written)")
        verify_file(Path(folder) / name, record, verify)
    return True


def check_finite_rows(
    x: np.ndarray, path: str | os.PathLike, start: int = 0, chunk_rows: int = 65_536
) -> None:
    """IntegrityError naming ``path`` and the first rows when any row of ``x`` (N, d) holds NaN or Inf;
    read in chunks of rows (memory: one chunk). ``start``: the global id of row 0 (for the message)."""
    for s in range(0, len(x), chunk_rows):
        part = np.asarray(x[s : s + chunk_rows])  # (c, d)
        bad = ~np.isfinite(part).all(axis=1)  # (c,)
        if bad.any():
            rows = (np.flatnonzero(bad)[:5] + s + start).tolist()
            raise IntegrityError(f"{path}: non-finite (NaN / Inf) vectors in rows {rows}{' ...' if bad.sum() > 5 else ''}")  # fmt: skip


class HashingWriter:
    """A write-only binary file wrapper that hashes what goes through it (``torch.save`` target)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hasher, self.size = f, new_hasher(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def record(self) -> dict[str, Any]:
        return {"size": self.size, ALGO: self.hasher.hexdigest()}


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically: the body fills the yielded temporary sibling of ``target``, which then
    replaces ``target`` (a stale or partial one under the same name is removed) by one rename; on any error
    the temporary directory is removed and ``target`` is left as it was."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
