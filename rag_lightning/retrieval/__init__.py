"""Dense retrieval: DenseIndex (faiss CPU/GPU, exact torch), corpus embedding, sharded DDP search."""

from rag_lightning.retrieval import store
from rag_lightning.retrieval.embed import embed_chunks, embed_passages, merge_chunks, plan_chunks
from rag_lightning.retrieval.index import DenseIndex, IndexFileError
from rag_lightning.retrieval.sharded import ShardedIndex, shard_range

__all__ = [
    "DenseIndex",
    "IndexFileError",
    "ShardedIndex",
    "embed_chunks",
    "embed_passages",
    "merge_chunks",
    "plan_chunks",
    "shard_range",
    "store",
]
