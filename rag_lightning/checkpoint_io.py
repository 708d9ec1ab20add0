"""Checkpoints written atomically: to a temporary file in the same directory, fsynced, then renamed.

A write cut mid-way (kill -9, a node lost) leaves its `.tmp-*.ckpt` behind, a full checkpoint's size each time:
`remove_stale_temporaries` deletes those when the next run starts.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".ckpt"


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
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
