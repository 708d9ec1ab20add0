"""rag-lightning: end-to-end retrieval-augmented generation with Lightning 2.x, Hydra and FAISS."""

__version__ = "0.1.0"
