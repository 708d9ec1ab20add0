"""Checkpoints written atomically: to a temporary file in the same directory, fsynced, then renamed.

A write cut mid-way (kill -9, a node lost) leaves its `.tmp-*.ckpt` behind, a full checkpoint's size each time:
`remove_stale_temporaries` deletes those when the next run starts.

Integrity: each checkpoint gets a sidecar `.checksums/<name>.ckpt.json` next to it (JSON: size and xxh3-128
digest, hashed while the file is written, so no second read; in a subfolder, so that nothing but checkpoints
matches Lightning's `*last*` search for `ckpt_path=last`). The sidecar is renamed in just before the checkpoint, and also keeps the
record of the file it replaces: a crash between the two renames leaves a pair that still verifies. Loading
(resume, `trainer.test(ckpt_path=...)`, `rag-evaluate`) verifies the file first: flipped bytes, a
truncated or a zero-byte file is a `CheckpointError` naming it (the CLI prints it in one line, exit 2). A
checkpoint without a sidecar (written before) loads with a warning. Weights that hold NaN / Inf are never
written: `NonFiniteCheckpointError`, and the previous file stays.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rag_lightning.integrity import ALGO, HashingWriter, file_digest

log = logging.getLogger(__name__)
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".ckpt"
DIGEST_DIR = ".checksums"


class CheckpointError(RuntimeError):
    """A checkpoint file is empty, truncated or corrupt (does not match its recorded digest)."""


class NonFiniteCheckpointError(FloatingPointError):
    """Refused to write a checkpoint whose weights hold NaN / Inf."""


def digest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / DIGEST_DIR / f"{path.name}.json"


def _read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads(digest_path(path).read_text())
    except (OSError, ValueError):
        return None


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check a checkpoint against its sidecar before anything unpickles it. True when verified, False when it
    has no sidecar (a warning says so); ``CheckpointError`` naming the file when it is empty, or its size or
    digest match neither the recorded file nor the one it replaced. A link (``last.ckpt``) is checked as the
    checkpoint it points to, whose sidecar was written with it."""
    path = Path(os.path.realpath(path))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): not a checkpoint, pick another one")
    rec = _read_record(path)
    if rec is None:
        log.warning("checkpoint %s has no checksum file %s: loaded unverified", path, digest_path(path).name)
        return False
    wanted = [r for r in (rec, rec.get("previous")) if r and r.get("size") == size]
    if not wanted:
        raise CheckpointError(f"checkpoint {path} is {size} bytes, {rec.get('size')} were written: truncated or replaced")  # fmt: skip
    found = file_digest(path)
    if all(found != r.get(ALGO) for r in wanted):
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum {found} does not match the {rec.get(ALGO)} recorded when it was written")  # fmt: skip
    return True


def check_finite_weights(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``NonFiniteCheckpointError`` naming the first tensor of ``checkpoint["state_dict"]`` with NaN / Inf."""
    for name, t in (checkpoint.get("state_dict") or {}).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteCheckpointError(
                f"not writing checkpoint {path}: weight {name!r} holds NaN / Inf (step "
                f"{checkpoint.get('global_step')}); the previous checkpoint stays"
            )


def remove_stale_temporaries(folders: Iterable[str | os.PathLike], older_than: float) -> list[Path]:
    """Delete the `.tmp-*.ckpt` files in `folders` last modified before `older_than` (a `time.time()`).

    Only this module's temporary names, and only files older than the run: a write in progress (this run's, or
    another process's into the same folder) keeps touching its file. Returns the removed paths.
    """
    removed: list[Path] = []
    for folder in {Path(f) for f in folders}:
        for path in folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
            try:
                stat = path.stat()
                if not path.is_file() or stat.st_mtime >= older_than:
                    continue
                path.unlink()
            except FileNotFoundError:  # removed meanwhile
                continue
            removed.append(path)
            log.warning("removed %s (%.1f MB): a checkpoint write cut mid-way", path, stat.st_size / 2**20)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str, storage_options: Any | None = None
    ) -> None:
        path = os.fspath(path)
        check_finite_weights(checkpoint, path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
        os.makedirs(digest_path(path).parent, exist_ok=True)
        side = os.path.join(digest_path(path).parent, f"{os.path.basename(tmp)}.json")
        try:
            with os.fdopen(fd, "wb") as f:
                writer = HashingWriter(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            old = _read_record(path) if os.path.exists(path) else None
            previous = {k: old[k] for k in ("size", ALGO)} if old else None
            with open(side, "w") as f:
                json.dump({**writer.record(), "previous": previous}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(side, digest_path(path))  # verifies the old file (as "previous") and the new one
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except BaseException:
            for t in (tmp, side):
                if os.path.exists(t):
                    os.remove(t)
            raise

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if os.path.isfile(path):  # (a missing file: Lightning's own message)
            verify_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        super().remove_checkpoint(path)
        digest_path(path).unlink(missing_ok=True)
