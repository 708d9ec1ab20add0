"""`python benchmarks/benchmark.py scale`: prepare + 2-process sharded training on a synthetic DPR layout, at N and 4N.

Writes ``wikipedia_split/psgs_w100.tsv`` (N passages of 100 words) and ``retriever/qas/nq-{train,dev,test}.csv``
under a scratch dir, prepares it with ``rag-build-index`` in 2 processes (RANK / WORLD_SIZE), then runs
``train.py +experiment=nq retriever=tiny model=tiny trainer=ddp_sim`` (gloo, sharded index) for a few steps, and
prints: conversion and embedding passages/s (from build_index.py's log), per-rank peak RSS (``ru_maxrss`` of each
process), index load time and retrieval time per training step (query encoder + sharded search, timed by the
``ScaleProbe`` callback added to the run). Per-rank index memory is N x d x bytes / world; the table shows what
grows with N. The tiny models keep training cheap, so what is measured is the data and index path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench import Bench, Col, Table  # benchmarks/ is sys.path[0] when run as a script
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(5000)]
TABLE = Table(Col("N", 9), Col("convert psg/s", 15, "{:.0f}"), Col("embed psg/s (r0,r1)", 21),
              Col("prep RSS MB (r0,r1)", 21), Col("train RSS MB (r0,r1)", 22), Col("load s", 8, "{:.2f}"),
              Col("retrieve ms/step", 18, "{:.1f}"))  # fmt: skip


def write_dpr_layout(root: str | os.PathLike, n: int, n_questions: int = 64, seed: int = 0) -> Path:
    """DPR's download layout with ``n`` synthetic passages (100 words each) and QA files whose answers are
    words of some passages."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "wikipedia_split").mkdir(parents=True, exist_ok=True)
    (root / "retriever" / "qas").mkdir(parents=True, exist_ok=True)
    words = np.array(WORDS)
    with open(root / "wikipedia_split" / "psgs_w100.tsv", "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for s in range(0, n, 10_000):
            m = min(n, s + 10_000) - s
            body = words[rng.integers(0, len(words), (m, 100))]
            titles = words[rng.integers(0, len(words), m)]
            f.writelines(f"{s + i + 1}\t{' '.join(body[i])}\t{titles[i]}\n" for i in range(m))
    for split in ("train", "dev", "test"):
        with open(root / "retriever" / "qas" / f"nq-{split}.csv", "w", encoding="utf-8") as f:
            for _ in range(n_questions):
                q = " ".join(words[rng.integers(0, len(words), 8)])
                f.write(f"what is {q}?\t['{words[rng.integers(0, len(words))]}']\n")
    return root


class ScaleProbe(Callback):
    """Times ``pl_module.retrieve`` per training step; prints ``BENCH {rank, rss_mb, retrieve_s}`` at fit end."""

    def on_fit_start(self, trainer, pl_module) -> None:
        real, self.times = pl_module.retrieve, []

        def timed(batch, k):
            t0 = time.perf_counter()
            out = real(batch, k)
            self.times.append(time.perf_counter() - t0)
            return out

        pl_module.retrieve = timed

    def on_fit_end(self, trainer, pl_module) -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        steady = self.times[1:] or self.times  # the first step includes warm-up
        rec = {"rank": trainer.global_rank, "rss_mb": rss, "retrieve_s": float(np.mean(steady))}
        print("BENCH " + json.dumps(rec), flush=True)


def _run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return proc


def _common(data: Path, work: Path) -> list[str]:
    return [
        "+experiment=nq", "retriever=tiny", "model=tiny", f"paths.data_dir={data}", f"paths.cache_dir={work}/cache",
        f"paths.log_dir={work}/logs", f"paths.root_dir={ROOT}", "data.num_workers=0", "data.corpus_num_proc=2",
    ]  # fmt: skip


def prepare_2proc(data: Path, work: Path, n: int) -> dict:
    """Two build_index.py processes (RANK 0/1 of 2); returns timings parsed from their logs."""
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs, t0 = [], time.perf_counter()
    for r in (0, 1):
        cmd = [sys.executable, "-m", "rag_lightning.commands.build_index", *_common(data, work),
               f"hydra.run.dir={work}/prep{r}", f"chunk_size={max(1000, n // 8)}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=work, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"build_index.py failed:\n{err[-3000:]}")
    stats: dict = {"prepare_s": time.perf_counter() - t0, "rss_mb": [], "embed_psg_s": []}
    for r, (o, e) in enumerate(outs):
        m = re.search(r"corpus ready in ([0-9.]+)s \((\d+) passages\); embedded (\d+) passages in ([0-9.]+)s "
                      r"\(([0-9]+) passages/s\); peak RSS (\d+) MB", o + e)  # fmt: skip
        if m is None:
            raise RuntimeError(f"no timing line in build_index.py's log:\n{(o + e)[-2000:]}")
        if r == 0:  # local rank 0 converts; rank 1 waits for it
            stats["convert_psg_s"] = int(m[2]) / float(m[1])
        stats["embed_psg_s"].append(int(m[5]))
        stats["rss_mb"].append(int(m[6]))
    return stats


def train_2proc(data: Path, work: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *_common(data, work), "trainer=ddp_sim",
           f"trainer.max_steps={steps}", "trainer.val_check_interval=1000", "trainer.limit_val_batches=0",
           "validate_before_fit=false", "test=false", "data.batch_size=4", "callbacks.rich_progress_bar=null",
           "callbacks.model_summary=null", "logger=csv", f"hydra.run.dir={work}/train", "optimized_metric=null",
           "+callbacks.scale_probe._target_=bench_scale.ScaleProbe"]  # fmt: skip
    proc = _run(cmd, env, work)
    logs = proc.stdout + proc.stderr
    if "index: loaded" not in logs:
        raise RuntimeError(f"train.py did not load the prepared index:\n{logs[-3000:]}")
    out: dict = {}
    for m in re.findall(r"BENCH (\{.*\})", logs):
        rec = json.loads(m)
        for k, v in rec.items():
            out.setdefault(k, []).append(v)
    out["load_s"] = [float(x) for x in re.findall(r"index: loaded .* in ([0-9.]+)s", logs)]
    return out


def scale_main(args: argparse.Namespace) -> None:
    rows = []
    for n in (args.n, 4 * args.n):
        with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
            work = Path(tmp)
            data = write_dpr_layout(work / "data", n)
            prep = prepare_2proc(data, work, n)
            tr = train_2proc(data, work, args.steps)
            rows.append((n, prep, tr))
            print(f"N={n}: prepare {json.dumps(prep)}\n        train {json.dumps(tr)}", flush=True)
    print("\n" + TABLE.header())
    for n, prep, tr in rows:
        print(TABLE.row(n, prep["convert_psg_s"], prep["embed_psg_s"], prep["rss_mb"], sorted(tr.get("rss_mb", [])),
                        max(tr["load_s"] or [0]), 1000 * np.mean(tr.get("retrieve_s") or [0])))  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1_000_000, help="passages at the first size (then 4x)")
    p.add_argument("--steps", type=int, default=5, help="training steps per run")


BENCH = Bench(
    "scale",
    "prepare + 2-process sharded train on a synthetic DPR corpus, N and 4N",
    __doc__,
    add_args,
    scale_main,
)

if __name__ == "__main__":
    BENCH.main()
