"""rag-build-index (rag_lightning/commands/build_index.py) core: chunked embedding resumes after an interruption, shards merge once, stamps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rag_lightning.commands import build_index
from rag_lightning.retrieval import ShardedIndex, embed_passages, merge_chunks, store


class CountingEncoder(nn.Module):
    """Masked mean of token embeddings; counts rows; optionally fails after ``fail_after`` batches."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(60, 8)
        self.rows, self.batches, self.fail_after = 0, 0, fail_after

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.rows, self.batches = self.rows + len(input_ids), self.batches + 1
        m = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)  # (B, d)


def _rows(n: int = 47) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(1, 60, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


KW = dict(chunk_size=10, batch_size=4, progress=False)
STAMP = {"corpus": "c", "doc_encoder": "w", "factory": "Flat", "dtype": "float32", "embed": "float32"}


def test_interrupted_run_resumes_without_recomputing(tmp_path) -> None:
    rows, target = _rows(), tmp_path / "idx"
    work = tmp_path / ".work-idx"
    with pytest.raises(KeyboardInterrupt):  # dies inside the 3rd chunk (10 rows = 3 batches per chunk)
        build_index.embed_and_merge(CountingEncoder(fail_after=7), rows, target, STAMP, **KW)
    assert sorted(p.name for p in work.glob("emb_*.npy")) == ["emb_0_10.npy", "emb_10_20.npy"]
    assert not list(work.glob(".emb_*")) and not target.exists()  # no partial chunk or index left behind
    enc = CountingEncoder()
    assert build_index.embed_and_merge(enc, rows, target, STAMP, **KW) == target
    assert enc.rows == 47 - 20  # only the missing chunks were embedded
    assert not work.exists() and store.read_stamp(target) == {**STAMP, "passages": 47}
    ref = embed_passages(CountingEncoder(), rows, progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(store.open_vectors(target))), ref)
    enc2 = CountingEncoder()
    build_index.embed_and_merge(enc2, rows, target, STAMP, **KW)  # prepared: nothing recomputed
    assert enc2.rows == 0


def test_shards_then_the_last_one_merges(tmp_path) -> None:
    rows, target = _rows(), tmp_path / "idx"
    outs = [
        build_index.embed_and_merge(CountingEncoder(), rows, target, STAMP, num_shards=3, shard_id=i, **KW)
        for i in (2, 0, 1)
    ]
    assert outs == [None, None, target]  # whoever completes the set merges, once
    ref = embed_passages(CountingEncoder(), rows, progress=False)
    index = ShardedIndex.from_embeddings(store.open_vectors(target), device="cpu")
    torch.testing.assert_close(index.vectors(torch.arange(47)), ref)


def test_merge_reports_missing_chunks_and_plan_mismatch(tmp_path) -> None:
    rows, target = _rows(), tmp_path / "idx"
    build_index.embed_and_merge(CountingEncoder(), rows, target, STAMP, num_shards=2, shard_id=0, **KW)
    with pytest.raises(FileNotFoundError, match=r"\(10, 20\)"):
        merge_chunks(tmp_path / ".work-idx")
    with pytest.raises(ValueError, match="different plan"):
        build_index.embed_and_merge(CountingEncoder(), rows, target, STAMP, chunk_size=7, batch_size=4)


def test_shard_of_config_and_torchrun_env(monkeypatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert build_index.shard_of(OmegaConf.create({"shard": None, "num_shards": None})) == (3, 8)
    assert build_index.shard_of(OmegaConf.create({"shard": 1, "num_shards": 2})) == (1, 2)
    with pytest.raises(ValueError, match="shard=2"):
        build_index.shard_of(OmegaConf.create({"shard": 2, "num_shards": 2}))
