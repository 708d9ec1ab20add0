"""ShardedIndex: shard bounds, world-1 behaviour, and a 2-process gloo run equal to a single DenseIndex."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_lightning.retrieval import DenseIndex, ShardedIndex, shard_range

N, D, K = 301, 12, 7


def _emb() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0))  # random floats: no ties


def _queries(rank: int, b: int) -> torch.Tensor:
    return torch.randn(b, D, generator=torch.Generator().manual_seed(100 + rank))


def test_shard_range_is_contiguous_and_balanced() -> None:
    for n, world in [(10, 3), (2, 4), (0, 2), (301, 2)]:
        spans = [shard_range(n, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [e - s for s, e in spans]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("mode", ["sharded", "replicated"])
def test_world_one_equals_dense_index(mode: str) -> None:
    x, q = _emb(), _queries(0, 5)
    dense = DenseIndex(device="cpu")
    dense.build(x)
    sharded = ShardedIndex.from_embeddings(x, mode=mode, device="cpu")
    for a, b in zip(dense.search_with_vectors(q, K), sharded.search_with_vectors(q, K)):
        assert torch.equal(a, b)
    assert torch.equal(sharded.vectors(torch.tensor([0, 300])), dense.vectors(torch.tensor([0, 300])))


def test_from_memory_mapped_embeddings(tmp_path) -> None:
    x, q = _emb(), _queries(0, 5)
    np.save(tmp_path / "emb.npy", x.numpy())
    mapped = ShardedIndex.from_embeddings(np.load(tmp_path / "emb.npy", mmap_mode="r"), device="cpu")
    ref = ShardedIndex.from_embeddings(x, device="cpu")
    for a, b in zip(mapped.search_with_vectors(q, K), ref.search_with_vectors(q, K)):
        assert torch.equal(a, b)


def _worker(rank: int, world: int, init: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x = _emb()
        sharded = ShardedIndex.from_embeddings(x, device="cpu", num_threads=1)
        start, end = shard_range(N, rank, world)
        assert (sharded.start, sharded.local.ntotal) == (start, end - start)
        dense = DenseIndex(device="cpu", num_threads=1)
        dense.build(x)
        for k in (K, 200):  # 200 > rows per shard (151 / 150): padding inside the merge
            q = _queries(rank, sizes[rank])
            s, i, v = sharded.search_with_vectors(q, k)
            rs, ri = dense.search(q, k)
            assert s.shape == (sizes[rank], k) and v.shape == (sizes[rank], k, D)
            assert torch.equal(i, ri), (rank, k)
            torch.testing.assert_close(s, rs)
            torch.testing.assert_close(v, dense.vectors(ri))
            s2, i2 = sharded.search(q, k)
            assert torch.equal(i2, ri)
        # k larger than the whole corpus pads with (-inf, -1), as DenseIndex does
        s, i = sharded.search(_queries(rank, sizes[rank]), N + 3)
        assert (i[:, N:] == -1).all() and torch.isinf(s[:, N:]).all()
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[5, 3], [0, 4]])  # different and empty per-rank batches
def test_two_process_gloo_equals_single_index(tmp_path, sizes: list[int]) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, sizes), nprocs=2, join=True)
