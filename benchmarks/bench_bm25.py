"""BM25 index build time, size on disk, memory-mapped load and search: `python benchmarks/benchmark.py bm25`.

For each size N (default 100k and 1M), synthetic 100-word passages drawn from a Zipf(1.1) vocabulary of 200k
words (a natural-language-like term distribution) are indexed by ``BM25Index.build`` (bm25s: tokenize,
English stopwords, eager BM25 scores) in a fresh process, saved, loaded memory-mapped in another fresh
process and searched with 200 queries of 6 words (top 100). Each process reports its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench import Bench, Col, Table  # benchmarks/ is sys.path[0] when run as a script

TABLE = Table(Col("passages", 10), Col("build s", 9, "{:.1f}"), Col("psg/s", 9, "{:.0f}"),
              Col("build peak MB", 15, "{:.0f}"), Col("index MB", 10, "{:.0f}"), Col("load s", 8, "{:.2f}"),
              Col("search ms/q", 13, "{:.1f}"), Col("load+search peak MB", 21, "{:.0f}"))  # fmt: skip
VOCAB, WORDS_PER_PASSAGE = 200_000, 100


def texts(n: int, words: int, seed: int) -> list[str]:
    """n texts of ``words`` Zipf-distributed words ``w<rank>``."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.1, size=(n, words)), VOCAB)  # (n, words)
    vocab = np.array([f"w{i}" for i in range(VOCAB + 1)])
    return [" ".join(row) for row in vocab[ranks]]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(stage: str, n: str, path: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rag_lightning.retrieval.bm25 import BM25Index

    out: dict[str, float] = {}
    if stage == "build":
        corpus = texts(int(n), WORDS_PER_PASSAGE, 0)
        t0 = time.perf_counter()
        BM25Index.build(corpus).save(path)
        out["seconds"] = time.perf_counter() - t0
        out["mb"] = sum(f.stat().st_size for f in Path(path).iterdir()) / 2**20
    else:
        queries = texts(200, 6, 1)
        t0 = time.perf_counter()
        index = BM25Index.load(path)
        out["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(queries), 20):
            index.search(queries[i : i + 20], 100)
        out["search_ms"] = 1000 * (time.perf_counter() - t0) / len(queries)
    out["peak_mb"] = _peak_mb()
    print(json.dumps(out))


def _run(stage: str, n: int, path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, str(n), path]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
    print(TABLE.header(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.n:
            path = os.path.join(tmp, f"bm25-{n}")
            b = _run("build", n, path)
            s = _run("search", n, path)
            rows.append({"n": n, **b, **{f"search_{k}": v for k, v in s.items()}})
            print(TABLE.row(n, b["seconds"], n / b["seconds"], b["peak_mb"], b["mb"], s["load"], s["search_ms"],
                            s["peak_mb"]), flush=True)  # fmt: skip
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes")
    p.add_argument("--tmp", default=None, help="where the indexes are written (default: the system temp dir)")


BENCH = Bench("bm25", "BM25 index build time, size, memory-mapped load and search", __doc__, add_args, run)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
    else:
        BENCH.main()
