"""Integrity: prepared and saved indexes and checkpoints carry checksums and row counts, verified before use."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteCheckpointError,
    digest_path,
    verify_checkpoint,
)
from rag_lightning.integrity import IntegrityError, file_digest
from rag_lightning.models.encoders import Encoder
from rag_lightning.models.retriever import Retriever
from rag_lightning.retrieval import store
from rag_lightning.retrieval.index import DenseIndex, IndexFileError

N, D = 40, 8
STAMP = {"corpus": "c0", "doc_encoder": "e0", "factory": "Flat", "dtype": "float32", "embed": "float32"}


def _vectors(n: int = N) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)


def _prepared(tmp_path: Path, x: np.ndarray, name: str = "idx") -> Path:
    chunks = tmp_path / f"chunks-{name}"
    chunks.mkdir()
    np.save(chunks / f"emb_0_{len(x)}.npy", x)
    return store.write_prepared(tmp_path / name, chunks, len(x), STAMP, "float32")


def _flip(path: Path, offset: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10  # one bit, near the end: inside the data, not the header
    path.write_bytes(bytes(data))


def test_prepared_records_checksum_and_rows(tmp_path) -> None:
    target = _prepared(tmp_path, _vectors())
    rec = json.loads((target / store.STAMP_FILE).read_text())
    assert rec["passages"] == N and rec["files"]["vectors.npy"]["xxh3_128"] == file_digest(
        target / "vectors.npy"
    )
    assert store.verify_prepared(target, "full", passages=N) == N
    assert store.read_stamp(target) == {**STAMP, "passages": N}  # the stamp, without the file records


def test_prepared_flipped_bit_is_an_error_naming_the_file(tmp_path) -> None:
    target = _prepared(tmp_path, _vectors())
    _flip(target / "vectors.npy")
    with pytest.raises(IntegrityError, match=r"vectors\.npy: checksum .* does not match"):
        store.verify_prepared(target, "full", passages=N)
    assert store.verify_prepared(target, "size", passages=N) == N  # size: no full read, by choice
    assert store.verify_prepared(target, "none") == N


def test_prepared_short_row_count_is_an_error(tmp_path) -> None:
    target = _prepared(tmp_path, _vectors(30))
    with pytest.raises(IntegrityError, match=r"vectors\.npy: 30 rows for a corpus of 40 passages"):
        store.verify_prepared(target, "size", passages=N)
    # a vectors file replaced by a shorter one (its record not): size mismatch
    np.save(target / "vectors.npy", _vectors(20))
    with pytest.raises(IntegrityError, match="bytes, .* recorded"):
        store.verify_prepared(target, "size")


def test_prepared_nan_rows_are_refused_at_write_and_at_load(tmp_path) -> None:
    x = _vectors()
    x[[3, 17]] = np.nan
    with pytest.raises(IntegrityError, match=r"non-finite .* rows \[3, 17\]"):
        _prepared(tmp_path, x)
    assert not (tmp_path / "idx").exists()
    target = _prepared(tmp_path, _vectors(), name="ok")  # NaN written in place, record rewritten to match
    vectors = np.load(target / "vectors.npy", mmap_mode="r+")
    vectors[5, 2] = np.inf
    vectors.flush()
    del vectors
    rec = json.loads((target / store.STAMP_FILE).read_text())
    rec["files"]["vectors.npy"]["xxh3_128"] = file_digest(target / "vectors.npy")
    (target / store.STAMP_FILE).write_text(json.dumps(rec))
    with pytest.raises(IntegrityError, match=r"non-finite .* rows \[5\]"):
        store.verify_prepared(target, "full")


def test_build_index_prepares_a_damaged_directory_again(tmp_path, caplog) -> None:
    from rag_lightning.commands import build_index

    enc = Encoder.from_pretrained("tiny:bert", pooling="mean").eval()
    rows = [[101, 7 + i, 102] for i in range(12)]
    kw = dict(chunk_size=5, batch_size=4, progress=False)
    target = build_index.embed_and_merge(enc, rows, tmp_path / "idx", STAMP, **kw)
    good = (target / "vectors.npy").read_bytes()
    _flip(target / "vectors.npy")
    with caplog.at_level(logging.WARNING, logger="build_index"):
        assert build_index.embed_and_merge(enc, rows, tmp_path / "idx", STAMP, **kw) == target
    assert "vectors.npy: checksum" in caplog.text and "preparing" in caplog.text
    assert (target / "vectors.npy").read_bytes() == good


def _retriever(verify: str = "full") -> Retriever:
    enc = Encoder.from_pretrained("tiny:bert", pooling="mean")
    return Retriever(enc, n_docs=3, index={"device": "cpu", "verify": verify})


def test_retriever_refuses_a_damaged_prepared_index_in_one_line(tmp_path, caplog) -> None:
    target = _prepared(tmp_path, _vectors())
    r = _retriever()
    assert r.load_index(target, passages=N)
    _flip(target / "vectors.npy")
    with caplog.at_level(logging.WARNING, logger="rag_lightning.models.retriever"):
        assert not r.load_index(target, passages=N)
    assert "vectors.npy: checksum" in caplog.text
    good = _prepared(tmp_path, _vectors(), name="good")
    assert not r.load_index(good, passages=N + 1)  # built for another corpus length
    with pytest.raises(ValueError, match="index.verify"):
        _retriever("sometimes")


def test_saved_index_checksums(tmp_path) -> None:
    x = torch.from_numpy(_vectors())
    for backend in ("faiss", "torch"):
        idx = DenseIndex(backend=backend, device="cpu")
        idx.build(x)
        path = tmp_path / backend
        idx.save(path)
        meta = json.loads((path / "meta.json").read_text())
        name = "index.faiss" if backend == "faiss" else "vectors.npy"
        assert meta["files"][name]["xxh3_128"] == file_digest(path / name)
        assert DenseIndex.load(path).ntotal == N
        _flip(path / name)
        with pytest.raises(IndexFileError, match=rf"{name}: checksum"):
            DenseIndex.load(path)
        assert DenseIndex.load(path, verify="size").ntotal == N  # by choice: no full read


def test_saved_index_with_nan_rows_is_never_written(tmp_path) -> None:
    x = _vectors()
    x[7] = np.nan
    idx = DenseIndex(backend="torch", device="cpu")
    idx.build(torch.from_numpy(x))
    with pytest.raises(IntegrityError, match=r"rows \[7\]"):
        idx.save(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_saved_index_row_count_against_the_corpus(tmp_path, caplog) -> None:
    r = _retriever()
    idx = DenseIndex(device="cpu")
    idx.build(torch.from_numpy(_vectors()))
    from rag_lightning.retrieval.sharded import ShardedIndex

    r._install(ShardedIndex(idx, 0, "replicated"), 1, {"path": None, "stamp": None, "passages": N})
    r.save_index(tmp_path / "saved")
    assert r.load_index(tmp_path / "saved", passages=N)
    with caplog.at_level(logging.WARNING, logger="rag_lightning.models.retriever"):
        assert not r.load_index(tmp_path / "saved", passages=N + 5)
    assert f"holds {N} passages, the corpus has {N + 5}" in caplog.text


# ---------------------------------------------------------------------------------------------- checkpoints


def _save(path: Path, value: float = 1.0) -> None:
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": {"w": torch.full((64,), value)}, "global_step": 3}, path
    )


def test_checkpoint_flipped_bytes_are_an_error_naming_the_file(tmp_path) -> None:
    ckpt = tmp_path / "last.ckpt"
    _save(ckpt)
    assert verify_checkpoint(ckpt)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(ckpt)["state_dict"]["w"], torch.ones(64))
    _flip(ckpt, offset=len(ckpt.read_bytes()) // 2)
    with pytest.raises(CheckpointError, match=r"last\.ckpt is corrupt: checksum"):
        AtomicCheckpointIO().load_checkpoint(ckpt)


def test_zero_byte_and_truncated_checkpoints(tmp_path) -> None:
    ckpt = tmp_path / "last.ckpt"
    _save(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(ckpt)
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.ckpt is empty \(0 bytes\)"):
        AtomicCheckpointIO().load_checkpoint(ckpt)


def test_checkpoint_without_sidecar_loads_with_a_warning(tmp_path, caplog) -> None:
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
    with caplog.at_level(logging.WARNING, logger="rag_lightning.checkpoint_io"):
        assert not verify_checkpoint(ckpt)
    assert "unverified" in caplog.text


def test_crash_between_the_two_renames_still_verifies(tmp_path) -> None:
    ckpt = tmp_path / "last.ckpt"
    _save(ckpt, 1.0)
    old_bytes = ckpt.read_bytes()
    _save(ckpt, 2.0)
    ckpt.write_bytes(old_bytes)  # the new sidecar is in place, the checkpoint rename never happened
    assert verify_checkpoint(ckpt)


def test_nonfinite_weights_are_never_written(tmp_path) -> None:
    ckpt = tmp_path / "last.ckpt"
    _save(ckpt, 1.0)
    with pytest.raises(NonFiniteCheckpointError, match=r"weight 'w' holds NaN"):
        _save(ckpt, float("nan"))
    assert verify_checkpoint(ckpt) and torch.equal(torch.load(ckpt)["state_dict"]["w"], torch.ones(64))
    assert sorted(p.name for p in digest_path(ckpt).parent.iterdir()) == ["last.ckpt.json"]  # no temporaries


def test_removed_checkpoint_takes_its_sidecar(tmp_path) -> None:
    ckpt = tmp_path / "step_1.ckpt"
    _save(ckpt)
    AtomicCheckpointIO().remove_checkpoint(ckpt)
    assert not ckpt.exists() and not digest_path(ckpt).exists()


@pytest.mark.slow
def test_cli_zero_byte_checkpoint_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import run_cfg

    from rag_lightning.cli import train

    (tmp_path / "zero.ckpt").write_bytes(b"")
    cfg = run_cfg(tmp_path, [f"ckpt_path={tmp_path / 'zero.ckpt'}", "trainer.max_steps=2", "test=false"])
    with pytest.raises(SystemExit) as exit_:
        train(cfg)
    assert exit_.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert errors == [
        f"error: checkpoint {tmp_path / 'zero.ckpt'} is empty (0 bytes): not a checkpoint, pick another one"
    ]
