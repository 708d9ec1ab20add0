#!/usr/bin/env python
"""Training-step benchmark: our RagModule step vs transformers' RagTokenForGeneration / RagSequenceForGeneration.

    python scripts/benchmark.py train-step [--loss-only | --mode both] [--threads 1 2] [--load 0 2] [--json PATH]
        [--device cpu|cuda] [--precision fp32|bf16] [--d-model 256] [--layers 2]
    python scripts/benchmark.py train-step --fid [--threads 2] [--load 0]   (our Fusion-in-Decoder step vs our
        RAG-Token step, same shape)

Conditions: every ``--threads`` count (intra-op threads of the measured processes) x every ``--load`` count
(busy competing processes, ``--load-kind spin``: a Python loop, or ``torch``: one-thread element-wise ops,
started before a condition's measurements and stopped after them, each bounded by ``--load-seconds`` and
by the life of the benchmark). The defaults (1 and 2 threads, idle and 2 loads, both variants) give the full
table; the JSON holds each condition's ratios and whether they meet the goals (CPU: loss alone <= 0.5x time
and <= 0.3x memory, training step <= 0.8x time and <= 0.6x memory).

One random BART-style generator (seeded: identical weights on both sides; vocab 50,265, d_model ``--d-model``,
``--layers`` + ``--layers`` layers), B questions x K passages of random token ids (source ``--source`` tokens,
all real), targets of ``--target`` positions (``--answer-len LO HI``: answer lengths drawn in [LO, HI], the
rest padding; default all T-1 positions, the worst case for us since padding is where the fused loss skips
work), random doc scores as a leaf with grad. Both sides get the same assembled inputs:

* ours: ``RagModule.token_logprobs(src, mask, labels)`` (fused output layer + log-probs unless
  ``--no-fused``) then ``rag_loss(...).mean()``; backward.
* theirs: ``RagTokenForGeneration`` / ``RagSequenceForGeneration`` (built around the same generator object,
  a tiny question encoder that is never run) called with ``context_input_ids``, ``context_attention_mask``,
  ``doc_scores`` and ``labels`` = [start, answer] (its ``get_nll`` shifts them left); ``loss.mean()``; backward.

Both score the same positions (transformers' last target position is always padding after its shift, ours is
masked), so the losses agree to float32 rounding. Time: median of ``--repeats`` forward + backward passes after
one warm-up, in each of ``--rounds`` fresh processes per side and condition (alternating ours / theirs; the
fastest process is kept, since other work on a shared machine only ever adds time). Memory, each measurement
in a fresh process: CPU = peak RSS over the RSS once model and inputs exist (``/proc/self/clear_refs`` resets the peak), GPU = ``torch.cuda.max_memory_allocated`` over the same
baseline. Label smoothing is off: transformers smooths differently (sum over V scaled by eps / V).
``--loss-only`` times the loss alone on random logits (B*K, T, V) against ``get_nll``.
``--fid``: both sides ours on the same generator and inputs, the RAG-Token reader (K decoder passes over
(B*K, T), marginal) against Fusion-in-Decoder (``readers/fid.py``: the same B*K encoder rows, one decoder pass
over (B, T) reading the K*S concatenated states, no marginal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch
from _bench import Bench, Col, Load, Table  # scripts/ is sys.path[0] when run as a script

VOCAB = 50265
START, EOS, PAD = 101, 102, 0  # the tiny WordPiece tokenizer's [CLS] / [SEP] / [PAD]
TABLE = Table(Col("", 10, left=True), Col("ours s", 9, "{:.3f}"), Col("theirs s", 10, "{:.3f}"),
              Col("time", 8, "{:.2f}x"), Col("ours MB", 10, "{:.0f}"), Col("theirs MB", 11, "{:.0f}"),
              Col("memory", 8, "{:.2f}x"), Col("loss rel diff", 15, "{:.1e}"))  # fmt: skip


# ----------------------------------------------------------------------------- inputs and models
def make_inputs(a: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, k, t = a.batch, a.docs, a.target
    lo, hi = a.answer_len or (t - 1, t - 1)
    if not 1 <= lo <= hi <= t - 1:
        raise ValueError(f"--answer-len must satisfy 1 <= LO <= HI <= target-1 = {t - 1}")
    n = torch.randint(lo, hi + 1, (b,), generator=g)  # answer lengths (B,)
    y = torch.randint(1000, 30000, (b, t), generator=g)  # answer tokens, never a special id
    keep = torch.arange(t) < n[:, None]
    labels = y.masked_fill(~keep, -100)  # ours (B, T): y_1..y_n, padding
    hf = torch.full((b, t), PAD)  # theirs: decoder input = labels = [start, y_1..y_n, pad...]
    hf[:, 0] = START
    hf[:, 1:] = y[:, : t - 1].masked_fill(~keep[:, : t - 1], PAD)
    src = torch.randint(1000, 30000, (b * k, a.source), generator=g)
    src[:, 0], src[:, -1] = START, EOS
    return {
        "src": src.to(device),
        "mask": torch.ones_like(src).to(device),
        "labels": labels.to(device),
        "positions": (labels != -100).flatten().nonzero().squeeze(1).to(device),
        "hf_labels": hf.to(device),
        "doc_scores": torch.randn(b, k, generator=g).to(device),
        "logits": None,
    }


def make_generator(a: argparse.Namespace):
    from transformers import BartConfig, BartForConditionalGeneration

    from rag_lightning.models.tiny import tiny_tokenizer
    from rag_lightning.readers.seq2seq import Generator

    d = a.d_model
    cfg = BartConfig(
        vocab_size=VOCAB, d_model=d, encoder_layers=a.layers, decoder_layers=a.layers,
        encoder_attention_heads=max(1, d // 64), decoder_attention_heads=max(1, d // 64),
        encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, max_position_embeddings=max(1024, a.source + 2),
        pad_token_id=PAD, bos_token_id=START, eos_token_id=EOS, decoder_start_token_id=START,
        forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        init_std=0.1,  # wider than BART's 0.02: logits spread over several nats, passages disagree
    )  # fmt: skip
    torch.manual_seed(0)
    model = BartForConditionalGeneration(cfg)
    torch.nn.init.normal_(model.final_logits_bias, std=0.1)  # so a missing bias would show in the losses
    return Generator(model, tiny_tokenizer(), max_source_length=a.source)


def make_theirs(variant: str, generator_model):
    from transformers import BertConfig, BertModel, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

    qcfg = BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    )
    cfg = RagConfig.from_question_encoder_generator_configs(qcfg, generator_model.config, n_docs=5)
    cfg.reduce_loss, cfg.label_smoothing = False, 0.0
    cls = RagTokenForGeneration if variant == "token" else RagSequenceForGeneration
    return cls(config=cfg, question_encoder=BertModel(qcfg), generator=generator_model)


# ----------------------------------------------------------------------------- one measurement (worker)
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One (side, variant) measurement in this process: times, peak extra memory, loss."""
    from rag_lightning.models.marginalize import rag_loss, rag_sequence_nll, rag_token_nll

    device = torch.device(a.device)
    torch.manual_seed(0)
    x = make_inputs(a, device)
    k = a.docs
    scores = x["doc_scores"].requires_grad_(True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    if a.loss_only:
        g = torch.Generator().manual_seed(1)
        logits = (torch.randn(a.batch * k, a.target, VOCAB, generator=g) * 2).to(device).requires_grad_(True)
        if a.side == "ours":
            fn = rag_token_nll if a.variant == "token" else rag_sequence_nll

            def step():
                return fn(logits, scores, x["labels"]).mean()
        else:
            from transformers.models.rag import modeling_rag as hf

            cls = hf.RagTokenForGeneration if a.variant == "token" else hf.RagSequenceForGeneration
            ns = SimpleNamespace(config=SimpleNamespace(n_docs=k, bos_token_id=None))
            ns.config.generator = SimpleNamespace(pad_token_id=PAD, bos_token_id=START)
            ns.marginalize = lambda *args, **kw: hf.RagTokenForGeneration.marginalize(ns, *args, **kw)

            def step():
                return cls.get_nll(ns, logits, scores, x["hf_labels"], n_docs=k).mean()

        params = [logits, scores]
    else:
        from rag_lightning.module import RagModule

        gen = make_generator(a).to(device)
        if a.variant == "fid":
            from rag_lightning.readers.fid import FidGenerator

            gen = FidGenerator(gen.model, gen.tokenizer, max_source_length=a.source)
            module = RagModule(None, gen, variant="fid", fused_loss=not a.no_fused).to(device)

            def step():
                with amp:
                    lp = module.token_logprobs(x["src"], x["mask"], x["labels"], x["positions"])  # (B, 1, T)
                    return module.marginal_nll(lp, scores).mean()
        elif a.side == "ours":
            module = RagModule(None, gen, variant=a.variant, fused_loss=not a.no_fused).to(device)

            def step():
                with amp:
                    lp = module.token_logprobs(x["src"], x["mask"], x["labels"], x["positions"])
                    return rag_loss(lp, scores, a.variant).mean()
        else:
            rag = make_theirs(a.variant, gen.model).to(device)
            rag.train()

            def step():
                with amp:
                    out = rag(
                        context_input_ids=x["src"], context_attention_mask=x["mask"], doc_scores=scores,
                        labels=x["hf_labels"], n_docs=k, use_cache=False,
                    )  # fmt: skip
                    return out.loss.float().mean()

        gen.train()
        params = [scores, *gen.parameters()]
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = _rss_kb("VmRSS:") * 1024
    times, loss = [], None
    for _ in range(a.repeats + 1):
        for p in params:
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kb("VmHWM:") * 1024
    return {"seconds": statistics.median(times[1:]), "peak_bytes": peak - base, "loss": float(loss)}


# ----------------------------------------------------------------------------- driver
GOALS = {"loss": {"time": 0.5, "memory": 0.3}, "step": {"time": 0.8, "memory": 0.6}}  # ratio ceilings, CPU
CTABLE = Table(Col("threads", 8), Col("load", 6), Col("  variant", 11, left=True), *TABLE.cols[1:],
               Col("goal", 6))  # fmt: skip


def _measure(a: argparse.Namespace, side: str, variant: str, threads: int) -> dict[str, Any]:
    """One worker process (fresh: its own peak memory) with ``threads`` intra-op threads."""
    args = [sys.executable, os.path.abspath(__file__), "--worker", side, "--variant", variant, *a.passthrough]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's rag_lightning first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([*args, "--threads", str(threads)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{side} {variant} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Fresh-process measurements per side -> ratios ours / theirs (fastest process, least memory)."""
    ours, theirs = (min(runs[side], key=lambda m: m["seconds"]) for side in ("ours", "theirs"))
    for side, m in (("ours", ours), ("theirs", theirs)):
        m["peak_bytes"] = min(x["peak_bytes"] for x in runs[side])
    return {
        "time_ratio": ours["seconds"] / theirs["seconds"],
        "peak_memory_ratio": ours["peak_bytes"] / max(theirs["peak_bytes"], 1),
        "loss_rel_diff": abs(ours["loss"] - theirs["loss"]) / max(abs(theirs["loss"]), 1e-12),
        "ours": ours,
        "theirs": theirs,
    }


def meets(r: dict[str, Any], goal: dict[str, float]) -> bool:
    return r["time_ratio"] <= goal["time"] and r["peak_memory_ratio"] <= goal["memory"]


def host() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, versions, commit, load average."""
    import platform

    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git.stdout.strip() or None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_1min": os.getloadavg()[0],
    }


def run_mode(a: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Every (threads, load) condition x variant of one mode (``loss`` or ``step``); load outside the measured
    processes is started before a condition's measurements and stopped after them."""
    a.loss_only = mode == "loss"
    a.passthrough = _passthrough(a)
    what = "loss alone (B*K, T, V) logits" if a.loss_only else "training step (generator + loss)"
    print(
        f"\n== train-step benchmark, {what}: BART d={a.d_model} {a.layers}+{a.layers} layers, vocab {VOCAB}, "
        f"B={a.batch} K={a.docs} source {a.source} target {a.target}, {a.precision}, device {a.device}; "
        f"load: {a.load_kind} processes =="
    )
    mem = "peak extra GPU memory" if a.device == "cuda" else "peak extra RSS"
    print(f"{CTABLE.header()}   ({mem})", flush=True)
    goal = GOALS[mode]
    conditions = []
    for n in a.load:
        for t in a.threads:
            cond: dict[str, Any] = {"threads": t, "load": n, "loadavg_1min": None}
            with Load(n, seconds=a.load_seconds, kind=a.load_kind):
                for variant in a.variants:
                    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
                    for r in range(a.rounds):  # alternate the order: other load hits both sides alike
                        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                            runs[side].append(_measure(a, side, variant, t))
                    res = cond[variant] = compare(runs)
                    res["meets_goal"] = meets(res, goal)
                    mb = (res["ours"]["peak_bytes"] / 2**20, res["theirs"]["peak_bytes"] / 2**20)
                    print(CTABLE.row(t, n, "  " + variant, res["ours"]["seconds"], res["theirs"]["seconds"],
                                     res["time_ratio"], *mb, res["peak_memory_ratio"], res["loss_rel_diff"],
                                     "yes" if res["meets_goal"] else "NO"), flush=True)  # fmt: skip
                cond["loadavg_1min"] = os.getloadavg()[0]
            conditions.append(cond)
    settings = {k: getattr(a, k) for k in (*_SHARED, "rounds", "load_kind")} | {
        "answer_len": a.answer_len or [a.target - 1, a.target - 1],
        "vocab": VOCAB,
        "fused": not a.no_fused,
        "loss_only": a.loss_only,
    }
    ok = all(c[v]["meets_goal"] for c in conditions for v in a.variants)
    print(
        f"goals ({mode}: time <= {goal['time']}x, memory <= {goal['memory']}x): {'met' if ok else 'NOT met'}"
    )
    return {"settings": settings, "goal": goal, "meets_goals": ok, "conditions": conditions}


FID_TABLE = Table(Col("threads", 8), Col("load", 6), Col("token s", 9, "{:.3f}"), Col("fid s", 9, "{:.3f}"),
                  Col("time", 8, "{:.2f}x"), Col("token MB", 10, "{:.0f}"), Col("fid MB", 9, "{:.0f}"),
                  Col("memory", 8, "{:.2f}x"))  # fmt: skip


def run_fid(a: argparse.Namespace) -> dict[str, Any]:
    """Ours RAG-Token vs ours Fusion-in-Decoder, same generator, inputs and process scheme, per condition."""
    a.loss_only = False
    a.passthrough = _passthrough(a)
    mem = "peak extra GPU memory" if a.device == "cuda" else "peak extra RSS"
    print(f"{FID_TABLE.header()}   ({mem}; fid / token)", flush=True)
    conditions = []
    for n in a.load:
        for t in a.threads:
            with Load(n, seconds=a.load_seconds, kind=a.load_kind):
                runs: dict[str, list[dict[str, Any]]] = {"token": [], "fid": []}
                for r in range(a.rounds):
                    for variant in ("token", "fid") if r % 2 == 0 else ("fid", "token"):
                        runs[variant].append(_measure(a, "ours", variant, t))
            tok, fid = (min(runs[v], key=lambda m: m["seconds"]) for v in ("token", "fid"))
            for v, m in (("token", tok), ("fid", fid)):
                m["peak_bytes"] = min(x["peak_bytes"] for x in runs[v])
            r = {"threads": t, "load": n, "time_ratio": fid["seconds"] / tok["seconds"],
                 "peak_memory_ratio": fid["peak_bytes"] / max(tok["peak_bytes"], 1), "token": tok, "fid": fid}  # fmt: skip
            print(FID_TABLE.row(t, n, tok["seconds"], fid["seconds"], r["time_ratio"], tok["peak_bytes"] / 2**20,
                                fid["peak_bytes"] / 2**20, r["peak_memory_ratio"]), flush=True)  # fmt: skip
            conditions.append(r)
    return {"settings": {k: getattr(a, k) for k in (*_SHARED, "rounds")}, "conditions": conditions}


def run(a: argparse.Namespace) -> dict[str, Any]:
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.fid:
        result: dict[str, Any] = {"host": host(), "fid_vs_token": run_fid(a)}
        if a.json:
            _write_json(result, a.json)
        return result
    modes = {"step": ["step"], "loss": ["loss"], "both": ["step", "loss"]}[
        a.mode or ("loss" if a.loss_only else "step")
    ]
    result: dict[str, Any] = {"host": host()} | {m: run_mode(a, m) for m in modes}
    if a.json:
        _write_json(result, a.json)
    return result


def _write_json(result: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


_SHARED = ("device", "precision", "d_model", "layers", "batch", "docs", "source", "target", "repeats")


def _passthrough(a: argparse.Namespace) -> list[str]:
    out = []
    for k in _SHARED:
        out += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.answer_len:
        out += ["--answer-len", *map(str, a.answer_len)]
    return out + ["--no-fused"] * a.no_fused + ["--loss-only"] * a.loss_only


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write every condition's ratios here")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, both sides")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--docs", type=int, default=5)
    p.add_argument("--source", type=int, default=128)
    p.add_argument("--target", type=int, default=25)
    p.add_argument("--answer-len", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--repeats", type=int, default=2, help="timed steps per process (after one warm-up)")
    p.add_argument(
        "--rounds", type=int, default=1, help="fresh processes per side and condition; fastest kept"
    )
    p.add_argument("--variants", nargs="+", default=["token", "sequence"], choices=["token", "sequence"])
    p.add_argument("--no-fused", action="store_true", help="ours from the logits (model.fused_loss=false)")
    p.add_argument("--loss-only", action="store_true", help="the loss alone on random logits vs get_nll")
    p.add_argument("--fid", action="store_true", help="ours: Fusion-in-Decoder vs RAG-Token, same shape")
    p.add_argument("--mode", default=None, choices=["step", "loss", "both"],
                   help="step (default), loss (= --loss-only) or both into one JSON")  # fmt: skip
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads, each measured")
    p.add_argument("--load", type=int, nargs="+", default=[0, 2],
                   help="busy competing processes during the measurements, each count measured")  # fmt: skip
    p.add_argument("--load-kind", default="spin", choices=["spin", "torch"],
                   help="spin: a Python busy loop; torch: one-thread element-wise ops over 32 MiB")  # fmt: skip
    p.add_argument("--load-seconds", type=float, default=900.0, help="a load process stops itself after this")


BENCH = Bench(
    "train-step", "RagModule training step vs transformers' RAG (time, memory, loss)", __doc__, add_args, run
)


def main(argv: list[str] | None = None) -> None:
    """The benchmark's command line, plus the hidden ``--worker`` one measurement that ``run`` starts."""
    p = BENCH.parser()
    p.add_argument("--worker", choices=["ours", "theirs"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="token", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        torch.set_num_threads(a.threads[0])
        a.side = a.worker
        print(json.dumps(worker(a)))
    else:
        run(a)


if __name__ == "__main__":
    main()
