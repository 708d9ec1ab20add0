"""Dense maximum-inner-product index: faiss (CPU / GPU) or exact torch matmul, atomic save / load.

Scores are inner products ``s(q, p) = <q, p>``. ``search`` returns the top-k passages per query sorted by
descending score. When fewer than ``k`` results exist (``k > ntotal``, or an approximate index finds fewer),
the tail is padded with id ``-1`` and score ``-inf`` (never clamped: the output is always ``(B, k)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import faiss
import numpy as np
import torch

from rag_lightning import integrity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FAISS_GPU_MAX_K = 2048  # faiss GPU top-k selection limit; larger k is searched on a CPU copy


class IndexFileError(integrity.IntegrityError):
    """A saved index directory is missing files or holds corrupt / inconsistent ones."""


def _faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def default_num_threads() -> int:
    """CPU cores usable by this process, split among the ranks on this node (``LOCAL_WORLD_SIZE``):
    faiss OpenMP loops degrade badly (10-100x) when their threads outnumber the free cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (directories: best effort, not supported on every OS)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> this process's GPU if CUDA is available, else cpu; a bare "cuda" -> ``cuda:LOCAL_RANK``
    (the DDP launcher's local rank, else the current device), so ranks never share ``cuda:0`` by accident."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        local = os.environ.get("LOCAL_RANK")
        device = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
    return device


def resolve_store_dtype(device: torch.device, store_dtype: str = "auto") -> str:
    """ "auto" -> float16 on a GPU (half the memory; scores are still accumulated in float32), else float32."""
    if store_dtype == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if store_dtype not in _DTYPES:
        raise ValueError(f"store_dtype must be auto or one of {list(_DTYPES)}, got {store_dtype!r}")
    return store_dtype


class DenseIndex:
    """Inner-product index over N passage embeddings of dimension d.

    backend: "faiss" (CPU, or GPU via ``index_cpu_to_gpu`` when faiss has GPU support and device is cuda),
        "torch" (exact ``q @ X.T`` + top-k, chunked over rows, on CUDA when available), or "auto" = faiss,
        except on a cuda device with a CPU-only faiss and an exact "Flat" factory, where it is torch.
    device: "auto" = this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else cpu; "cuda" without
        an index also means ``cuda:LOCAL_RANK``, so every DDP rank's index lives on its own GPU.
    factory: any faiss factory string ("Flat", "HNSW32,Flat", "IVF256,PQ16", ...), built with
        ``METRIC_INNER_PRODUCT`` and trained on (a sample of at most ``train_size``) rows when needed.
    store_dtype: "float32", "float16", or "auto" (float16 on a GPU, float32 on CPU). An exact Flat index in
        float16 is faiss ``SQfp16`` on CPU, ``useFloat16`` on faiss-gpu, a half tensor for the torch backend.
    num_threads: faiss OpenMP threads (process-wide setting), default ``default_num_threads()``.

    No second copy of the vectors is kept: ``vectors(ids)`` reads them from the index itself (Flat / SQ /
    HNSW-Flat storage, the torch backend's matrix), or, for a compressed index (PQ), from an exact source given
    with ``build(..., vectors=)`` (a memory-mapped ``.npy``); without one, PQ reconstructions are returned
    (lossy; a warning says so). ``version`` is metadata; the retriever that owns the index sets it.
    """

    def __init__(
        self,
        dim: int | None = None,
        factory: str = "Flat",
        backend: str = "auto",
        device: str = "auto",
        nprobe: int = 16,
        ef_search: int = 128,
        store_dtype: str = "auto",
        train_size: int = 262_144,
        chunk_rows: int = 65_536,
        num_threads: int | None = None,
        meta: dict | None = None,
    ) -> None:
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto|faiss|torch, got {backend!r}")
        self.device = resolve_device(device)
        on_cuda = self.device.type == "cuda"
        store_dtype = resolve_store_dtype(self.device, store_dtype)
        if backend == "auto":
            backend = "torch" if on_cuda and factory == "Flat" and not _faiss_gpu_available() else "faiss"
        if backend == "torch" and factory != "Flat":
            raise ValueError(f"the torch backend is exact: factory must be 'Flat', got {factory!r}")
        self.backend = backend
        self.use_faiss_gpu = backend == "faiss" and on_cuda and _faiss_gpu_available()
        self.dim, self.factory, self.nprobe, self.ef_search = dim, factory, nprobe, ef_search
        self.store_dtype, self.train_size, self.chunk_rows = store_dtype, train_size, chunk_rows
        self.version = 0
        self.meta: dict = dict(meta or {})
        self._ntotal = 0
        self._index: faiss.Index | None = None  # faiss index (CPU or GPU)
        self._cpu_copy: faiss.Index | None = None  # CPU clone of a GPU index, made on a k > 2048 search
        self._dev_vecs: torch.Tensor | None = None  # (N, d) torch backend's matrix on self.device
        self._exact: np.ndarray | None = None  # (N, d) exact vectors (memory-mapped file), for lossy indexes
        self._lossy = False  # vectors() would return PQ reconstructions
        faiss.omp_set_num_threads(num_threads or default_num_threads())

    # ------------------------------------------------------------------ build
    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def lossy(self) -> bool:
        """Whether ``vectors()`` returns compressed (PQ) reconstructions rather than the exact vectors."""
        return self._lossy

    def build(self, emb: torch.Tensor | np.ndarray, vectors: np.ndarray | None = None) -> None:
        """Index ``emb`` (N, d); row i gets id i. Replaces any previous content.

        vectors: an exact (N, d) source for ``vectors(ids)`` (e.g. ``np.load(f, mmap_mode="r")[a:b]``),
        needed only by compressed factories (PQ); ``emb`` itself is not kept."""
        x = emb if isinstance(emb, np.ndarray) else torch.as_tensor(emb).detach()  # (N, d); read in chunks
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (N, d), got shape {tuple(x.shape)}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {x.shape[1]}, index dim is {self.dim}")
        if vectors is not None and tuple(vectors.shape) != tuple(x.shape):
            raise ValueError(f"vectors source has shape {tuple(vectors.shape)}, embeddings {tuple(x.shape)}")
        self.dim, self._ntotal = int(x.shape[1]), int(x.shape[0])
        self._index, self._dev_vecs, self._exact = None, None, vectors
        if self.backend == "faiss":
            self._set_faiss(self._build_faiss(x))
            return
        self._dev_vecs = torch.empty(
            (self._ntotal, self.dim), dtype=_DTYPES[self.store_dtype], device=self.device
        )
        for s in range(0, self._ntotal, self.chunk_rows):  # host memory: one chunk at a time
            self._dev_vecs[s : s + self.chunk_rows] = _rows_f32(x, s, s + self.chunk_rows).to(self.device)

    def _cpu_factory(self) -> str:
        """The factory built on CPU: an fp16 exact index is faiss's scalar quantizer (half the memory)."""
        fp16_cpu = self.store_dtype == "float16" and not self.use_faiss_gpu
        return "SQfp16" if self.factory == "Flat" and fp16_cpu else self.factory

    def _build_faiss(self, x: np.ndarray | torch.Tensor) -> faiss.Index:
        """CPU faiss index from ``x`` (N, d) (a tensor, an array or a memory map), trained on a seeded sample
        when untrained, added in chunks of ``chunk_rows`` (host memory: the index plus one chunk)."""
        index = faiss.index_factory(self.dim, self._cpu_factory(), faiss.METRIC_INNER_PRODUCT)
        n = len(x)
        if not index.is_trained:
            rows = np.arange(n)
            if n > self.train_size:
                rows = np.sort(np.random.default_rng(0).choice(n, self.train_size, replace=False))
            sample = x[torch.from_numpy(rows)] if isinstance(x, torch.Tensor) else x[rows]
            index.train(np.ascontiguousarray(torch.as_tensor(np.asarray(sample)).float().numpy()))
        for s in range(0, n, self.chunk_rows):
            index.add(_rows_f32(x, s, s + self.chunk_rows).numpy())
        return index

    def _set_faiss(self, cpu_index: faiss.Index) -> None:
        """Install a CPU faiss index, moved to the GPU when configured (HNSW etc. stay on CPU)."""
        index = cpu_index
        self._ntotal = int(cpu_index.ntotal)
        if self.use_faiss_gpu:
            try:
                self._gpu_res = faiss.StandardGpuResources()
                opts = faiss.GpuClonerOptions()
                opts.useFloat16 = self.store_dtype == "float16"
                index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, cpu_index, opts)
            except RuntimeError as err:  # e.g. HNSW has no GPU implementation
                log.warning("faiss GPU does not support %r (%s); searching on CPU", self.factory, err)
                self.use_faiss_gpu = False
        space = faiss.GpuParameterSpace() if self.use_faiss_gpu else faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            with contextlib.suppress(RuntimeError):  # parameter does not apply to this index type
                space.set_index_parameter(index, name, value)
        self._index, self._cpu_copy = index, None
        if self._exact is None and not self.use_faiss_gpu:
            with contextlib.suppress(RuntimeError):  # IVF: reconstruct() needs the id -> list map
                faiss.extract_index_ivf(cpu_index).make_direct_map()
        self._lossy = self._exact is None and "PQ" in self.factory.upper()
        if self._lossy:
            log.warning("index %r keeps no exact vectors: vectors() returns PQ reconstructions (build it "
                        "with scripts/build_index.py to read exact ones from its vectors file)", self.factory)  # fmt: skip

    # ----------------------------------------------------------------- search
    def _check_built(self) -> None:
        if self._index is None and self._dev_vecs is None:
            raise RuntimeError("DenseIndex is empty: call build() or DenseIndex.load() first")

    @torch.no_grad()  # not inference_mode: results may be used in autograd-recorded ops later
    def search(self, q: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by inner product: (scores (B, k) float32 CPU, ids (B, k) int64 CPU), descending;
        padded with (-inf, -1) where fewer than k results exist."""
        self._check_built()
        q = torch.as_tensor(q).detach()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {tuple(q.shape)}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if self.backend == "torch":
            return self._search_torch(q, k)
        qn = q.to("cpu", torch.float32).contiguous().numpy()  # (B, d)
        index = self._index
        if self.use_faiss_gpu and k > FAISS_GPU_MAX_K:
            if self._cpu_copy is None:
                log.warning("k=%d exceeds faiss GPU's limit %d: searching a CPU copy", k, FAISS_GPU_MAX_K)
                self._cpu_copy = faiss.index_gpu_to_cpu(self._index)
            index = self._cpu_copy
        scores, ids = index.search(qn, k)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
        return scores.masked_fill(ids < 0, float("-inf")), ids

    def _search_torch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search: running top-k over row chunks of ``q @ X.T`` (memory B * chunk_rows)."""
        x = self._dev_vecs
        q = q.to(x.device, torch.float32)  # (B, d)
        best_s = torch.full((q.shape[0], k), float("-inf"), device=x.device)  # (B, k)
        best_i = torch.full((q.shape[0], k), -1, dtype=torch.long, device=x.device)  # (B, k)
        for start in range(0, x.shape[0], self.chunk_rows):
            s = q @ x[start : start + self.chunk_rows].float().T  # (B, c)
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)  # (B, k')
            cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + start], 1)
            best_s, pos = cat_s.topk(k, dim=1)  # (B, k)
            best_i = cat_i.gather(1, pos)
        return best_s.cpu(), best_i.masked_fill(best_s == float("-inf"), -1).cpu()

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored embeddings for ``ids`` (...) -> (..., d) float32 CPU; id -1 gives a zero row."""
        self._check_built()
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        flat = ids.reshape(-1).clamp(min=0)  # (M,)
        if self._dev_vecs is not None:
            out = self._dev_vecs[flat.to(self._dev_vecs.device)].float().cpu()  # (M, d)
        elif self._exact is not None:
            uniq, inv = flat.unique(return_inverse=True)  # sorted reads from the memory-mapped file
            out = torch.from_numpy(np.asarray(self._exact[uniq.numpy()], dtype=np.float32))[inv]
        else:
            index = self._cpu_copy or self._index
            out = torch.from_numpy(index.reconstruct_batch(flat.numpy()))  # (M, d)
        out = out.view(*ids.shape, self.dim)
        return out.masked_fill((ids < 0).unsqueeze(-1), 0.0)

    def search_with_vectors(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``search`` plus the exact vectors of the hits: (scores (B,k), ids (B,k), vecs (B,k,d))."""
        scores, ids = self.search(q, k)
        return scores, ids, self.vectors(ids)

    # ------------------------------------------------------------- save/load
    def _cpu_index(self) -> faiss.Index:
        return faiss.index_gpu_to_cpu(self._index) if self.use_faiss_gpu else self._index

    def _meta_record(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "factory": self.factory,
            "backend": self.backend,
            "store_dtype": self.store_dtype,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write index.faiss, meta.json and (torch backend, or an exact source of a lossy index) vectors.npy
        to a temporary sibling dir, fsync, then swap it in: rename old -> ``<name>.old``, rename new ->
        ``<name>``, delete old (``load`` recovers from a crash between the two renames). A failure before the
        swap leaves the previous index untouched."""
        self._check_built()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        old = target.parent / f"{target.name}.old"
        tmp.mkdir()
        try:
            index = self._cpu_index() if self.backend == "faiss" else faiss.IndexFlatIP(self.dim)
            faiss.write_index(index, str(tmp / "index.faiss"))  # torch backend: empty placeholder
            files = ["index.faiss", "meta.json"]
            if self._dev_vecs is not None or self._exact is not None:
                write_npy_rows(tmp / "vectors.npy", self, self.chunk_rows)
                files.append("vectors.npy")
            record = {
                **self._meta_record(),
                "files": integrity.manifest(tmp, [f for f in files if f != "meta.json"]),
            }
            with open(tmp / "meta.json", "w") as f:  # with the size and checksum of every other file
                json.dump(record, f, indent=1, default=str)
            for name in files:
                _fsync(tmp / name)
            _fsync(tmp)
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
            _fsync(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backend: str | None = None,
        device: str = "auto",
        verify: str = "full",
        **kwargs,
    ) -> DenseIndex:
        """Load a directory written by ``save``. ``backend`` defaults to the saved one; a Flat index saved
        from one backend can be loaded into the other. ``vectors.npy`` is memory-mapped, not read into RAM.
        Raises FileNotFoundError / IndexFileError naming the path when the directory or a file is missing,
        unreadable or inconsistent, ``IntegrityError`` when a file's size or (``verify="full"``) checksum
        differs from meta.json's record, or a vector row is NaN / Inf (``full``)."""
        path = Path(path)
        old = path.parent / f"{path.name}.old"
        if not path.exists() and old.exists():  # crash between the two renames of save()
            log.warning("index dir %s missing, recovering from %s", path, old)
            os.rename(old, path)
        if not path.is_dir():
            raise FileNotFoundError(f"index directory not found: {path}")
        for name in ("index.faiss", "meta.json"):
            if not (path / name).is_file():
                raise IndexFileError(f"index directory {path} is missing {name}")
        try:
            rec = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise IndexFileError(f"corrupt index file in {path}: {err}") from err
        try:
            if integrity.check_level(verify) != "none" and not integrity.verify_manifest(
                path, rec.get("files"), verify
            ):
                log.warning("index %s records no checksums (saved before they were): not verified", path)
        except integrity.IntegrityError as err:
            raise IndexFileError(str(err)) from None
        shape = (rec.get("ntotal"), rec.get("dim"))
        vecs = None
        if (path / "vectors.npy").is_file():
            try:
                vecs = np.load(path / "vectors.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise IndexFileError(f"corrupt index file {path / 'vectors.npy'}: {err}") from err
            if vecs.ndim != 2 or vecs.shape != shape:
                raise IndexFileError(f"{path / 'vectors.npy'} has shape {vecs.shape}, meta.json says {shape}")
            if verify == "full":
                try:
                    integrity.check_finite_rows(vecs, path / "vectors.npy")
                except integrity.IntegrityError as err:
                    raise IndexFileError(str(err)) from None
        elif rec["backend"] == "torch":
            raise IndexFileError(f"index directory {path} is missing vectors.npy")
        self = cls(
            dim=rec["dim"],
            factory=rec["factory"],
            backend=backend or rec["backend"],
            device=device,
            nprobe=rec["nprobe"],
            ef_search=rec["ef_search"],
            store_dtype=kwargs.pop("store_dtype", rec["store_dtype"]),
            meta=rec["meta"],
            **kwargs,
        )
        if rec["backend"] == "torch":  # no faiss index was saved: built from the vectors
            self.build(vecs)
            self.version = int(rec["version"])
            return self
        try:
            index = faiss.read_index(str(path / "index.faiss"))
        except RuntimeError as err:
            raise IndexFileError(f"corrupt faiss index {path / 'index.faiss'}: {err}") from err
        if index.ntotal != shape[0] or index.d != shape[1]:
            raise IndexFileError(f"{path / 'index.faiss'} holds {index.ntotal}x{index.d}, expected {shape}")
        self.version = int(rec["version"])
        if self.backend == "torch":  # a Flat faiss index loaded into the torch backend
            self.build(vecs if vecs is not None else index.reconstruct_n(0, index.ntotal))
            self.version = int(rec["version"])
            return self
        self._exact = vecs
        self._set_faiss(index)
        return self

    def __repr__(self) -> str:
        return (
            f"DenseIndex(factory={self.factory!r}, backend={self.backend!r}, device={self.device}, "
            f"ntotal={self.ntotal}, dim={self.dim}, version={self.version})"
        )


def _rows_f32(x: np.ndarray | torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of ``x`` as a contiguous float32 CPU tensor (a copy of that chunk only)."""
    part = x[start:end]
    if isinstance(part, np.ndarray):
        return torch.from_numpy(np.array(part, dtype=np.float32))
    return part.detach().to("cpu", torch.float32).contiguous()


def write_npy_rows(path: str | os.PathLike, index: DenseIndex, chunk_rows: int = 65_536) -> None:
    """Write ``index.vectors(0..N-1)`` to an ``.npy`` in row chunks (memory: one chunk), store dtype."""
    dtype = np.float16 if index.store_dtype == "float16" else np.float32
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(index.ntotal, index.dim))
    for s in range(0, index.ntotal, chunk_rows):
        e = min(index.ntotal, s + chunk_rows)
        rows = index.vectors(torch.arange(s, e)).numpy()  # (e - s, d)
        integrity.check_finite_rows(rows, path, start=s)  # never a saved index with NaN rows
        out[s:e] = rows
    out.flush()
    del out
