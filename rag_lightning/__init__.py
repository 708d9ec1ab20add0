"""rag-lightning: end-to-end retrieval-augmented generation with Lightning 2.x, Hydra and FAISS."""

__version__ = "0.1.0"

import os

# idle OpenMP threads that spin make torch CPU ops ~10x slower when the cores are shared (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    """``from rag_lightning import RagPipeline`` without importing torch on ``import rag_lightning``."""
    if name == "RagPipeline":
        from rag_lightning.pipeline import RagPipeline

        return RagPipeline
    raise AttributeError(f"module 'rag_lightning' has no attribute {name!r}")
