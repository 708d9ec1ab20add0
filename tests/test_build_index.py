"""scripts/build_index.py core: chunked embedding resumes after an interruption, shards, merge == one shot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from rag_lightning.retrieval import DenseIndex, embed_passages, merge_chunks

_spec = importlib.util.spec_from_file_location(
    "build_index", Path(__file__).parents[1] / "scripts" / "build_index.py"
)
build_index = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_index)


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


KW = dict(chunk_size=10, batch_size=4, progress=False, index_kwargs={"device": "cpu"})


def test_interrupted_run_resumes_without_recomputing(tmp_path) -> None:
    rows = _rows()
    with pytest.raises(KeyboardInterrupt):  # dies inside the 3rd chunk (10 rows = 3 batches per chunk)
        build_index.run(rows, CountingEncoder(fail_after=7), tmp_path, **KW)
    assert sorted(p.name for p in tmp_path.glob("emb_*.npy")) == ["emb_0_10.npy", "emb_10_20.npy"]
    assert not list(tmp_path.glob(".emb_*"))  # no partial chunk file left behind
    enc = CountingEncoder()
    index = build_index.run(rows, enc, tmp_path, fingerprint="", **KW)
    assert enc.rows == 47 - 20  # only the missing chunks were embedded
    one_shot = DenseIndex(device="cpu")
    one_shot.build(embed_passages(CountingEncoder(), rows, progress=False))
    q = torch.randn(5, 8)
    assert torch.equal(index.search(q, 6)[1], one_shot.search(q, 6)[1])
    loaded = DenseIndex.load(tmp_path / "index")
    torch.testing.assert_close(loaded.vectors(torch.arange(47)), one_shot.vectors(torch.arange(47)))
    enc2 = CountingEncoder()
    build_index.run(rows, enc2, tmp_path, **KW)  # everything present: nothing recomputed
    assert enc2.rows == 0


def test_shards_then_merge_equals_one_shot(tmp_path) -> None:
    rows = _rows()
    for shard in range(3):
        assert build_index.run(rows, CountingEncoder(), tmp_path, num_shards=3, shard_id=shard, **KW) is None
    merged = build_index.run(None, None, tmp_path, merge_only=True, **KW)
    ref = embed_passages(CountingEncoder(), rows, progress=False)
    torch.testing.assert_close(merged.vectors(torch.arange(47)), ref)
    assert merged.meta["ntotal"] == 47


def test_merge_reports_missing_chunks_and_plan_mismatch(tmp_path) -> None:
    rows = _rows()
    build_index.run(rows, CountingEncoder(), tmp_path, num_shards=2, shard_id=0, **KW)
    with pytest.raises(FileNotFoundError, match=r"\(10, 20\)"):
        merge_chunks(tmp_path)
    with pytest.raises(ValueError, match="different plan"):
        build_index.run(rows, CountingEncoder(), tmp_path, chunk_size=7, batch_size=4, progress=False)
