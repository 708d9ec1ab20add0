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

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FILES = ("index.faiss", "vectors.npy", "meta.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FAISS_GPU_MAX_K = 2048  # faiss GPU top-k selection limit; larger k is searched on a CPU copy


class IndexFileError(RuntimeError):
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


class DenseIndex:
    """Inner-product index over N passage embeddings of dimension d.

    backend: "faiss" (CPU, or GPU via ``index_cpu_to_gpu`` when faiss has GPU support and device is cuda),
        "torch" (exact ``q @ X.T`` + top-k, chunked over rows, on CUDA when available), or "auto" = faiss,
        except on a cuda device with a CPU-only faiss and an exact "Flat" factory, where it is torch.
    factory: any faiss factory string ("Flat", "HNSW32,Flat", "IVF256,PQ16", ...), built with
        ``METRIC_INNER_PRODUCT`` and trained on (a sample of at most ``train_size``) rows when needed.
    num_threads: faiss OpenMP threads (process-wide setting), default ``default_num_threads()``.
    The exact vectors are kept on CPU in ``store_dtype`` for ``vectors(ids)`` (a second copy next to a Flat
    faiss index: N*d*4 bytes more). ``version`` is bumped on every ``build``; callers may also set it.
    """

    def __init__(
        self,
        dim: int | None = None,
        factory: str = "Flat",
        backend: str = "auto",
        device: str = "auto",
        nprobe: int = 16,
        ef_search: int = 128,
        store_dtype: str = "float32",
        train_size: int = 262_144,
        chunk_rows: int = 65_536,
        num_threads: int | None = None,
        meta: dict | None = None,
    ) -> None:
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto|faiss|torch, got {backend!r}")
        if store_dtype not in _DTYPES:
            raise ValueError(f"store_dtype must be one of {list(_DTYPES)}, got {store_dtype!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
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
        self._index: faiss.Index | None = None  # faiss index (CPU or GPU)
        self._cpu_copy: faiss.Index | None = None  # CPU clone of a GPU index, made on a k > 2048 search
        self._vecs: torch.Tensor | None = None  # (N, d) exact vectors, CPU, store dtype
        self._dev_vecs: torch.Tensor | None = None  # (N, d) torch-backend copy on self.device
        faiss.omp_set_num_threads(num_threads or default_num_threads())

    # ------------------------------------------------------------------ build
    @property
    def ntotal(self) -> int:
        return 0 if self._vecs is None else int(self._vecs.shape[0])

    def build(self, emb: torch.Tensor | np.ndarray) -> None:
        """Index ``emb`` (N, d); row i gets id i. Replaces any previous content and bumps ``version``."""
        if isinstance(emb, np.ndarray) and not emb.flags.writeable:  # e.g. a read-only memory-mapped slice
            emb = np.array(emb, dtype=np.float32)  # copied into memory
        x = torch.as_tensor(emb).detach().to("cpu", torch.float32).contiguous()  # (N, d)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (N, d), got shape {tuple(x.shape)}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {x.shape[1]}, index dim is {self.dim}")
        self.dim = int(x.shape[1])
        self._vecs = x.to(_DTYPES[self.store_dtype])
        self._index, self._dev_vecs = None, None
        if self.backend == "faiss":
            self._set_faiss(self._build_faiss(x.numpy()))
        else:
            self._dev_vecs = self._vecs.to(self.device)
        self.version += 1

    def _build_faiss(self, x: np.ndarray) -> faiss.Index:
        """CPU faiss index from ``x`` (N, d) float32, trained on a seeded sample when untrained."""
        index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            sample = x
            if len(x) > self.train_size:
                rows = np.random.default_rng(0).choice(len(x), self.train_size, replace=False)
                sample = x[np.sort(rows)]
            index.train(sample)
        index.add(x)
        return index

    def _set_faiss(self, cpu_index: faiss.Index) -> None:
        """Install a CPU faiss index, moved to the GPU when configured (HNSW etc. stay on CPU)."""
        index = cpu_index
        if self.use_faiss_gpu:
            try:
                self._gpu_res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, cpu_index)
            except RuntimeError as err:  # e.g. HNSW has no GPU implementation
                log.warning("faiss GPU does not support %r (%s); searching on CPU", self.factory, err)
                self.use_faiss_gpu = False
        space = faiss.GpuParameterSpace() if self.use_faiss_gpu else faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            with contextlib.suppress(RuntimeError):  # parameter does not apply to this index type
                space.set_index_parameter(index, name, value)
        self._index, self._cpu_copy = index, None

    # ----------------------------------------------------------------- search
    def _check_built(self) -> None:
        if self._vecs is None:
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
        """Exact stored embeddings for ``ids`` (...) -> (..., d) float32 CPU; id -1 gives a zero row."""
        self._check_built()
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        out = self._vecs[ids.clamp(min=0)].float()  # (..., d)
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
        """Write index.faiss, vectors.npy, meta.json to a temporary sibling dir, fsync, then swap it in:
        rename old -> ``<name>.old``, rename new -> ``<name>``, delete old (``load`` recovers from a crash
        between the two renames). A failure before the swap leaves the previous index untouched."""
        self._check_built()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        old = target.parent / f"{target.name}.old"
        tmp.mkdir()
        try:
            index = self._cpu_index() if self.backend == "faiss" else faiss.IndexFlatIP(self.dim)
            faiss.write_index(index, str(tmp / "index.faiss"))  # torch backend: empty placeholder
            np.save(tmp / "vectors.npy", self._vecs.numpy())
            with open(tmp / "meta.json", "w") as f:
                json.dump(self._meta_record(), f, indent=1, default=str)
            for name in _FILES:
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
        cls, path: str | os.PathLike, backend: str | None = None, device: str = "auto", **kwargs
    ) -> DenseIndex:
        """Load a directory written by ``save``. ``backend`` defaults to the saved one; a Flat index saved
        from one backend can be loaded into the other. Raises FileNotFoundError / IndexFileError naming the
        path when the directory or a file is missing, unreadable or inconsistent."""
        path = Path(path)
        old = path.parent / f"{path.name}.old"
        if not path.exists() and old.exists():  # crash between the two renames of save()
            log.warning("index dir %s missing, recovering from %s", path, old)
            os.rename(old, path)
        if not path.is_dir():
            raise FileNotFoundError(f"index directory not found: {path}")
        for name in _FILES:
            if not (path / name).is_file():
                raise IndexFileError(f"index directory {path} is missing {name}")
        try:
            rec = json.loads((path / "meta.json").read_text())
            vecs = np.load(path / "vectors.npy")
        except (OSError, ValueError) as err:
            raise IndexFileError(f"corrupt index file in {path}: {err}") from err
        shape = (rec.get("ntotal"), rec.get("dim"))
        if vecs.ndim != 2 or vecs.shape != shape:
            raise IndexFileError(f"{path / 'vectors.npy'} has shape {vecs.shape}, meta.json says {shape}")
        self = cls(
            dim=rec["dim"],
            factory=rec["factory"],
            backend=backend or rec["backend"],
            device=device,
            nprobe=rec["nprobe"],
            ef_search=rec["ef_search"],
            store_dtype=str(vecs.dtype),
            meta=rec["meta"],
            **kwargs,
        )
        self.version, self._vecs = int(rec["version"]), torch.from_numpy(vecs)
        if self.backend == "torch":
            self._dev_vecs = self._vecs.to(self.device)
        elif rec["backend"] == "torch":  # no faiss index was saved: rebuild it
            self._set_faiss(self._build_faiss(self._vecs.float().numpy()))
        else:
            try:
                index = faiss.read_index(str(path / "index.faiss"))
            except RuntimeError as err:
                raise IndexFileError(f"corrupt faiss index {path / 'index.faiss'}: {err}") from err
            if index.ntotal != shape[0] or index.d != shape[1]:
                raise IndexFileError(
                    f"{path / 'index.faiss'} holds {index.ntotal}x{index.d}, expected {shape}"
                )
            self._set_faiss(index)
        return self

    def __repr__(self) -> str:
        return (
            f"DenseIndex(factory={self.factory!r}, backend={self.backend!r}, device={self.device}, "
            f"ntotal={self.ntotal}, dim={self.dim}, version={self.version})"
        )
