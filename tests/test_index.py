"""DenseIndex: exactness vs brute force, torch == faiss, approximate recall, save/load, atomic save."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rag_lightning.retrieval.index as index_mod
from rag_lightning.retrieval import DenseIndex, IndexFileError


def _data(n: int = 500, d: int = 16, b: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(b, d, generator=g)


def _clustered(n: int = 4000, d: int = 32, b: int = 50, c: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(c, d, generator=g) * 3
    x = centers[torch.randint(c, (n,), generator=g)] + torch.randn(n, d, generator=g)
    q = centers[torch.randint(c, (b,), generator=g)] + torch.randn(b, d, generator=g)
    return x, q


def _brute(x: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (q.double() @ x.double().T).topk(k, dim=1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_flat_matches_brute_force(backend: str) -> None:
    x, q = _data()
    idx = DenseIndex(backend=backend, device="cpu", chunk_rows=64)  # several chunks for torch
    idx.build(x)
    scores, ids = idx.search(q, 10)
    ref_s, ref_i = _brute(x, q, 10)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and scores.shape == (7, 10)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert idx.ntotal == 500 and idx.dim == 16 and idx.version == 0  # the retriever owns versions


def test_torch_equals_faiss_and_accepts_any_query_tensor() -> None:
    x, q = _data(n=300, d=8)
    a, b = DenseIndex(backend="faiss", device="cpu"), DenseIndex(backend="torch", device="cpu")
    a.build(x)
    b.build(x)
    qa = q.double().requires_grad_()  # float64 with grad: detached and cast inside
    sa, ia = a.search(qa, 5)
    sb, ib = b.search(q, 5)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(sa, sb)


@pytest.mark.parametrize(
    "factory,n,d,min_recall",
    [("HNSW32,Flat", 4000, 32, 0.9), ("IVF16,PQ16x4np", 2000, 16, 0.5)],  # np: no slow polysemous training
)
def test_approximate_recall(factory: str, n: int, d: int, min_recall: float) -> None:
    x, q = _clustered(n=n, d=d)
    exact = DenseIndex(device="cpu")
    exact.build(x)
    # one faiss thread: OpenMP k-means slows down 100x when the CI machine's cores are busy
    approx = DenseIndex(factory=factory, device="cpu", nprobe=16, ef_search=128, num_threads=1)
    approx.build(x)
    _, ref = exact.search(q, 10)
    _, got = approx.search(q, 10)
    recall = np.mean([len(set(r.tolist()) & set(g.tolist())) / 10 for r, g in zip(ref, got)])
    assert recall > min_recall, recall


def test_k_larger_than_ntotal_pads() -> None:
    x, q = _data(n=5, d=4, b=2)
    for backend in ("faiss", "torch"):
        idx = DenseIndex(backend=backend, device="cpu")
        idx.build(x)
        scores, ids = idx.search(q, 8)
        assert scores.shape == ids.shape == (2, 8)
        assert (ids[:, 5:] == -1).all() and torch.isinf(scores[:, 5:]).all()
        assert sorted(ids[0, :5].tolist()) == list(range(5))


def test_vectors() -> None:
    x, q = _data(n=50, d=6)
    idx = DenseIndex(store_dtype="float16", device="cpu")
    idx.build(x)
    ids = torch.tensor([[3, 0], [49, -1]])
    v = idx.vectors(ids)
    assert v.shape == (2, 2, 6) and v.dtype == torch.float32
    torch.testing.assert_close(v[0, 0], x[3].half().float())  # faiss SQfp16 stores half precision
    assert (v[1, 1] == 0).all()
    s, i, vv = idx.search_with_vectors(q, 4)
    torch.testing.assert_close(vv, idx.vectors(i))


@pytest.mark.parametrize("factory,backend", [("Flat", "faiss"), ("IVF16,Flat", "faiss"), ("Flat", "torch")])
def test_save_load_roundtrip(tmp_path, factory: str, backend: str) -> None:
    x, q = _data()
    idx = DenseIndex(factory=factory, backend=backend, device="cpu", meta={"fingerprint": "abc", "step": 7})
    idx.build(x)
    idx.version = 5
    idx.save(tmp_path / "idx")
    back = DenseIndex.load(tmp_path / "idx", device="cpu")
    assert back.meta == {"fingerprint": "abc", "step": 7} and back.version == 5
    assert (back.factory, back.backend, back.ntotal, back.dim) == (factory, backend, 500, 16)
    for a, b in zip(idx.search(q, 10), back.search(q, 10)):
        assert torch.equal(a, b)
    rec = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert rec["ntotal"] == 500 and rec["dim"] == 16 and rec["factory"] == factory
    other = (
        DenseIndex.load(tmp_path / "idx", backend="torch" if backend == "faiss" else "faiss", device="cpu")
        if factory == "Flat"
        else back
    )
    assert torch.equal(other.search(q, 10)[1], idx.search(q, 10)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp / .old leftovers


def test_atomic_save_keeps_previous_on_crash(tmp_path, monkeypatch) -> None:
    x, q = _data()
    old = DenseIndex(device="cpu", meta={"step": 1})
    old.build(x)
    old.save(tmp_path / "idx")
    new = DenseIndex(device="cpu", meta={"step": 2})
    new.build(x[:100])

    def crash(*args, **kwargs):  # after index.faiss and vectors.npy are written
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.json, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "idx")
    monkeypatch.undo()
    back = DenseIndex.load(tmp_path / "idx")
    assert back.meta == {"step": 1} and back.ntotal == 500
    assert torch.equal(back.search(q, 5)[1], old.search(q, 5)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    new.save(tmp_path / "idx")  # overwrite works
    assert DenseIndex.load(tmp_path / "idx").meta == {"step": 2}


def test_load_recovers_from_crash_between_renames(tmp_path) -> None:
    x, q = _data()
    idx = DenseIndex(device="cpu")
    idx.build(x)
    idx.save(tmp_path / "idx")
    (tmp_path / "idx").rename(tmp_path / "idx.old")  # state after the first rename of a swap
    back = DenseIndex.load(tmp_path / "idx")
    assert back.ntotal == 500 and (tmp_path / "idx").is_dir() and not (tmp_path / "idx.old").exists()


def test_load_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DenseIndex.load(tmp_path / "nowhere")
    x, _ = _data()
    idx = DenseIndex(backend="torch", device="cpu")  # the torch backend saves its matrix as vectors.npy
    idx.build(x)
    idx.save(tmp_path / "idx")
    (tmp_path / "idx" / "vectors.npy").unlink()
    with pytest.raises(IndexFileError, match=r"idx.*vectors\.npy"):
        DenseIndex.load(tmp_path / "idx")
    idx = DenseIndex(device="cpu")
    idx.build(x)
    idx.save(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match="index.faiss"):
        DenseIndex.load(tmp_path / "idx")
    idx.save(tmp_path / "idx")
    (tmp_path / "idx" / "meta.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="idx"):
        DenseIndex.load(tmp_path / "idx")


def test_search_before_build_and_bad_shapes() -> None:
    idx = DenseIndex(device="cpu")
    with pytest.raises(RuntimeError, match="build"):
        idx.search(torch.zeros(1, 4), 1)
    idx.build(torch.randn(10, 4))
    with pytest.raises(ValueError, match="queries"):
        idx.search(torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="torch backend is exact"):
        DenseIndex(factory="HNSW32,Flat", backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_matches_cpu(tmp_path, backend: str) -> None:
    x, q = _data(n=2000, d=32)
    cpu = DenseIndex(device="cpu")
    cpu.build(x)
    gpu = DenseIndex(backend=backend, device="cuda", store_dtype="float16")
    gpu.build(x)
    _, ids = gpu.search(q.cuda(), 10)
    assert ids.device.type == "cpu"
    assert (ids == cpu.search(q, 10)[1]).float().mean() > 0.95  # fp16 store may swap near-ties
    gpu.save(tmp_path / "g")
    assert DenseIndex.load(tmp_path / "g", device="cpu").ntotal == 2000


def test_faiss_gpu_large_k_searches_a_cpu_copy(monkeypatch) -> None:
    """faiss GPU selects at most 2048: larger k goes to a CPU clone, made once (simulated without a GPU)."""
    x = torch.randn(50, 8)
    idx = DenseIndex(dim=8)
    idx.build(x)
    idx.use_faiss_gpu = True  # pretend the installed index lives on a GPU
    clones = []
    monkeypatch.setattr(index_mod.faiss, "index_gpu_to_cpu", lambda i: clones.append(i) or i, raising=False)
    monkeypatch.setattr(index_mod, "FAISS_GPU_MAX_K", 20)
    s_small, _ = idx.search(x[:2], 20)
    assert clones == []
    s, ids = idx.search(x[:2], 60)  # above the limit, and above ntotal: padded
    assert len(clones) == 1 and ids.shape == (2, 60) and (ids[:, 50:] == -1).all()
    torch.testing.assert_close(s[:, :20], s_small)
    idx.search(x[:2], 60)
    assert len(clones) == 1  # cached until the next build
    idx.use_faiss_gpu = False  # rebuild on CPU (no GPU here), then pretend again
    idx.build(x)
    idx.use_faiss_gpu = True
    idx.search(x[:2], 60)
    assert len(clones) == 2


@pytest.mark.parametrize("factory", ["Flat", "HNSW8,Flat", "IVF8,PQ4"])
def test_no_second_copy_vectors_from_index_or_memory_mapped_file(tmp_path, factory: str) -> None:
    x, q = _data(n=300, d=16)
    np.save(tmp_path / "v.npy", x.numpy())
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    idx = DenseIndex(factory=factory, device="cpu")
    idx.build(x, vectors=mm if "PQ" in factory else None)
    assert not hasattr(idx, "_vecs")  # the exact matrix is not kept next to the index
    ids = torch.tensor([[5, 299], [0, -1]])
    v = idx.vectors(ids)
    torch.testing.assert_close(v[:, :1], x[ids[:, :1]])
    assert (v[1, 1] == 0).all()
    idx.save(tmp_path / "idx")
    back = DenseIndex.load(tmp_path / "idx", device="cpu")
    torch.testing.assert_close(back.vectors(ids[:1]), x[ids[:1]])
    if "PQ" in factory:  # the exact source went with it, memory-mapped
        assert isinstance(back._exact, np.memmap)


def test_bare_cuda_means_this_ranks_gpu_and_auto_store_dtype(monkeypatch) -> None:
    from rag_lightning.retrieval.index import resolve_device, resolve_store_dtype

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)  # never every rank on cuda:0
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_store_dtype(torch.device("cuda", 3)) == "float16"
    assert resolve_store_dtype(torch.device("cpu")) == "float32"
    idx = DenseIndex(device="cpu", store_dtype="float16")  # exact fp16 on CPU: faiss SQfp16, half the memory
    x, q = _data(n=200, d=16)
    idx.build(x)
    assert idx._cpu_factory() == "SQfp16"
    torch.testing.assert_close(idx.vectors(torch.arange(3)), x[:3].half().float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_index_on_local_rank_device_in_fp16(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    x, q = _data(n=1000, d=32)
    idx = DenseIndex(backend="torch", device="cuda")
    idx.build(x)
    assert idx.device.index == torch.cuda.device_count() - 1 and idx.store_dtype == "float16"
    assert idx._dev_vecs.dtype == torch.float16 and idx._dev_vecs.device == idx.device
    scores, ids = idx.search(q.cuda(), 5)
    assert scores.dtype == torch.float32 and ids.device.type == "cpu"
