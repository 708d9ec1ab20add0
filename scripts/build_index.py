#!/usr/bin/env python
"""Embed a passage corpus with a document encoder and save a DenseIndex; resumable and shardable.

One process:       python scripts/build_index.py --corpus passages.jsonl --encoder minilm --out runs/idx
S processes:       ... --num-shards S --shard-id I      (each embeds chunks i with i % S == I)
then once:         ... --merge                           (concatenates the chunks, builds, saves)
Embeddings go to ``OUT/emb_{start}_{end}.npy`` (``--chunk-size`` rows each, written atomically; existing
chunks are skipped, so rerunning an interrupted command resumes). The index is saved to ``OUT/index``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rag_lightning.retrieval import DenseIndex, embed_chunks, merge_chunks

log = logging.getLogger("build_index")


def run(
    tokens: Any,
    encoder: torch.nn.Module | None,
    out_dir: str | Path,
    *,
    chunk_size: int = 100_000,
    num_shards: int = 1,
    shard_id: int = 0,
    merge_only: bool = False,
    factory: str = "Flat",
    fingerprint: str = "",
    meta: dict | None = None,
    index_kwargs: dict | None = None,
    **embed_kwargs: Any,
) -> DenseIndex | None:
    """Embed this shard's missing chunks of ``tokens`` (skipped when ``merge_only``); with one shard or
    ``merge_only``, merge all chunks into an index saved to ``out_dir/index`` and return it."""
    out_dir = Path(out_dir)
    if not merge_only:
        done = embed_chunks(
            encoder,
            tokens,
            out_dir,
            chunk_size,
            num_shards,
            shard_id,
            fingerprint=fingerprint,
            **embed_kwargs,
        )
        log.info("shard %d/%d: embedded %d chunk(s) %s", shard_id, num_shards, len(done), done)
        if num_shards > 1:
            return None  # the final `--merge` step builds the index
    emb = merge_chunks(out_dir)  # (N, d)
    fingerprint = fingerprint or json.loads((out_dir / "plan.json").read_text())["fingerprint"]
    index = DenseIndex(factory=factory, **(index_kwargs or {}))
    index.build(emb)
    index.meta = {"fingerprint": fingerprint, "ntotal": index.ntotal, "dim": index.dim, **(meta or {})}
    index.save(out_dir / "index")
    log.info("saved %r to %s", index, out_dir / "index")
    return index


def _load_inputs(args: argparse.Namespace) -> tuple[Any, torch.nn.Module, str]:
    """(doc token view, encoder, corpus fingerprint) from the CLI arguments."""
    from transformers import AutoTokenizer

    from rag_lightning.data.corpus import Corpus
    from rag_lightning.models.encoders import Encoder, minilm_dir

    name = minilm_dir() if args.encoder == "minilm" else args.encoder
    encoder = Encoder.from_pretrained(name, pooling=args.pooling)
    gen_tok = AutoTokenizer.from_pretrained(args.gen_tokenizer) if args.gen_tokenizer else None
    corpus = Corpus.from_file(
        args.corpus,
        args.format,
        cache_dir=args.cache_dir,
        gen_tokenizer=gen_tok,
        doc_tokenizer=encoder.tokenizer,
        max_passage_tokens=args.max_passage_tokens,
    )
    return corpus.doc_token_view(), encoder, corpus.fingerprint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="passages file (jsonl / tsv / arrow / squad json)")
    p.add_argument("--format", default="auto")
    p.add_argument("--cache-dir", default=".cache/corpus")
    p.add_argument("--encoder", default="minilm", help="'minilm', a local model dir, or 'tiny:bert'")
    p.add_argument("--pooling", default=None, choices=[None, "cls", "mean", "pooler"])
    p.add_argument("--gen-tokenizer", default=None, help="also tokenize for the generator (shares the cache)")
    p.add_argument("--max-passage-tokens", type=int, default=256)
    p.add_argument("--out", required=True, help="chunk directory; the index goes to OUT/index")
    p.add_argument("--chunk-size", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="only merge existing chunks and build the index")
    p.add_argument("--factory", default="Flat", help='faiss factory string, e.g. "HNSW32,Flat"')
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--device", default=None, help="embedding device (default: cuda if available)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="embedding autocast; auto = bf16 on CUDA and on CPUs with native bf16")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not 0 <= args.shard_id < args.num_shards:
        p.error(f"--shard-id must be in [0, {args.num_shards})")
    tokens, encoder, fingerprint = None, None, ""
    if not args.merge:
        if not args.corpus:
            p.error("--corpus is required unless --merge")
        tokens, encoder, fingerprint = _load_inputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(
        tokens,
        encoder,
        args.out,
        chunk_size=args.chunk_size,
        num_shards=args.num_shards,
        shard_id=args.shard_id,
        merge_only=args.merge,
        factory=args.factory,
        fingerprint=fingerprint,
        meta={"encoder": args.encoder, "corpus": args.corpus},
        index_kwargs={"store_dtype": args.store_dtype},
        batch_size=args.batch_size,
        device=device,
        amp_dtype=args.precision,
        progress=not args.no_progress,
        pad_id=getattr(getattr(encoder, "tokenizer", None), "pad_token_id", None) or 0,
    )


if __name__ == "__main__":
    main()
