"""RagModule: wires retriever, generator and the marginal likelihood into a LightningModule.

No math lives here: the loss is `models.marginalize`, decoding `models.decode`, metrics `metrics`.
One training step (B questions, K passages each):
    doc_scores, ids = retriever(question)                  # (B, K) with grad, (B, K) passage ids
    src = template(question, passage[ids])                 # (B*K, S) token ids, question first
    logits = generator(src, labels)                        # (B*K, T, V)
    loss = rag_{token|sequence}_nll(logits, doc_scores, labels).mean()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from rag_lightning import metrics
from rag_lightning.models.causal import CausalGenerator
from rag_lightning.models.decode import rag_sequence_generate, rag_token_generate
from rag_lightning.models.generator import Generator
from rag_lightning.models.marginalize import rag_sequence_nll, rag_token_nll
from rag_lightning.models.retriever import Retriever

log = logging.getLogger(__name__)
LOSSES = {"token": rag_token_nll, "sequence": rag_sequence_nll}


class RagModule(L.LightningModule):
    def __init__(
        self,
        retriever: Retriever,
        generator: Generator | CausalGenerator | Callable[..., Generator | CausalGenerator],
        variant: str = "token",
        label_smoothing: float = 0.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        retriever_lr: float | None = None,
        retriever_start_step: int = 0,
        decoding: dict[str, Any] | None = None,
        eval_ks: tuple[int, ...] = (1, 5, 20),
        n_samples: int = 16,
    ):
        super().__init__()
        # plain containers in hparams, so checkpoints load with torch.load(weights_only=True)
        decoding = _plain(decoding or {})
        eval_ks = tuple(int(k) for k in eval_ks)
        if variant not in LOSSES:
            raise ValueError(f"model.variant must be one of {sorted(LOSSES)}, got {variant!r}")
        # modules and optimizer factories stay out of the checkpoint's hparams (the Hydra config records them)
        self.save_hyperparameters(logger=False, ignore=["retriever", "generator", "optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.retriever = retriever
        # a factory (Hydra `_partial_: true`) defers building the generator to configure_model, where under
        # FSDP ranks > 0 build it on the meta device and receive only their shards of rank 0's weights
        self.generator_factory = None if isinstance(generator, torch.nn.Module) else generator
        self.generator = generator if self.generator_factory is None else None
        self.corpus = None  # set in setup() from the datamodule, or by hand
        self.decoding = {"num_beams": 1, "max_length": 20, "mode": "fast", **decoding}
        names = ["loss", "em", "f1"] + [f"recall@{k}" for k in eval_ks]
        self.eval_metrics = torch.nn.ModuleDict(
            {f"{s}_{n.replace('@', '_')}": MeanMetric() for s in ("val", "test") for n in names}
        )  # pooled over every question of every val / test set
        # per set: (stage, set name, metric) -> MeanMetric, made when a set is first seen (a plain dict: set
        # names need not be valid module names, and the running means stay out of the state_dict)
        self.set_metrics: dict[tuple[str, str, str], MeanMetric] = {}
        self.samples: list[dict[str, Any]] = []  # a few predictions of the last evaluation (W&B table)
        self.train()  # HF from_pretrained returns eval-mode models; Lightning keeps the mode it is given

    # ---------------------------------------------------------------- index lifecycle
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.corpus is None and dm is not None:
            self.corpus = dm.corpus

    def ensure_index(self) -> None:
        if self.retriever.index is None:
            self.rebuild_index()

    def rebuild_index(self, progress: bool = True) -> dict[str, float]:
        """Re-embed the corpus with the current document encoder and swap the new index in."""
        if self.corpus is None:
            raise RuntimeError("RagModule has no corpus: fit/validate with a QADataModule or set .corpus")
        stats: dict[str, float] = {}
        t0 = time.perf_counter()
        old = self.retriever.index
        index = self.retriever.build_index(self.corpus, progress=progress, stats=stats)
        index.version = (old.version + 1) if old is not None else 0
        self.retriever.index = index  # swap only once the new index is complete
        stats["seconds"] = time.perf_counter() - t0
        log.info("index v%d: %d passages in %.1fs", index.version, index.ntotal, stats["seconds"])
        return stats

    def on_fit_start(self) -> None:
        self.ensure_index()

    def on_validation_start(self) -> None:
        self.ensure_index()

    def on_test_start(self) -> None:
        self.ensure_index()

    def on_predict_start(self) -> None:
        self.ensure_index()

    # ---------------------------------------------------------------- model construction / sharding
    def configure_model(self) -> None:
        """Build a deferred generator; under FSDP2 (`strategies.FSDP2Strategy`) shard its decoder layers and
        make the query encoder one FSDP unit. Idempotent (Lightning calls it for fit, validate and test)."""
        from rag_lightning.models.sharding import is_sharded, load_full_state, shard_generator

        mesh = self.device_mesh["data_parallel"] if self._device_mesh is not None else None
        lazy = self.generator is None
        if lazy:
            meta = mesh is not None and mesh.get_rank() != 0
            self.generator = self.generator_factory(empty_init=True) if meta else self.generator_factory()
        if mesh is None or is_sharded(self.generator):
            return
        full = self.generator.state_dict() if lazy and mesh.get_rank() == 0 else {}
        shard_generator(self.generator, mesh)
        if lazy:  # rank 0 holds the weights, the others built on meta: broadcast each shard
            load_full_state(self.generator, full, self.device)
            del full
        if any(p.requires_grad for p in self.retriever.query_encoder.parameters()):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.retriever.query_encoder, mesh=mesh)  # gradients averaged over the ranks

    # ---------------------------------------------------------------- checkpoints
    def frozen_keys(self) -> set[str]:
        """state_dict keys of frozen parameters (LoRA base generator, frozen document encoder). They are rebuilt
        from `name_or_path` when the module is constructed, so checkpoints leave them out: a 7B base is not
        copied into every checkpoint, and a checkpoint is loaded into a module built from the same config."""
        return {_clean(n) for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Trainable parameters and buffers only (see `frozen_keys`)."""
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        frozen = self.frozen_keys()
        for key in [k for k in out if k.startswith(prefix) and _clean(k[len(prefix) :]) in frozen]:
            del out[key]
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint without its frozen weights. `strict` still means strict: every saved key must be
        consumed, and every key the module has must be saved unless it is frozen (then it keeps its
        pretrained value). Checkpoints that do hold the frozen weights load as well."""
        if strict:
            own = {_clean(k) for k in super().state_dict()}
            saved = {_clean(k) for k in state_dict}
            unexpected = sorted(saved - own)
            missing = sorted(own - saved - self.frozen_keys())
            if unexpected or missing:
                raise RuntimeError(
                    f"checkpoint does not fit the module: unexpected keys {unexpected[:10]}"
                    f"{' ...' if len(unexpected) > 10 else ''}, missing trainable keys {missing[:10]}"
                    f"{' ...' if len(missing) > 10 else ''}"
                )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---------------------------------------------------------------- forward
    def retrieve(self, batch: dict[str, Any], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.retriever(batch["q_input_ids"], batch["q_attention_mask"], k, corpus=self.corpus)

    def sources(self, batch: dict[str, Any], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) passage ids -> generator inputs (B*K, S) on this device."""
        passages = self.corpus.gen_tokens(ids.flatten().tolist())
        src, mask = self.generator.build_sources(batch["g_question"], passages, ids.shape[1])
        return src.to(self.device), mask.to(self.device)

    def nll(self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-question NLL (B,), summed over target tokens, marginalized over the K passages."""
        k = ids.shape[1]
        src, mask = self.sources(batch, ids)
        labels = batch["labels"]  # (B, T)
        logits = self.generator(src, mask, labels.repeat_interleave(k, 0))  # (B*K, T, V)
        loss_fn = LOSSES[self.hparams.variant]
        return loss_fn(logits, doc_scores, labels, epsilon=self.hparams.label_smoothing)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        doc_scores, ids = self.retrieve(batch, self.retriever.n_docs)
        loss = self.nll(batch, doc_scores, ids).mean()
        bs = len(batch["questions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        p = doc_scores.detach().float().softmax(-1)  # (B, K)
        self.log("train/p_top1", p[:, 0].mean(), batch_size=bs)
        return loss

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def generate(self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor) -> list[str]:
        from rag_lightning.models.sharding import is_sharded

        if not is_sharded(self.generator):
            return self._generate(batch, doc_scores, ids)
        self.generator.unshard()  # FSDP root unit (embeddings, output layer): decoding calls past forward()
        try:
            return self._generate(batch, doc_scores, ids)
        finally:
            self.generator.reshard()

    def _generate(self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor) -> list[str]:
        src, mask = self.sources(batch, ids)
        g, d = self.generator, self.decoding
        model = g if g.kind == "causal" else g.model  # decoder-only: the generator runs its own prompt steps
        kw = dict(
            num_beams=d["num_beams"],
            max_length=d["max_length"],
            decoder_start_token_id=g.decoder_start_token_id,
            eos_token_id=g.eos_token_id,
            pad_token_id=g.pad_token_id,
        )
        if self.hparams.variant == "token":
            out = rag_token_generate(model, src, mask, doc_scores, **kw)
        else:
            out = rag_sequence_generate(model, src, mask, doc_scores, mode=d["mode"], **kw)
        return g.decode(out)

    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Loss, greedy/beam answers, EM/F1 and recall@k for one batch (all per question)."""
        kmax = min(max(self.retriever.n_docs, *self.hparams.eval_ks), len(self.corpus))
        doc_scores, ids = self.retrieve(batch, kmax)  # (B, kmax) sorted by score
        k = min(self.retriever.n_docs, kmax)
        nll = self.nll(batch, doc_scores[:, :k], ids[:, :k])  # (B,)
        preds = self.generate(batch, doc_scores[:, :k], ids[:, :k])
        regex = bool(batch.get("regex", False))
        answers = batch["answers"]
        texts = [self.corpus.texts(row) for row in ids.tolist()]
        out: dict[str, Any] = {
            "loss": nll,
            "em": torch.tensor([metrics.exact_match(p, a, regex=regex) for p, a in zip(preds, answers)]),
            "f1": torch.tensor([metrics.f1(p, a, regex=regex) for p, a in zip(preds, answers)]),
        }
        first_hit = torch.tensor([_first_hit(t, a, regex) for t, a in zip(texts, answers)])  # (B,)
        for kk in self.hparams.eval_ks:
            out[f"recall@{kk}"] = (first_hit < kk).float()
        out["predictions"], out["ids"], out["doc_scores"] = preds, ids, doc_scores
        return out

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.evaluate(batch)
        names = batch.get("set_names") or [""] * len(batch["questions"])
        for name, values in out.items():
            key = f"{stage}_{name.replace('@', '_')}"
            if key not in self.eval_metrics:
                continue
            values = values.detach().float().to(self.device)  # (B,), logged at epoch end
            self.eval_metrics[key].update(values)
            for set_name in dict.fromkeys(names):
                rows = torch.tensor([i for i, n in enumerate(names) if n == set_name], device=self.device)
                self._set_metric(stage, set_name, name).update(values[rows])
        if len(self.samples) < self.hparams.n_samples:
            titles = [self.corpus.titles(row[:3]) for row in out["ids"].tolist()]
            for q, a, p, t in zip(batch["questions"], batch["answers"], out["predictions"], titles):
                self.samples.append({"question": q, "answers": a, "prediction": p, "top_titles": t})

    def _set_metric(self, stage: str, set_name: str, name: str) -> MeanMetric:
        key = (stage, set_name, name)
        if key not in self.set_metrics:
            self.set_metrics[key] = MeanMetric().to(self.device)
        return self.set_metrics[key]

    def _log_eval_metrics(self, stage: str) -> None:
        """``{stage}/{metric}`` pooled over every question of every val / test set (what checkpoint monitors
        and sweeps read), and with several sets also ``{stage}/{set name}/{metric}`` for each set."""
        for key, metric in self.eval_metrics.items():
            prefix, name = key.split("_", 1)
            if prefix == stage and metric.update_count:
                self.log(
                    f"{stage}/{name.replace('recall_', 'recall@')}", metric.compute(), prog_bar=name == "em"
                )
                metric.reset()
        per_set = sorted(k for k in self.set_metrics if k[0] == stage)  # same order on every rank
        several = len({set_name for _, set_name, _ in per_set}) > 1
        for key in per_set:
            metric = self.set_metrics[key]
            if several and metric.update_count:
                self.log(f"{stage}/{key[1]}/{key[2]}", metric.compute())
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def on_validation_epoch_start(self) -> None:
        self.samples = []

    def on_test_epoch_start(self) -> None:
        self.samples = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, batch_idx)

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        out = self.evaluate(batch)
        rows = []
        for i, q in enumerate(batch["questions"]):
            ids = out["ids"][i].tolist()
            rows.append(
                {
                    "question": q,
                    "answers": batch["answers"][i],
                    "prediction": out["predictions"][i],
                    "passage_ids": self.corpus.ext_ids(ids),
                    "titles": self.corpus.titles(ids),
                    "scores": [round(s, 4) for s in out["doc_scores"][i].tolist()],
                    **{k: float(out[k][i]) for k in out if k in ("em", "f1") or k.startswith("recall@")},
                }
            )
        return rows

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("RagModule needs an optimizer (config group `optimizer`)")
        ret = [p for p in self.retriever.parameters() if p.requires_grad]
        gen = [p for p in self.generator.parameters() if p.requires_grad]
        groups = [{"params": gen, "name": "generator"}]
        if ret:
            group = {"params": ret, "name": "retriever"}
            if self.hparams.retriever_lr is not None:
                group["lr"] = self.hparams.retriever_lr
            if self.hparams.retriever_start_step:
                if self.scheduler_factory is None:
                    raise ValueError(
                        "model.retriever_start_step needs a scheduler (config group `scheduler`)"
                    )
                group["start_step"] = int(
                    self.hparams.retriever_start_step
                )  # read by schedules.linear_warmup
            groups.append(group)
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": opt}
        total = int(self.trainer.estimated_stepping_batches)
        sched = self.scheduler_factory(opt, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def _first_hit(texts: list[str], answers: list[str], regex: bool) -> float:
    """Rank of the first passage that has a gold answer by DPR's ``has_answer``; inf if none (so recall@k = 0
    for every k, also for k beyond the retrieved list, e.g. eval_ks 100 on a smaller corpus)."""
    return metrics.first_hit(texts, answers, regex=regex)


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(key: str) -> str:
    """A state_dict / parameter name without the segments FSDP, activation checkpointing and compile add."""
    for w in _WRAPPERS:
        key = key.replace(w, "")
    return key


def _plain(x: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else dict(x)
