#!/usr/bin/env python
"""Where a training step's time goes: query encoder, search, passage assembly, generator, loss, backward.

    python benchmarks/benchmark.py profile-step [--setting demo|nq] [--steps 5]

Composes ``conf/train.yaml`` (``demo``: the demo as ``python train.py`` runs it, MiniLM towers, prefix-LM
MiniLM generator, K=3, batch 4; ``nq``: the NQ experiment's step shape, batch 8, K=5, source 128, target 25,
label smoothing 0.1, with a random BART generator of d_model 256, 2+2 layers, vocab 50,265 in place of
BART-large, which neither downloads nor fits a CPU step), builds the index over the demo corpus, then runs
``--steps`` training steps (after one warm-up) of the same code as ``RagModule.training_step``, timing each
stage with ``perf_counter`` (on CUDA after a synchronize). Backward is split by subtraction: the loss
kernel's backward is timed alone on a detached copy of the decoder states, the rest is encoders + generator.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from _bench import Bench, Col, Table  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
TABLE = Table(Col("stage", 42, left=True), Col("time", 12, "{:.1f} ms"), Col("share", 9, "{:.1f} %"))


def _nq_generator_dir(tmp: str) -> str:
    from transformers import BartConfig, BartForConditionalGeneration

    from rag_lightning.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = BartConfig(
        vocab_size=50265, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.cls_token_id,
        forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


def compose(setting: str, tmp: str, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rag_lightning import resolvers  # noqa: F401

    overrides = [f"paths.cache_dir={tmp}/cache", f"paths.output_dir={tmp}/out"]
    if setting == "nq":
        overrides += [
            f"model.generator.name_or_path={_nq_generator_dir(tmp + '/gen')}",
            "model.generator.kind=seq2seq",
            "model.generator.max_source_length=128",
            "model.label_smoothing=0.1",
            "retriever.n_docs=5",
            "data.batch_size=8",
            "data.max_target_length=25",
        ]
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides + extra, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the configs read ${hydra:...} paths
    return cfg


def run(a: argparse.Namespace) -> None:
    import hydra

    from rag_lightning.models.marginalize import answer_logprobs_fused, rag_loss

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(a.setting, tmp, a.overrides)
        dm = hydra.utils.instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        module = hydra.utils.instantiate(cfg.model).to(device)
        module.corpus = dm.corpus
        module.retriever.ensure_index(module.corpus, progress=False)
        module.train()
        ret, gen, hp = module.retriever, module.generator, module.hparams
        k = ret.n_docs
        times: dict[str, list[float]] = defaultdict(list)
        batches = iter(dm.train_dataloader())
        for step in range(a.steps + 1):
            t: dict[str, float] = {}
            t0 = time.perf_counter()
            batch = next(batches)
            batch = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in batch.items()}
            sync()
            t["batch (collate, to device)"] = time.perf_counter() - t0

            def lap(name: str, t0: float, t: dict[str, float] = t) -> float:
                sync()
                now = time.perf_counter()
                t[name] = now - t0
                return now

            t0 = time.perf_counter()
            q = ret.query_encoder(batch["q_input_ids"], batch["q_attention_mask"])  # (B, d)
            t0 = lap("query encoder", t0)
            _, ids, vecs = ret.index.search_with_vectors(q.detach(), k)  # (B, K)
            doc_scores = torch.einsum("bd,bkd->bk", q, vecs.to(device=q.device, dtype=q.dtype))
            t0 = lap("search (top-K + scores)", t0)
            src, mask = module.sources(batch, ids)  # (B*K, S)
            t0 = lap("passage assembly", t0)
            labels = batch["labels"]
            rep = labels.repeat_interleave(k, 0)
            head = gen.output_layer() if hp.fused_loss else None
            if head is None:
                raise SystemExit(
                    "profile-step splits generator / loss on the fused path (model.fused_loss=true)"
                )
            hidden = gen.hidden_states(src, mask, rep)  # (B*K, T, H)
            t0 = lap("generator forward", t0)
            kw = dict(smooth=hp.label_smoothing > 0, positions=batch["label_positions"])
            lp = answer_logprobs_fused(hidden, *head, labels, k, **kw)
            loss = rag_loss(lp, doc_scores, hp.variant, hp.label_smoothing).mean()
            t0 = lap("loss forward (output layer + marginal)", t0)
            loss.backward()
            total_bwd = lap("backward", t0) - t0
            h2 = hidden.detach().requires_grad_(True)  # the loss kernel's backward alone, same inputs
            loss2 = rag_loss(answer_logprobs_fused(h2, *head, labels, k, **kw), doc_scores.detach(), hp.variant,
                             hp.label_smoothing).mean()  # fmt: skip
            sync()
            t1 = time.perf_counter()
            loss2.backward()
            sync()
            t["loss backward"] = time.perf_counter() - t1
            t["encoders + generator backward"] = max(0.0, total_bwd - t["loss backward"])
            del t["backward"]
            module.zero_grad(set_to_none=True)
            if step:  # the first step warms up
                for name, v in t.items():
                    times[name].append(v)
    med = {n: statistics.median(v) for n, v in times.items()}
    total = sum(med.values())
    print(
        f"\n== profile-step {a.setting}: B={dm.batch_size} K={k} source <= {gen.max_source_length}, "
        f"{len(dm.corpus)} passages, device {device}, threads {torch.get_num_threads()}, "
        f"median of {a.steps} steps =="
    )
    print(TABLE.header())
    for name, v in med.items():
        print(TABLE.row(name, 1000 * v, 100 * v / total))
    print(TABLE.row("total", 1000 * total))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", default="demo", choices=["demo", "nq"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")


BENCH = Bench("profile-step", "where a training step's time goes", __doc__, add_args, run)

if __name__ == "__main__":
    BENCH.main()
