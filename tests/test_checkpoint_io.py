"""Atomic checkpoint writes and the cleanup of the temporaries a killed write leaves."""

import os
import time
from pathlib import Path

import torch

from rag_lightning.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries


def _touch(path: Path, age_s: float) -> Path:
    path.write_bytes(b"x" * 10)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_save_leaves_only_the_checkpoint(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "ckpts" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [".checksums", "last.ckpt"]
    assert [p.name for p in (tmp_path / "ckpts" / ".checksums").iterdir()] == ["last.ckpt.json"]
    assert torch.equal(torch.load(tmp_path / "ckpts" / "last.ckpt")["w"], torch.ones(3))


def test_remove_stale_temporaries_only_old_temp_files(tmp_path):
    start = time.time()
    old = _touch(tmp_path / ".tmp-k1l2m3.ckpt", 600)
    writing = _touch(tmp_path / ".tmp-n4o5p6.ckpt", -5)  # modified after the run started: a write in progress
    kept = [
        _touch(tmp_path / "last.ckpt", 600),
        _touch(tmp_path / ".tmp-q7.txt", 600),  # not a checkpoint temporary
        _touch(tmp_path / "tmp-r8.ckpt", 600),
    ]
    (tmp_path / "sub").mkdir()
    nested = _touch(tmp_path / "sub" / ".tmp-s9.ckpt", 600)  # only the given folders, not below them
    assert remove_stale_temporaries([tmp_path, str(tmp_path)], start) == [old]
    assert not old.exists() and writing.exists() and nested.exists() and all(p.exists() for p in kept)
    assert remove_stale_temporaries([tmp_path / "missing"], start) == []
