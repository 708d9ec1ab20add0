"""BM25 (retrieval/bm25.py) against bm25s itself, after save / memory-mapped load, under 2-process sharding;
hybrid fusion (retrieval/fusion.py) against its definition."""

from __future__ import annotations

from pathlib import Path

import bm25s
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_lightning.models.encoders import Encoder
from rag_lightning.models.retriever import BM25NotBuiltError, Retriever, build_bm25
from rag_lightning.models.tiny import tiny_encoder
from rag_lightning.retrieval import fusion
from rag_lightning.retrieval.bm25 import BM25Index, merge_topk, topk_rows
from rag_lightning.retrieval.sharded import shard_range

WORDS = [
    "paris",
    "france",
    "capital",
    "river",
    "seine",
    "tower",
    "eiffel",
    "london",
    "thames",
    "bridge",
    "rome",
    "tiber",
    "city",
    "art",
    "museum",
]
QUERIES = ["capital of france", "which river flows through london", "eiffel tower paris", "art museum rome",
           "zebra", "the bridge over the thames river"]  # fmt: skip
K = 7


def _corpus(n: int = 61) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


def _reference(texts: list[str], queries: list[str]) -> np.ndarray:
    """bm25s alone, same settings: (Q, N) scores of every passage."""
    tok = bm25s.tokenization.Tokenizer(stopwords="en")
    model = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    model.index(tok.tokenize(texts, return_as="ids", show_progress=False), show_progress=False)
    q = tok.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    return np.stack([model.get_scores_from_ids(ids) for ids in q])


def _brute_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort every passage by (score desc, id asc): the definition of our top-k."""
    order = [sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in scores]
    return np.take_along_axis(scores, np.array(order), 1), np.array(order)


def test_scores_equal_bm25s_and_topk_is_by_score_then_id():
    texts = _corpus()
    index = BM25Index.build(texts, k1=0.9, b=0.4, method="lucene", stopwords="en")
    ref = _reference(texts, QUERIES)  # (Q, N)
    assert (ref > 0).sum() > 3 * K  # the queries match several passages
    s, i = index.search(QUERIES, K)
    want_s, want_i = _brute_topk(ref, K)
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-6)
    assert (i[4] == torch.arange(K)).all() and (s[4] == 0).all()  # "zebra": no term, ids in order


def test_topk_rows_and_merge_match_a_full_sort():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=40).astype(np.float32)  # many ties
    full_s, full_i = _brute_topk(scores[None], 9)
    s, i = topk_rows(scores, 9)
    np.testing.assert_array_equal(i, full_i[0])
    # two shards' top-k merged = the top-k of the whole
    a, b = topk_rows(scores[:17], 9), topk_rows(scores[17:], 9, offset=17)
    ms, mi = merge_topk(np.concatenate([a[0], b[0]])[None], np.concatenate([a[1], b[1]])[None], 9)
    np.testing.assert_array_equal(mi[0], full_i[0])
    s, i = topk_rows(scores[:3], 5)  # fewer rows than k: (-inf, -1) padding
    assert (i[3:] == -1).all() and np.isinf(s[3:]).all()


def test_save_and_memory_mapped_load_give_the_same_results(tmp_path):
    texts = _corpus()
    index = BM25Index.build(texts, meta={"corpus": "c1"})
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert isinstance(loaded.model.scores["data"], np.memmap)
    assert loaded.meta["corpus"] == "c1" and loaded.meta["passages"] == len(texts)
    for a, b in zip(index.search(QUERIES, K), loaded.search(QUERIES, K)):
        assert torch.equal(a, b)
    # a shard (row slice of the score matrix) scores its rows exactly as the whole index does
    part = BM25Index.load(tmp_path / "bm25")
    part.keep_rows(20, 45)
    s, i = part.search(QUERIES, K)
    ref = _reference(texts, QUERIES)[:, 20:45]
    want_s, want_i = _brute_topk(ref, K)
    np.testing.assert_array_equal(i.numpy(), want_i + 20)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-6)


def _worker(rank: int, world: int, init: str, path: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        texts = _corpus()
        whole = BM25Index.build(texts)
        sharded = BM25Index.load(path, mode="sharded")
        start, end = shard_range(len(texts), rank, world)
        assert (sharded.start, sharded.ntotal) == (start, end - start)
        mine = QUERIES[rank : rank + sizes[rank]]
        for k in (K, 40):  # 40 > rows per shard (31 / 30): padding inside the merge
            s, i = sharded.search(mine, k)
            rs, ri = whole.search(mine, k)
            assert s.shape == (len(mine), k)
            assert torch.equal(i, ri), (rank, k)
            torch.testing.assert_close(s, rs)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[4, 2], [0, 3]])  # different and empty per-rank batches
def test_two_process_gloo_equals_one_process(tmp_path, sizes):
    BM25Index.build(_corpus()).save(tmp_path / "bm25")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path / "bm25"), sizes), nprocs=2, join=True)


class _Corpus:
    """What BM25 reads of a corpus: rows, their texts, a fingerprint."""

    fingerprint = "synthetic-61"

    def __init__(self, texts: list[str]) -> None:
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    def titles(self, rows: list[int]) -> list[str]:
        return [""] * len(rows)

    def texts(self, rows: list[int]) -> list[str]:
        return [self._texts[i] for i in rows]


def _bm25_retriever(root: str) -> Retriever:
    return Retriever(Encoder(*tiny_encoder()), mode="bm25", index={"root": root})


def _ensure_worker(rank: int, world: int, init: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        corpus, r = _Corpus(_corpus()), _bm25_retriever(root)
        # missing: refused on every rank at once, nothing written (no rank builds while the others wait)
        with pytest.raises(BM25NotBuiltError, match="scripts/build_index.py"):
            r.ensure_index(corpus)
        assert r.bm25 is None and not any(Path(root).glob("bm25-*"))
        dist.barrier()
        if rank == 0:  # what scripts/build_index.py does, in one process
            build_bm25(corpus, r.bm25_kwargs, r.bm25_stamp(corpus)).save(r.bm25_path(corpus))
        dist.barrier()
        r.ensure_index(corpus)  # built: every rank loads its rows
        assert (r.bm25.mode, r.bm25.start) == ("sharded", shard_range(len(corpus), rank, world)[0])
        s, i = r.bm25.search(QUERIES[rank::world], K)
        rs, ri = BM25Index.build(_corpus()).search(QUERIES[rank::world], K)
        assert torch.equal(i, ri)
        torch.testing.assert_close(s, rs)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_run_refuses_a_missing_index_and_loads_a_built_one(tmp_path):
    """Under DDP the BM25 index is never built lazily (at 21M passages the build outlasts any collective
    timeout): missing, every rank raises the one-line error; built by one process, every rank loads its rows."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ensure_worker, args=(2, init, str(tmp_path / "indexes")), nprocs=2, join=True)


def test_one_process_builds_the_missing_index_lazily(tmp_path):
    r = _bm25_retriever(str(tmp_path / "indexes"))
    r.ensure_index(_Corpus(_corpus()))
    assert r.bm25_path(_Corpus(_corpus())).is_dir() and r.bm25.ntotal == len(_corpus())


# ------------------------------------------------------------------------------------------ fusion
def test_rrf_against_its_definition():
    dense = torch.tensor([[3, 1, 4, 5], [9, 8, -1, -1]])
    sparse = torch.tensor([[1, 5, 9, 2], [8, 7, 9, 6]])
    s, i = fusion.rrf([dense, sparse], 3, rrf_k=60)
    for r in range(2):
        want: dict[int, float] = {}
        for lst in (dense[r].tolist(), sparse[r].tolist()):
            for rank, p in enumerate(lst, start=1):
                if p >= 0:
                    want[p] = want.get(p, 0.0) + 1 / (60 + rank)
        best = sorted(want, key=lambda p: (-want[p], p))[:3]
        assert i[r].tolist() == best
        torch.testing.assert_close(s[r], torch.tensor([want[p] for p in best]))
    assert i[0].tolist()[:2] == [1, 5]  # in both lists near the top


def test_weighted_fusion_against_its_definition():
    ids_d, s_d = torch.tensor([[3, 1, 4]]), torch.tensor([[10.0, 8.0, 2.0]])
    ids_b, s_b = torch.tensor([[1, 7, 3]]), torch.tensor([[5.0, 4.0, 1.0]])
    s, i = fusion.weighted([s_d, s_b], [ids_d, ids_b], [0.7, 0.3], 4)
    nd = {3: 1.0, 1: 6 / 8, 4: 0.0}  # (s - min) / (max - min)
    nb = {1: 1.0, 7: 0.75, 3: 0.0}
    want = {p: 0.7 * nd.get(p, 0.0) + 0.3 * nb.get(p, 0.0) for p in {3, 1, 4, 7}}
    best = sorted(want, key=lambda p: (-want[p], p))
    assert i[0].tolist() == best
    torch.testing.assert_close(s[0], torch.tensor([want[p] for p in best]))
    # one distinct score in a list normalizes to 0, padding never enters
    s, i = fusion.weighted([torch.tensor([[2.0, 2.0]])], [torch.tensor([[5, -1]])], [1.0], 2)
    assert i[0].tolist() == [5, -1] and s[0, 0] == 0
