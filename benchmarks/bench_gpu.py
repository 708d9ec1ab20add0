#!/usr/bin/env python
"""Every GPU check in one command, on one CUDA GPU, in about 8 minutes, written to one JSON + Markdown report.

    python benchmarks/benchmark.py gpu [--out DIR] [--only STEP ...] [--budget 480] [--dry-run]

Run it from the repository root after ``pip install -e ".[dev,gpu]"`` (with a CUDA build of torch). Steps, each
in its own process group under its own time limit (and never past the total ``--budget``); a failure or a
timeout is recorded in the report and the next step runs:

  tests       ``pytest -m gpu tests``: every gpu-marked test
  index       1M x 768 synthetic vectors stored in fp16: faiss-gpu Flat and the torch CUDA index, built and
              searched (1,024 queries, k = 100, batches of 64), and their top-k compared
  embed       corpus embedding rate of a BERT-base-sized encoder (random weights from a config) in bf16,
              passages of 100-160 tokens (goal: >= 6,000 passages/s on an H100)
  train-step  the train-step table at BART-large size (d_model 1024, 12 + 12 layers) in bf16 against
              transformers' RagToken / RagSequenceForGeneration (bench_train.py)
  decode      batched RAG decoding vs a per-example loop on CUDA (bench_decode.py)
  e2e         tiny prepare-once (build_index.py) + train + resume + evaluate, ``trainer=gpu``

The report (``DIR/report.json``, ``DIR/report.md``; each step's log ``DIR/<step>.log``) is rewritten after
every step, so a run cut short still leaves what it measured. Without CUDA it says so and exits 0 at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _bench import Bench  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve())
PY = sys.executable
TINY = [
    "retriever=tiny", "model=tiny", "data.max_train_examples=8", "data.max_eval_examples=4",
    "data.batch_size=2", "data.eval_batch_size=4", "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null", "logger=csv",
]  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One check: ``argv(out)`` is its command line (run from the repository root), ``budget`` its seconds."""

    name: str
    budget: int
    what: str
    argv: Callable[[Path], list[str]]


def _inner(name: str) -> Callable[[Path], list[str]]:
    return lambda out: [PY, HERE, "--step", name, "--json", str(out / f"{name}.json")]


STEPS = [
    Step("tests", 70, "pytest -m gpu tests (every gpu-marked test)",
         lambda out: [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                      f"--junitxml={out / 'tests.xml'}", "tests"]),
    Step("index", 60, "faiss-gpu and torch CUDA index: 1M x 768 fp16, build + search", _inner("index")),
    Step("embed", 45, "corpus embedding rate, BERT-base-sized encoder, bf16", _inner("embed")),
    Step("e2e", 110, "tiny prepare-once + train + resume + evaluate, trainer=gpu", _inner("e2e")),
    Step("train-step", 140, "train step at BART-large size, bf16, vs transformers' RAG",
         lambda out: [PY, "benchmarks/bench_train.py", "--device", "cuda", "--precision", "bf16", "--d-model", "1024",
                      "--layers", "12", "--threads", "4", "--load", "0", "--json", str(out / "train-step.json")]),
    Step("decode", 55, "batched decoding vs per-example, CUDA",
         lambda out: [PY, "benchmarks/bench_decode.py", "--device", "cuda", "--repeats", "1"]),
]  # fmt: skip


# ----------------------------------------------------------------------------- the steps run in-process
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_index(a: argparse.Namespace) -> dict[str, Any]:
    """Both CUDA indexes over the same 1M x 768 fp16 vectors; queries are noisy copies of known rows."""
    import torch

    from rag_lightning.retrieval.index import DenseIndex, _faiss_gpu_available

    n, d, nq, k, qb, dev = a.n, 768, 1024, 100, 64, a.device
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, generator=g, dtype=torch.float16)
    src = torch.randint(0, n, (nq,), device=dev, generator=g)
    q = (x[src].float() + 0.5 * torch.randn(nq, d, device=dev, generator=g)).cpu()  # (Q, d)
    x = x.cpu()  # the build reads host chunks, as from an embeddings file
    out: dict[str, Any] = {"n": n, "d": d, "queries": nq, "k": k, "query_batch": qb}
    ids: dict[str, torch.Tensor] = {}
    for backend in ("torch", "faiss"):
        try:
            if backend == "faiss" and dev == "cuda" and not _faiss_gpu_available():
                raise RuntimeError("faiss has no GPU support here: pip install -e '.[gpu]' (faiss-gpu-cu12)")
            index = DenseIndex(backend=backend, device=dev, store_dtype="float16")
            t0 = time.perf_counter()
            index.build(x)
            _sync()
            build = time.perf_counter() - t0
            index.search(q[:qb], k)  # warm-up
            _sync()
            t0 = time.perf_counter()
            got = torch.cat([index.search(q[s : s + qb], k)[1] for s in range(0, nq, qb)])
            _sync()
            search = time.perf_counter() - t0
            ids[backend] = got
            hit = (got[:, :10] == src.cpu()[:, None]).any(1).float().mean().item()
            out[backend] = {"build_s": build, "search_ms_per_batch": 1000 * search / (nq // qb),
                            "queries_per_s": nq / search, "source_row_in_top10": hit}  # fmt: skip
        except Exception as err:  # noqa: BLE001 - recorded, the other backend still runs
            out[backend] = {"error": f"{type(err).__name__}: {err}"}
    if len(ids) == 2:
        a_, b_ = ids["torch"], ids["faiss"]
        out["topk_overlap_torch_vs_faiss"] = sum(
            len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a_, b_)
        ) / (nq * k)
    out["ok"] = all("error" not in out[b] for b in ("torch", "faiss"))
    return out


def step_embed(a: argparse.Namespace) -> dict[str, Any]:
    """embed_passages (length-sorted batches, bf16 autocast) with BERT-base's shape and random weights."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from rag_lightning.models.encoders import Encoder
    from rag_lightning.models.tiny import tiny_tokenizer
    from rag_lightning.retrieval import embed_passages

    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    enc = Encoder(BertModel(cfg), tiny_tokenizer(), pooling="cls").to(a.device).eval()
    rng = np.random.default_rng(0)
    lens = rng.integers(a.min_len, a.max_len + 1, a.passages)
    tokens = [[101, *rng.integers(1000, 30522, n - 2).tolist(), 102] for n in lens]
    embed_passages(enc, tokens[: 4 * a.batch_size], a.batch_size, progress=False, amp_dtype="bf16")  # warm-up
    _sync()
    stats: dict[str, Any] = {}
    emb = embed_passages(enc, tokens, a.batch_size, progress=False, amp_dtype="bf16", stats=stats)
    rate = a.passages / stats["seconds"]
    return {
        "passages": a.passages,
        "tokens_per_passage": [a.min_len, a.max_len],
        "batch_size": a.batch_size,
        "dtype": stats["dtype"],
        "seconds": stats["seconds"],
        "passages_per_s": rate,
        "goal_passages_per_s": 6000,
        "meets_goal": rate >= 6000,
        "finite": bool(torch.isfinite(emb).all()),
        "ok": bool(torch.isfinite(emb).all()),
    }


def _run(argv: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=max(1.0, timeout), env={**os.environ, "HYDRA_FULL_ERROR": "1"})  # fmt: skip
        f.write(proc.stdout)
    return proc


def step_e2e(a: argparse.Namespace) -> dict[str, Any]:
    """build_index.py once, train 2 steps (must load that index), resume to 4 steps, evaluate the result."""
    import torch

    tmp = Path(a.json).resolve().parent / "e2e"
    log = tmp / "e2e_commands.log"
    tmp.mkdir(parents=True, exist_ok=True)
    common = [
        *TINY,
        f"trainer={a.trainer}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.log_dir={tmp / 'logs'}",
    ]
    fit = ["validate_before_fit=false", "test=false", "trainer.val_check_interval=2"]
    end = time.monotonic() + a.limit
    out: dict[str, Any] = {"ok": False}

    def stage(name: str, argv: list[str]) -> str:
        t0 = time.monotonic()
        proc = _run([PY, *argv], end - time.monotonic(), log)
        out[name] = {"rc": proc.returncode, "seconds": time.monotonic() - t0}
        if proc.returncode:
            raise RuntimeError(f"{name} failed (rc {proc.returncode}): {proc.stdout[-1500:]}")
        return proc.stdout

    stage(
        "prepare", ["-m", "rag_lightning.commands.build_index", *common, f"hydra.run.dir={tmp / 'prepare'}"]
    )
    text = stage("train", ["train.py", *common, *fit, "trainer.max_steps=2", f"hydra.run.dir={tmp / 'run1'}"])
    out["train"]["index_loaded_from_prepare"] = "index: loaded" in text
    ckpt = tmp / "run1" / "checkpoints" / "last.ckpt"
    stage("resume", ["train.py", *common, *fit, "trainer.max_steps=4", f"ckpt_path={ckpt}",
                     f"hydra.run.dir={tmp / 'run2'}"])  # fmt: skip
    state = torch.load(tmp / "run2" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    out["resume"]["global_step"] = int(state["global_step"])
    stage("evaluate", ["-m", "rag_lightning.commands.evaluate", f"ckpt_path={tmp / 'run2' / 'checkpoints' / 'last.ckpt'}",
                       f"hydra.run.dir={tmp / 'eval'}"])  # fmt: skip
    out["evaluate"]["metrics"] = json.loads((tmp / "eval" / "results.json").read_text())
    out["ok"] = out["train"]["index_loaded_from_prepare"] and out["resume"]["global_step"] == 4
    return out


INNER = {"index": step_index, "embed": step_embed, "e2e": step_e2e}


# ----------------------------------------------------------------------------- the driver
def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def run_step(step: Step, out: Path, deadline: float) -> dict[str, Any]:
    """Run one step in a new process group, killed with all its children at its limit."""
    left = deadline - time.monotonic()
    if left < 10:
        return {"status": "skipped", "reason": "the total budget is spent"}
    limit = min(step.budget, left)
    log = out / f"{step.name}.log"
    argv = step.argv(out)
    if argv[1] == HERE:
        argv += ["--limit", str(max(1, int(limit) - 5))]
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
        try:
            rc: int | None = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc = None
        except BaseException:  # Ctrl-C: the step's processes go too
            _kill_group(p)
            raise
    rec: dict[str, Any] = {
        "status": "timeout" if rc is None else ("ok" if rc == 0 else "failed"),
        "rc": rc,
        "seconds": round(time.monotonic() - t0, 1),
        "limit_s": int(limit),
        "command": " ".join(argv),
        "log": str(log),
    }
    res = out / f"{step.name}.json"
    if res.exists():
        with contextlib.suppress(ValueError):
            rec["result"] = json.loads(res.read_text())
    if step.name == "tests":
        rec["result"] = _junit(out / "tests.xml")
    if rec["status"] == "ok" and isinstance(rec.get("result"), dict) and rec["result"].get("ok") is False:
        rec["status"] = "failed"
    if rec["status"] != "ok" or step.name == "decode":
        rec["tail"] = _tail(log)
    return rec


def _junit(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["ok"] = counts["failures"] == counts["errors"] == 0
    return counts


def summary(name: str, rec: dict[str, Any]) -> str:
    """One line of the figures a step measured."""
    r = rec.get("result") or {}
    try:
        if name == "tests" and r:
            return (
                f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
            )
        if name == "index":
            parts = []
            for b in ("faiss", "torch"):
                m = r.get(b, {})
                parts.append(f"{b}: {m['error']}" if "error" in m else
                             f"{b}: build {m['build_s']:.1f} s, {m['search_ms_per_batch']:.2f} ms / 64 queries "
                             f"(k=100), {m['queries_per_s']:.0f} q/s")  # fmt: skip
            if "topk_overlap_torch_vs_faiss" in r:
                parts.append(f"top-100 overlap {100 * r['topk_overlap_torch_vs_faiss']:.1f} %")
            return "; ".join(parts)
        if name == "embed":
            goal = "meets" if r["meets_goal"] else "below"
            return f"{r['passages_per_s']:.0f} passages/s ({r['dtype']}, {goal} the 6,000 goal)"
        if name == "train-step":
            c = r["step"]["conditions"][0]
            return "; ".join(
                f"{v}: time {c[v]['time_ratio']:.2f}x, memory {c[v]['peak_memory_ratio']:.2f}x, "
                f"loss rel diff {c[v]['loss_rel_diff']:.1e}"
                for v in ("token", "sequence")
                if v in c
            )
        if name == "e2e":
            return (f"prepare {r['prepare']['seconds']:.0f} s, train {r['train']['seconds']:.0f} s (index loaded "
                    f"from prepare: {r['train']['index_loaded_from_prepare']}), resume to step "
                    f"{r['resume']['global_step']}, evaluate em {r['evaluate']['metrics'].get('em')}")  # fmt: skip
    except (KeyError, TypeError, IndexError):
        pass
    return ""


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}  # fmt: skip
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    info["commit"] = git.stdout.strip() or None
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception as err:  # noqa: BLE001
        info["faiss"] = f"not importable: {err}"
    return info


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# GPU check",
        "",
        f"`python benchmarks/benchmark.py gpu`, {env.get('date')}, commit {env.get('commit')}, {env.get('gpu')}, "
        f"torch {env.get('torch')} (CUDA {env.get('cuda')}), faiss {env.get('faiss')}",
        "",
        "| step | status | seconds | figures |",
        "|---|---|---|---|",
    ]
    for name, rec in report["steps"].items():
        secs = rec.get("seconds", "")
        lines.append(f"| {name} | {rec['status']} | {secs} | {summary(name, rec) or rec.get('reason', '')} |")
    for name, rec in report["steps"].items():
        if rec.get("tail"):
            lines += [
                "",
                f"## {name} ({rec['status']}): last lines of {rec['log']}",
                "",
                "```",
                rec["tail"],
                "```",
            ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def run(a: argparse.Namespace) -> int:
    steps = [s for s in STEPS if not a.only or s.name in a.only]
    if a.dry_run:
        out = Path(a.out)
        print(f"GPU check: {len(steps)} steps, total budget {a.budget} s, report in {out}/report.{{json,md}}")
        for s in steps:
            print(f"  {s.name:<11} {s.budget:>4} s  {s.what}\n{'':18}$ {' '.join(s.argv(out))}")
        return 0
    import torch

    if not torch.cuda.is_available():
        hint = ""
        if subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0:
            hint = (
                f" (nvidia-smi is present: torch {torch.__version__} may be a CPU build; install a CUDA one)"
            )
        print(f"GPU check: no CUDA device, nothing to run{hint}")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.budget
    report: dict[str, Any] = {"environment": environment(), "budget_s": a.budget, "steps": {}}
    for s in steps:
        print(
            f"[gpu] {s.name}: {s.what} (limit {min(s.budget, int(deadline - time.monotonic()))} s)",
            flush=True,
        )
        try:
            rec = run_step(s, out, deadline)
        except KeyboardInterrupt:
            report["steps"][s.name] = {"status": "interrupted"}
            write_report(out, report)
            raise
        report["steps"][s.name] = rec
        write_report(out, report)
        print(
            f"[gpu] {s.name}: {rec['status']} {rec.get('seconds', '')} s  {summary(s.name, rec)}", flush=True
        )
    bad = [n for n, r in report["steps"].items() if r["status"] != "ok"]
    print(f"[gpu] report: {out / 'report.md'}, {out / 'report.json'}; not ok: {', '.join(bad) or 'none'}")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gpu_report", help="report directory (report.json, report.md, logs)")
    p.add_argument("--budget", type=int, default=480, help="total seconds; no step starts past it")
    p.add_argument(
        "--only", nargs="+", choices=[s.name for s in STEPS], default=None, help="these steps only"
    )
    p.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing")


BENCH = Bench("gpu", "every GPU check in one command (JSON + Markdown report)", __doc__, add_args, run)


def main(argv: list[str] | None = None) -> int:
    p = BENCH.parser()
    p.add_argument("--step", choices=sorted(INNER), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=120.0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1_000_000, help=argparse.SUPPRESS)
    p.add_argument("--passages", type=int, default=40_000, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of the step code
    p.add_argument("--trainer", default="gpu", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--min-len", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int, default=160, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step is None:
        return run(a)
    sys.path.insert(0, str(ROOT))  # this checkout's rag_lightning
    result = INNER[a.step](a)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
