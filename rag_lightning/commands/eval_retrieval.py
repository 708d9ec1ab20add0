"""``rag-eval-retrieval``: retrieval alone (no generator): recall@k, gold-passage recall@k, entropy of p(z|x)
and distinct top-1.

    rag-eval-retrieval [+experiment=squad_open paths.data_dir=...] [retriever.similarity=cosine]
        [retriever.mode=dense|bm25|hybrid] [modes=[dense,bm25,hybrid,hybrid-weighted]]
        [ckpt_path=<run>/checkpoints/last.ckpt] [eval_ks=[1,5,20]]

Config: conf/eval_retrieval.yaml (train.yaml plus its keys: the same overrides as rag-train). Builds the data
module and the retriever only, embeds the corpus (or loads the prepared index whose stamp matches) and searches
every val and test question. With ``ckpt_path`` the run's config next to the checkpoint is reused (your
overrides on top, ``rag_lightning.commands.run_config``) and the retriever's weights (``retriever.*`` of the
RagModule checkpoint) are loaded first. The metrics are the task's (``rag_lightning.tasks``), as validation
logs them: QA ``recall@k`` (a gold answer occurs in one of the top-k passages); every task ``gold_recall@k``
and ``rprec`` by passage id over the examples with gold passages; ``gold@k``: one of an example's gold
passages is among the top-k, over all examples. Prints one JSON line per set (and mode) and writes them all to
``results.json`` in ``logs/eval_retrieval/runs/<date_time>``. ``modes`` evaluates several candidate modes in
one process, over one dense index (embedded once).
"""

from __future__ import annotations

import json
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rag_lightning.checkpoint_io import CheckpointError, verify_checkpoint
from rag_lightning.commands.common import fail, hydra_app, write_results
from rag_lightning.commands.run_config import apply_run_config
from rag_lightning.models.objectives import entropy
from rag_lightning.models.retriever import MODES
from rag_lightning.preflight import ConfigError, preflight
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
            batch["q_input_ids"], batch["q_attention_mask"], kmax, corpus=corpus, questions=batch["questions"]
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


def load_retriever(cfg: DictConfig) -> Any:
    """The configured retriever, with ``retriever.*`` of the checkpoint ``cfg.ckpt_path`` when there is one."""
    retriever = hydra.utils.instantiate(cfg.retriever)
    if cfg.get("ckpt_path"):
        verify_checkpoint(cfg.ckpt_path)  # flipped bytes, truncated or empty: CheckpointError naming the file
        state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        sub = {k[len("retriever.") :]: v for k, v in state.items() if k.startswith("retriever.")}
        missing, unexpected = retriever.load_state_dict(sub, strict=False)  # frozen towers are not saved
        trainable = {n for n, p in retriever.named_parameters() if p.requires_grad}
        if bad := [*unexpected, *(k for k in missing if k in trainable)]:
            raise ConfigError(
                f"{cfg.ckpt_path} does not fit the configured retriever ({len(bad)} keys, e.g. {bad[0]}): pass "
                f"the retriever overrides it was trained with (or keep its run's .hydra/config.yaml next to it)"
            )
    return retriever.eval()


def eval_retrieval(cfg: DictConfig, overrides: list[str]) -> list[dict[str, Any]]:
    """One record per (mode, set): the set, the mode, the similarity and :func:`eval_set`'s metrics."""
    cfg = apply_run_config(cfg, overrides)
    preflight(cfg, trainer=False)
    torch.manual_seed(cfg.get("seed") or 0)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("validate")
    retriever = load_retriever(cfg)
    ks = [int(k) for k in cfg.eval_ks]
    modes = [str(m) for m in cfg.get("modes") or [retriever.retrieval_mode]]
    for mode in modes:
        if mode.partition("-")[0] not in MODES:
            raise ConfigError(
                f"modes: unknown mode {mode!r}; expected {MODES} or hybrid-rrf / hybrid-weighted"
            )
    if any(m != "bm25" for m in modes):  # one dense index for every mode (BM25's candidates take its vectors)
        retriever.retrieval_mode, retriever.use_bm25 = "dense", False
        retriever.ensure_index(dm.corpus, progress=False)
    records = []
    for mode in modes:
        name_mode, _, fusion = mode.partition("-")  # "hybrid-weighted": hybrid with that fusion
        retriever.retrieval_mode, retriever.use_bm25 = name_mode, name_mode != "dense"
        if fusion:
            retriever.hybrid["fusion"] = fusion
        retriever.ensure_index(dm.corpus, progress=False)
        for name, items in [*dm.val_sets, *dm.test_sets]:
            res = eval_set(
                retriever, dm.corpus, dm._loader(items, train=False), ks, retriever.n_docs, dm.task
            )
            records.append({"set": name, "mode": mode, "similarity": retriever.similarity, **res})
            print(json.dumps(records[-1]), flush=True)
    return records


def run(cfg: DictConfig) -> None:
    from rag_lightning.data.textio import DataError

    hc = HydraConfig.get()
    try:
        records = eval_retrieval(cfg, list(hc.overrides.task))
    except (ConfigError, DataError, CheckpointError) as e:  # one line naming what is wrong
        fail(e)
    write_results(hc.runtime.output_dir, {"ckpt_path": cfg.get("ckpt_path"), "results": records})


def main() -> None:
    hydra_app("eval_retrieval", run)


if __name__ == "__main__":
    main()
