#!/usr/bin/env python
"""Retrieval alone (no generator): recall@k, gold-passage recall@k, entropy of p(z|x) and distinct top-1.

    python scripts/eval_retrieval.py [+experiment=squad_open paths.data_dir=...] [retriever.similarity=cosine]
        [+ckpt_path=<run>/checkpoints/last.ckpt] [+eval_ks=[1,5,20]]

Composes the training config (conf/train.yaml, same overrides as train.py), builds the data module and the
retriever only, embeds the corpus and searches every val and test question. With ``+ckpt_path`` the
retriever's weights (``retriever.*`` of a RagModule checkpoint) are loaded first. The metrics are the
task's (``rag_lightning.tasks``), as validation logs them: QA ``recall@k`` (a gold answer occurs in one of
the top-k passages); every task ``gold_recall@k`` and ``rprec`` by passage id over the examples with gold
passages; ``gold@k``: one of an example's gold passages is among the top-k, over all examples. Prints one
JSON line per set.
"""

from __future__ import annotations

import json

import hydra
import torch
from omegaconf import DictConfig

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...})
from rag_lightning.models.objectives import entropy
from rag_lightning.tasks.base import _rows_of, build_task


@torch.no_grad()
def eval_set(retriever, corpus, loader, ks: list[int], n_docs: int, task=None) -> dict[str, float]:
    """The task's retrieval metrics (QA: answer-string ``recall@k``; every task: ``gold_recall@k`` and
    ``rprec`` over the examples with gold passages), ``gold@k`` over all examples, entropy, distinct top-1."""
    task = build_task(task)
    kmax = min(max(ks), len(corpus))
    sums: dict[str, float] = {f"gold@{k}": 0.0 for k in ks}
    counts: dict[str, int] = {}
    ent, top1, n = 0.0, set(), 0
    for batch in loader:
        scores, ids = retriever(
            batch["q_input_ids"], batch["q_attention_mask"], kmax, corpus=corpus
        )  # (B, kmax)
        ent += entropy(scores[:, :n_docs]).sum().item()
        top1.update(ids[:, 0].tolist())
        for name, values in task.retrieval_metrics(
            corpus, batch, ids, ks
        ).items():  # (B,) each, NaN: undefined
            ok = ~values.isnan()
            sums[name] = sums.get(name, 0.0) + values[ok].sum().item()
            counts[name] = counts.get(name, 0) + int(ok.sum())
        for k in ks:  # gold passage in the top k, over every example (0 without gold ids)
            sums[f"gold@{k}"] += (~batch_gold_miss(corpus, ids, batch["gold_ids"], k)).sum().item()
        n += len(batch["questions"])
    out = {k: v / counts.get(k, n) for k, v in sums.items() if counts.get(k, n)}
    return {**out, "p_entropy": ent / n, "top1_distinct": len(top1), "n": n}


def batch_gold_miss(corpus, ids: torch.Tensor, gold_ids: list[list[str]], k: int) -> torch.Tensor:
    """(B,) True where none of an example's gold passages is among its first k retrieved."""
    rows = [_rows_of(corpus, gold) for gold in gold_ids]
    return torch.tensor([not (set(r[:k]) & g) for r, g in zip(ids.tolist(), rows)])


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.get("seed") or 0)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("validate")
    retriever = hydra.utils.instantiate(cfg.retriever)
    if cfg.get("ckpt_path"):
        state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        sub = {k[len("retriever.") :]: v for k, v in state.items() if k.startswith("retriever.")}
        retriever.load_state_dict(sub, strict=False)
    retriever.eval()
    retriever.ensure_index(dm.corpus, progress=False)
    ks = [int(k) for k in cfg.get("eval_ks", [1, 5, 20])]
    for name, items in [*dm.val_sets, *dm.test_sets]:
        res = eval_set(retriever, dm.corpus, dm._loader(items, train=False), ks, retriever.n_docs, dm.task)
        print(json.dumps({"set": name, "similarity": retriever.similarity, **res}), flush=True)


if __name__ == "__main__":
    main()
