"""Resident memory of a converted corpus as it grows: `python benchmarks/benchmark.py corpus`.

For each size N, a synthetic DPR-style `psgs_w100.tsv` (100-word passages) is converted to Arrow in a fresh
process, then loaded in another fresh process that reads every row's token ids in random order; each
process reports its peak RSS. A corpus held as Python lists grows linearly with N; the memory-mapped Arrow
corpus should stay roughly flat (the OS page cache, which is not resident to the process, holds the file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from _bench import Bench, Col, Table  # benchmarks/ is sys.path[0] when run as a script

TABLE = Table(Col("passages", 10), Col("tsv MB", 9, "{:.1f}"), Col("convert s", 11, "{:.1f}"),
              Col("psg/s", 8, "{:.0f}"), Col("convert peak MB", 17, "{:.0f}"), Col("read-all peak MB", 18, "{:.0f}"),
              Col("anon MB", 9, "{:.0f}"), Col("file MB", 9, "{:.0f}"),
              Col("anon vs smallest", 18, "{:.2f}x"))  # fmt: skip
WORDS = [
    "the",
    "of",
    "and",
    "in",
    "to",
    "a",
    "was",
    "is",
    "for",
    "on",
    "as",
    "by",
    "with",
    "he",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
]


def write_tsv(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i in range(n):
            text = " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(100))
            f.write(f"{i + 1}\t{text}\tTitle {i % 997}\n")


def _child(stage: str, tsv: str, cache: str) -> None:
    from rag_lightning.data.corpus import Corpus
    from rag_lightning.data.datamodule import load_tokenizer
    from rag_lightning.resolvers import minilm_dir

    tok = load_tokenizer(minilm_dir())
    t0 = time.perf_counter()
    kw = dict(cache_dir=cache, gen_tokenizer=tok, doc_tokenizer=tok, max_passage_tokens=128)
    if stage == "convert":
        Corpus.prepare(tsv, "tsv", **kw)
    else:
        corpus = Corpus.from_file(tsv, "tsv", **kw)
        order = list(range(len(corpus)))
        random.Random(0).shuffle(order)
        for i in range(0, len(order), 512):
            corpus.gen_tokens(order[i : i + 512])
            corpus.doc_tokens(order[i : i + 512])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_mb, **_rss_split()}))


def _rss_split() -> dict[str, float]:
    """Resident memory now, split into anonymous (the process's own heap: Python objects, tensors) and
    file-backed (pages of memory-mapped files, reclaimable page cache) in MB (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    except OSError:
        return {}
    return {k.lower(): int(v.split()[0]) / 1024 for k, v in kv.items()}


def _run(stage: str, tsv: str, cache: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", stage, tsv, cache], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            tsv = os.path.join(tmp, f"psgs_{n}.tsv")
            write_tsv(tsv, n)
            conv = _run("convert", tsv, os.path.join(tmp, "cache"))
            read = _run("read", tsv, os.path.join(tmp, "cache"))
            rows.append({"n": n, "tsv_mb": os.path.getsize(tsv) / 2**20, "convert": conv, "read": read})
    base = rows[0]["read"].get("rssanon", rows[0]["read"]["peak_rss_mb"])
    print(f"\n== corpus memory: synthetic 100-word passages, MiniLM tokenizer, {len(rows)} sizes ==\n")
    print(TABLE.header())
    for r in rows:
        c, d = r["convert"], r["read"]
        anon = d.get("rssanon", d["peak_rss_mb"])
        print(TABLE.row(r["n"], r["tsv_mb"], c["seconds"], r["n"] / c["seconds"], c["peak_rss_mb"], d["peak_rss_mb"],
                        d.get("rssanon", 0), d.get("rssfile", 0), anon / base))  # fmt: skip
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000])


BENCH = Bench("corpus", "resident memory of a memory-mapped corpus as it grows", __doc__, add_args, run)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
    else:
        BENCH.main()
