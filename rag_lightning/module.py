"""RagModule: wires retriever, reader (the generator) and the losses into a LightningModule.

No math lives here: the losses are `models.marginalize` and `models.objectives`, reading and decoding the
reader's (`readers/`), metrics `metrics`. One training step (B questions, K passages each):
    doc_scores, ids = retriever(question)                  # (B, K) with grad, (B, K) passage ids
    src = reader.assemble_sources(question, passage[ids])  # marginal readers: (B*K, S); one prompt: (B, S)
    lp = reader.score(src, labels)                         # tok_lp (B, K', T): K' = K per-passage rows, 1 for
                                                           #   fusion readers; fused output layer + log-probs
    loss = rag_loss(lp, *reader.marginal_inputs(doc_scores, variant))   # the marginal (K' = 1: plain NLL)
           + sum_name w_name * objective_name(seq_lp | attention | loop pass, doc_scores)
The marginal's gradient reaches the retriever only with `marginal` in `retriever_loss` (the RAG paper's setup).
A fusion reader trains the retriever with `adist` (its attention on each passage, same pass) or with pdist /
emdr2 / lsr on per-passage likelihoods from one extra no-grad pass over single-passage inputs (`loop_logprobs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from rag_lightning.models.marginalize import AnswerLogProbs, rag_loss
from rag_lightning.models.objectives import (
    OBJECTIVE_INPUTS,
    OBJECTIVES,
    contrastive_loss,
    entropy,
    scale_grad,
)
from rag_lightning.models.retriever import Retriever
from rag_lightning.models.token_logprob import FUSED_CACHE_MB, fused_cache_budget
from rag_lightning.readers import FUSION, VARIANTS, Reader
from rag_lightning.readers.base import Read
from rag_lightning.retrieval.bm25 import hard_negatives
from rag_lightning.retrieval.embed import pad_batch
from rag_lightning.tasks.base import Task, build_task

log = logging.getLogger(__name__)
GENERATOR_LOSSES = (*VARIANTS, "none")
RETRIEVER_LOSSES = ("marginal", *OBJECTIVES, "contrastive")


class RagModule(L.LightningModule):
    def __init__(
        self,
        retriever: Retriever,
        generator: Reader | Callable[..., Reader],
        variant: str = "token",
        label_smoothing: float = 0.0,
        generator_loss: str | None = None,
        retriever_loss: str | dict[str, float] | None = None,
        objective_args: dict[str, dict[str, Any]] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        retriever_lr: float | None = None,
        retriever_start_step: int = 0,
        decoding: dict[str, Any] | None = None,
        eval_ks: tuple[int, ...] = (1, 5, 20),
        n_samples: int = 16,
        fused_loss: bool = True,
        fused_loss_cache_mb: float = FUSED_CACHE_MB,
        task: Task | str | dict | None = None,
    ):
        """variant: the reader (`readers.READERS`): token | sequence, the marginal used for decoding and (by
        default) the generator loss; fid | concat, a fusion reader (all passages read at once, no marginal).
        generator_loss: the variant's loss or none (a frozen generator); null = `variant`.
        retriever_loss: what trains the retriever, a name (`marginal | emdr2 | pdist | lsr | adist |
        contrastive`) or weights `{emdr2: 1.0, contrastive: 0.1}`; null = marginal for the marginal readers,
        adist for fusion readers. `marginal` sends the generator loss's gradient into the retrieval scores (the
        RAG paper), the others are `models.objectives` on the same generator pass (fusion readers: adist on
        its attention, the likelihood objectives on one extra no-grad pass, see `loop_logprobs`).
        objective_args: keyword arguments per objective, e.g. `{pdist: {temperature: 0.1}}`.
        fused_loss_cache_mb: the fused loss keeps up to this many MiB of logits for backward (one output-layer
        matmul fewer), recomputing the rest; 0 recomputes them all (the least memory).
        task: what evaluation predicts and scores (`rag_lightning.tasks`, config group `task`; default QA)."""
        super().__init__()
        # plain containers in hparams, so checkpoints load with torch.load(weights_only=True)
        decoding = _plain(decoding or {})
        eval_ks = tuple(int(k) for k in eval_ks)
        if fused_loss_cache_mb < 0:
            raise ValueError(f"model.fused_loss_cache_mb must be >= 0, got {fused_loss_cache_mb}")
        if variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {VARIANTS}, got {variant!r}")
        generator_loss = variant if generator_loss is None else generator_loss
        if generator_loss not in GENERATOR_LOSSES:
            raise ValueError(
                f"model.generator_loss must be one of {GENERATOR_LOSSES}, got {generator_loss!r}"
            )
        if retriever_loss is None:
            retriever_loss = "adist" if variant in FUSION else "marginal"
        retriever_loss = _retriever_weights(retriever_loss)
        _check_fusion(variant, retriever_loss)
        objective_args = _plain(objective_args or {})
        for name in objective_args:
            if name not in RETRIEVER_LOSSES or name == "marginal":
                raise ValueError(f"model.objective_args: unknown objective {name!r}")
        # modules and optimizer factories stay out of the checkpoint's hparams (the Hydra config records them)
        self.save_hyperparameters(
            logger=False, ignore=["retriever", "generator", "optimizer", "scheduler", "task"]
        )
        self.task = build_task(task)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.retriever = retriever
        contrastive = dict(objective_args.get("contrastive", {}))  # a copy: the hparams keep the key
        self.bm25_negatives = int(contrastive.pop("bm25_negatives", 0) or 0)
        objective_args = {
            **objective_args,
            **({"contrastive": contrastive} if "contrastive" in objective_args else {}),
        }
        if self.bm25_negatives:
            retriever.use_bm25 = True  # DPR's hard negatives come from BM25
        # a factory (Hydra `_partial_: true`) defers building the generator to configure_model, where under
        # FSDP ranks > 0 build it on the meta device and receive only their shards of rank 0's weights
        self.generator_factory = None if isinstance(generator, torch.nn.Module) else generator
        self.generator = generator if self.generator_factory is None else None
        self.generator_loss, self.retriever_weights, self.objective_args = (
            generator_loss,
            retriever_loss,
            objective_args,
        )
        if self.generator is not None:
            self._prepare_generator()
        self.corpus = None  # set in setup() from the datamodule, or by hand
        self.decoding = _decoding(decoding)
        names = self.task.metric_names(eval_ks)  # per-example metrics, declared by the task
        self.eval_metrics = torch.nn.ModuleDict(
            {f"{s}_{n.replace('@', '_')}": MeanMetric() for s in ("val", "test") for n in names}
        )  # pooled over every question of every val / test set
        # per set: (stage, set name, metric) -> MeanMetric, made when a set is first seen (a plain dict: set
        # names need not be valid module names, and the running means stay out of the state_dict)
        self.set_metrics: dict[tuple[str, str, str], MeanMetric] = {}
        self.samples: list[dict[str, Any]] = []  # a few predictions of the last evaluation (W&B table)
        self.outputs: list[tuple[str, str, list[str]]] = []  # (set, prediction, targets): corpus-level tasks
        self.top1: dict[str, set[int]] = {}  # per eval set: the distinct top-1 passages (collapse guard)
        self.train()  # HF from_pretrained returns eval-mode models; Lightning keeps the mode it is given

    def train(self, mode: bool = True) -> RagModule:
        super().train(mode)
        if self.generator_loss == "none" and self.generator is not None:
            self.generator.eval()  # frozen: no dropout, so the target distribution is the model's own
        return self

    def needs(self, what: str) -> bool:
        """Whether a configured retriever objective reads the reader's `likelihood` or `attention`."""
        return any(OBJECTIVE_INPUTS.get(name) == what for name in self.retriever_weights)

    def _prepare_generator(self) -> None:
        variant, g = self.hparams.variant, self.generator
        if variant not in type(g).variants:
            raise ValueError(
                f"model.variant={variant} needs another reader than {type(g).__name__} {type(g).variants}: "
                f"build the generator with readers.from_pretrained(..., variant={variant})"
            )
        if self.needs("attention"):
            g.use_eager_attention()  # attention probabilities (adist) come from the eager implementation
        if self.generator_loss == "none":
            self.generator.requires_grad_(False)  # frozen (REPLUG LSR): scores the answer, never trains
            self.generator.eval()

    # ---------------------------------------------------------------- index lifecycle (the retriever's)
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.corpus is None and dm is not None:
            self.corpus = dm.corpus

    def _ensure_index(self, match_weights: bool = False) -> None:
        if self.corpus is None:
            raise RuntimeError("RagModule has no corpus: fit/validate with a QADataModule or set .corpus")
        self.retriever.ensure_index(
            self.corpus, progress=self.trainer.is_global_zero, match_weights=match_weights
        )

    def on_fit_start(self) -> None:
        self._ensure_index()

    def on_validation_start(self) -> None:
        self._ensure_index()

    def on_test_start(self) -> None:  # e.g. the best checkpoint's weights: an index made with them
        self._ensure_index(match_weights=True)

    def on_predict_start(self) -> None:
        self._ensure_index(match_weights=True)

    # ---------------------------------------------------------------- model construction / sharding
    def configure_model(self) -> None:
        """Build a deferred generator; under FSDP2 (`strategies.FSDP2Strategy`) shard its decoder layers and
        make each trainable retriever tower one FSDP unit. Idempotent (Lightning calls it for fit, validate
        and test)."""
        from rag_lightning.models.sharding import (
            is_sharded,
            load_full_state,
            shard_generator,
            shard_retriever,
        )

        mesh = self.device_mesh["data_parallel"] if self._device_mesh is not None else None
        lazy = self.generator is None
        if lazy:
            meta = mesh is not None and mesh.get_rank() != 0
            self.generator = self.generator_factory(empty_init=True) if meta else self.generator_factory()
            self._prepare_generator()
        if mesh is None or is_sharded(self.generator):
            return
        full = self.generator.state_dict() if lazy and mesh.get_rank() == 0 else {}
        shard_generator(self.generator, mesh)
        if lazy:  # rank 0 holds the weights, the others built on meta: broadcast each shard
            load_full_state(self.generator, full, self.device)
            del full
        shard_retriever(self.retriever, mesh)  # trainable towers: gradients averaged over the ranks

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
        return self.retriever(
            batch["q_input_ids"], batch["q_attention_mask"], k, self.corpus, questions=batch.get("questions")
        )

    def sources(
        self, batch: dict[str, Any], ids: torch.Tensor, single: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(B, K) passage ids -> the reader's inputs on this device (src, mask[, segments]), assembled with
        tensor ops; ``single``: a fusion reader's single-passage inputs (the loop pass)."""
        g = self.generator
        passages, p_len = self.corpus.gen_token_rows(ids.detach().flatten())  # (B*K, L), (B*K,) on the CPU
        q, q_mask = pad_batch(batch["g_question"], g.pad_token_id)  # (B, Lq)
        assemble = g.single_sources if single else g.assemble_sources
        out = assemble(q, q_mask.sum(1), passages, p_len, ids.shape[1])
        return tuple(t.to(self.device, non_blocking=True) for t in out)

    def token_logprobs(self, *args: Any, **kwargs: Any) -> AnswerLogProbs:
        """Answer log-probs (B, K', T) for the reader's inputs and labels (B, T): ``read(...).lp``."""
        return self.read(*args, **kwargs).lp

    def read(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor | None = None,
        smooth: bool | None = None,
        segments: torch.Tensor | None = None,
        attention: bool = False,
    ) -> Read:
        """The reader's ``score``: with ``model.fused_loss`` and a reader that exposes its output layer, the
        final states go straight into the fused output-layer + log-prob kernel and the (rows, T, V) logits
        never exist. ``positions``: ``batch["label_positions"]`` (non-padding targets, from the collator).
        ``smooth``: also the label-smoothing statistics (default: when ``label_smoothing > 0``)."""
        if smooth is None:
            smooth = self.hparams.label_smoothing > 0
        with fused_cache_budget(self.hparams.fused_loss_cache_mb):
            return self.generator.score(
                src, mask, labels, fused=self.hparams.fused_loss, smooth=smooth, positions=positions,
                segments=segments, attention=attention,
            )  # fmt: skip

    def answer_logprobs(
        self, batch: dict[str, Any], ids: torch.Tensor, smooth: bool | None = None, attention: bool = False
    ) -> AnswerLogProbs | Read:
        """The reader's answer log-likelihoods given the retrieved passages, differentiable: ``.tok_lp``
        (B, K', T) = log p(y_t | x, z_k, y_<t) (0 at padding; K' = 1 for a fusion reader), ``.seq_lp`` (B, K')
        their sum, ``.smooth_lp`` (label smoothing). Retriever objectives (EMDR2, perplexity distillation, LSR)
        use a marginal reader's ``seq_lp`` from the same pass as the loss. A frozen generator
        (``generator_loss=none``) runs without gradient. ``attention``: the whole ``Read``, with the passage
        attention (B, K) of a fusion reader."""
        src, mask, *segments = self.sources(batch, ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.generator_loss != "none"):
            out = self.read(
                src,
                mask,
                batch["labels"],
                batch.get("label_positions"),
                smooth,
                *segments,
                attention=attention,
            )
        return out if attention else out.lp

    @torch.no_grad()
    def loop_logprobs(self, batch: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """A fusion reader's per-passage answer log-likelihoods (B, K), log p(y | x, z_k): one extra batched
        pass with single-passage inputs, no gradient (Atlas's "loop" mode), for pdist / emdr2 / lsr."""
        src, mask = self.sources(batch, ids, single=True)
        return self.generator.score_each(src, mask, batch["labels"], batch.get("label_positions")).seq_lp

    def marginal_nll(
        self,
        lp: AnswerLogProbs,
        doc_scores: torch.Tensor,
        variant: str | None = None,
        epsilon: float | None = None,
    ) -> torch.Tensor:
        """Per-question loss (B,), summed over target tokens, marginalized over the K passages, with label
        smoothing ``epsilon`` (default: ``label_smoothing``, the training loss)."""
        variant = variant or self.hparams.variant
        epsilon = self.hparams.label_smoothing if epsilon is None else epsilon
        doc_scores, variant = self.generator.marginal_inputs(doc_scores, variant)
        return rag_loss(lp, doc_scores, variant, epsilon=epsilon)

    def nll(self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The answer's plain NLL per question (B,): -log p(y|x) under the model's variant, no label
        smoothing (what ``val/loss`` and ``test/loss`` report, whatever the training loss smooths)."""
        return self.marginal_nll(self.answer_logprobs(batch, ids, smooth=False), doc_scores, epsilon=0.0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        doc_scores, ids, q, d = self.retriever(
            batch["q_input_ids"], batch["q_attention_mask"], self.retriever.n_docs, self.corpus, True,
            questions=batch.get("questions"),
        )  # fmt: skip
        out = self.answer_logprobs(batch, ids, attention=self.needs("attention"))
        lp, attn = (out.lp, out.attention) if isinstance(out, Read) else (out, None)
        loss, parts = self.training_loss(batch, lp, doc_scores, ids, q, d, attn)
        bs = len(batch["questions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=bs)
        p = doc_scores.detach().float().softmax(-1)  # (B, K)
        self.log("train/p_top1", p[:, 0].mean(), batch_size=bs)
        self.log("train/p_entropy", entropy(doc_scores.detach()).mean(), batch_size=bs)
        return loss

    def training_loss(
        self,
        batch: dict[str, Any],
        lp: AnswerLogProbs,
        doc_scores: torch.Tensor,
        ids: torch.Tensor,
        q: torch.Tensor,
        d: torch.Tensor,
        attention: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator loss + weighted retriever objectives -> (loss, {term name: detached mean}).

        The marginal trains the generator (unless it is frozen) and, with weight w = retriever_loss["marginal"],
        the retriever: its gradient into the scores is scaled by w (0: the scores are detached). A fusion
        reader's objectives read ``attention`` (B, K) (adist) or the loop pass's likelihoods (``loop_logprobs``)."""
        w = self.retriever_weights
        variant = self.hparams.variant if self.generator_loss == "none" else self.generator_loss
        nll = self.marginal_nll(lp, scale_grad(doc_scores, w.get("marginal", 0.0)), variant).mean()
        parts = {"nll": nll.detach()}
        terms = [nll] if nll.requires_grad else []
        inputs = {"attention": attention}
        if self.needs("likelihood"):
            inputs["likelihood"] = self.loop_logprobs(batch, ids) if self.generator.fusion else lp.seq_lp
        for name, weight in w.items():
            if name in OBJECTIVES:
                x = inputs[OBJECTIVE_INPUTS[name]]  # (B, K)
                term = OBJECTIVES[name](x, doc_scores, **self.objective_args.get(name, {})).mean()
            elif name == "contrastive":
                term = self.contrastive(batch, ids, q, d)
            else:
                continue
            parts[f"loss_{name}"] = term.detach()
            terms.append(weight * term)
        if not terms:
            raise RuntimeError("nothing to train: model.generator_loss=none and no retriever_loss term")
        return torch.stack(terms).sum(), parts

    def contrastive(self, batch: dict[str, Any], ids: torch.Tensor, q: torch.Tensor, d: torch.Tensor):
        """DPR's loss with in-batch negatives: every question against every passage retrieved for the batch
        plus the batch's gold passages (`gold_ids`, encoded when not retrieved) and, with
        `objective_args.contrastive.bm25_negatives=N`, each question's N best BM25 passages without an answer
        (DPR's hard negatives, shared by the batch); mean over questions with a gold passage in the corpus (0
        when none has)."""
        flat = ids.flatten().tolist()  # (B*K,)
        gold = [{r for g in gl if (r := self._row(g)) is not None} for gl in batch["gold_ids"]]
        first = {r: i for i, r in reversed(list(enumerate(flat)))}  # one column per distinct passage
        extra = set().union(*gold)
        if self.bm25_negatives:
            negs = hard_negatives(self.retriever.bm25, self.corpus, batch["questions"], batch["answers"],
                                  self.bm25_negatives, gold, batch.get("regex", False))  # fmt: skip
            extra = extra.union(*negs)
        extra = sorted(extra - first.keys())
        cand = [flat[i] for i in sorted(first.values())] + extra  # (N,) passage rows
        vecs = d.reshape(len(flat), -1)[sorted(first.values())]  # (N - len(extra), dim)
        if extra:
            vecs = torch.cat([vecs, self.retriever.encode_passages(extra, self.corpus, q.device).to(vecs)])
        scores = self.retriever.score(q, vecs)  # (B, N)
        mask = torch.tensor([[c in g for c in cand] for g in gold], device=scores.device)  # (B, N)
        has = mask.any(-1)
        if not has.any():
            return scores.sum() * 0.0
        loss = contrastive_loss(scores, mask, **self.objective_args.get("contrastive", {}))  # (B,)
        return loss.sum() / has.sum()

    def _row(self, ext_id: str) -> int | None:
        try:
            return self.corpus.id_to_row(ext_id)
        except KeyError:
            return None

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def generate(self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor) -> list[str]:
        from rag_lightning.models.sharding import gathered

        # FSDP: every unit unsharded while decoding (decoding calls past forward(), and the ranks run as many
        # decoder steps as their own questions need: no collective per step)
        with gathered(self.generator):
            return self._generate(batch, doc_scores, ids)

    def _generate(self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor) -> list[str]:
        src, mask, *_ = self.sources(batch, ids)
        g, d = self.generator, self.decoding
        kw = dict(
            num_beams=d["num_beams"],
            max_length=d["max_length"],
            min_length=d["min_length"],
            length_penalty=d["length_penalty"],
            no_repeat_ngram_size=int(d["no_repeat_ngram_size"]),
            decoder_start_token_id=g.decoder_start_token_id,
            eos_token_id=g.eos_token_id,
            pad_token_id=g.pad_token_id,
        )
        out = g.generate(src, mask, doc_scores, self.hparams.variant, mode=d["mode"], **kw)
        return g.decode(out)

    @torch.no_grad()
    def choice_logprobs(
        self, batch: dict[str, Any], doc_scores: torch.Tensor, ids: torch.Tensor, choices: list[torch.Tensor]
    ) -> torch.Tensor:
        """Exact log p(y_c | x) of candidate targets under the model's marginal over the K passages (RAG-Token:
        sum_t log sum_k p(z_k|x) p(y_t|x, z_k, y_<t); RAG-Sequence: log sum_k p(z_k|x) p(y|x, z_k)), no
        decoding. ``choices``: C label rows (1, T_c) (generator targets, padding -100), the same for every
        question; ``doc_scores`` / ``ids`` (B, K) -> (B, C)."""
        src, mask, *segments = self.sources(
            batch, ids
        )  # the reader's inputs, assembled once for every candidate
        b = ids.shape[0]
        out = []
        for labels in choices:
            labels = labels.to(self.device).expand(b, -1)  # (B, T_c)
            lp = self.token_logprobs(src, mask, labels, None, False, *segments)
            out.append(-self.marginal_nll(lp, doc_scores, epsilon=0.0))  # (B,)
        return torch.stack(out, 1)  # (B, C)

    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Loss, the task's predictions and per-example metrics, and retrieval metrics for one batch (all per
        example, (B,) each): the task (``self.task``) decides how to predict and what to score."""
        kmax = min(max(self.retriever.n_docs, *self.hparams.eval_ks), len(self.corpus))
        doc_scores, ids = self.retrieve(batch, kmax)  # (B, kmax) sorted by score
        k = min(self.retriever.n_docs, kmax)
        out: dict[str, Any] = {
            "loss": self.nll(batch, doc_scores[:, :k], ids[:, :k]),  # (B,)
            "p_entropy": entropy(doc_scores[:, :k]),  # (B,) of p(z|x) over the K passages the generator reads
        }
        out.update(self.task.predict(self, batch, doc_scores[:, :k], ids[:, :k]))
        out.update(self.task.retrieval_metrics(self.corpus, batch, ids, self.hparams.eval_ks))
        out.update(
            self.task.provenance_metrics(self.corpus, batch, ids, out["predictions"], self.hparams.eval_ks)
        )
        out["ids"], out["doc_scores"] = ids, doc_scores
        return out

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.evaluate(batch)
        names = batch.get("set_names") or [""] * len(batch["questions"])
        for name, values in out.items():
            key = f"{stage}_{name.replace('@', '_')}"
            if key not in self.eval_metrics:
                continue
            values = values.detach().float().to(self.device)  # (B,), logged at epoch end
            defined = ~values.isnan()  # NaN: not defined for this example (e.g. no gold passage)
            if defined.any():
                self.eval_metrics[key].update(values[defined])
            for set_name in dict.fromkeys(names):
                rows = torch.tensor([i for i, n in enumerate(names) if n == set_name], device=self.device)
                rows = rows[defined[rows]]
                if len(rows):
                    self._set_metric(stage, set_name, name).update(values[rows])
        for set_name, top in zip(names, out["ids"][:, 0].tolist()):
            self.top1.setdefault(set_name, set()).add(top)
        if self.task.corpus_level:
            self.outputs += list(zip(names, out["predictions"], batch["answers"]))
        if len(self.samples) < self.hparams.n_samples:
            titles = [self.corpus.titles(row[:3]) for row in out["ids"].tolist()]
            for i, (p, t) in enumerate(zip(out["predictions"], titles)):
                self.samples.append(self.task.sample(batch, i, p, t))

    def _set_metric(self, stage: str, set_name: str, name: str) -> MeanMetric:
        key = (stage, set_name, name)
        if key not in self.set_metrics:
            self.set_metrics[key] = MeanMetric().to(self.device)
        return self.set_metrics[key]

    def _log_eval_metrics(self, stage: str) -> None:
        """``{stage}/{metric}`` pooled over every question of every val / test set (what checkpoint monitors
        and sweeps read), and with several sets also ``{stage}/{set name}/{metric}`` for each set; then the
        task's corpus-level metrics and report."""
        for key, metric in self.eval_metrics.items():
            prefix, name = key.split("_", 1)
            if prefix != stage:
                continue
            if _updated(metric):
                name = name.replace("recall_", "recall@")
                self.log(f"{stage}/{name}", metric.compute(), prog_bar=name == self.task.monitor)
            metric.reset()
        per_set = sorted(k for k in self.set_metrics if k[0] == stage)  # same order on every rank
        several = len({set_name for _, set_name, _ in per_set}) > 1
        for key in per_set:
            metric = self.set_metrics[key]
            if several and metric.update_count:
                self.log(f"{stage}/{key[1]}/{key[2]}", metric.compute())
            metric.reset()
        self._log_top1_distinct(stage)
        if self.task.corpus_level:
            self._log_corpus_metrics(stage)

    def _log_corpus_metrics(self, stage: str) -> None:
        """The task's metrics over whole sets (corpus BLEU, macro-F1), from every rank's predictions."""
        outputs = self.outputs
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        self.outputs = []
        if not outputs:
            return
        set_names = list(dict.fromkeys(n for n, _, _ in outputs))
        groups = [("", outputs)]
        if len(set_names) > 1:
            groups += [(n, [o for o in outputs if o[0] == n]) for n in set_names]
        for set_name, rows in groups:
            preds, targets = [p for _, p, _ in rows], [t for _, _, t in rows]
            prefix = f"{stage}/{set_name}/" if set_name else f"{stage}/"
            for name, value in self.task.corpus_metrics(preds, targets).items():
                self.log(prefix + name, float(value), prog_bar=not set_name and name == self.task.monitor)
        if self.trainer.is_global_zero:
            self.task.report(self, stage, [p for _, p, _ in outputs], [t for _, _, t in outputs])

    def _log_top1_distinct(self, stage: str) -> None:
        """Distinct top-1 passages over the eval sets, and per set with several (1 = every question of the set
        retrieves one passage: a collapsed retriever)."""
        top1 = self.top1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, top1)
            top1 = {}
            for part in gathered:
                for name, ids in part.items():
                    top1.setdefault(name, set()).update(ids)
        if top1:
            self.log(f"{stage}/top1_distinct", float(len(set().union(*top1.values()))), rank_zero_only=True)
        if len(top1) > 1:
            for name, ids in sorted(top1.items()):
                self.log(f"{stage}/{name}/top1_distinct", float(len(ids)), rank_zero_only=True)
        self.top1 = {}

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def on_validation_epoch_start(self) -> None:
        self.samples, self.top1, self.outputs = [], {}, []

    def on_test_epoch_start(self) -> None:
        self.samples, self.top1, self.outputs = [], {}, []

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
            row = {
                "id": (batch.get("ids") or [None] * len(batch["questions"]))[i],
                "question": q,
                "answers": batch["answers"][i],
                "prediction": out["predictions"][i],
                "passage_ids": self.corpus.ext_ids(ids),
                "titles": self.corpus.titles(ids),
                "scores": [round(s, 4) for s in out["doc_scores"][i].tolist()],
            }
            if getattr(self.corpus, "has_pages", False):  # KILT: the passages' pages, for its guess files
                row["page_ids"] = self.corpus.page_ids(ids)
            for name, values in out.items():
                if name in ("loss", "p_entropy", "predictions", "ids", "doc_scores"):
                    continue
                if not math.isnan(v := float(values[i])):  # NaN: not defined for this example
                    row[name] = v
            rows.append(row)
        return rows

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("RagModule needs an optimizer (config group `optimizer`)")
        groups = []
        for name, module in (("generator", self.generator), ("retriever", self.retriever)):
            params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
            extra: dict[str, Any] = {}
            if name == "retriever":
                if self.hparams.retriever_lr is not None:
                    extra["lr"] = self.hparams.retriever_lr
                if self.hparams.retriever_start_step:
                    if self.scheduler_factory is None:
                        raise ValueError(
                            "model.retriever_start_step needs a scheduler (config group `scheduler`)"
                        )
                    extra["start_step"] = int(self.hparams.retriever_start_step)  # schedules.linear_warmup
            # no weight decay on biases and LayerNorm weights (vectors), as nanoGPT and BERT do
            matrices, vectors = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
            if matrices:
                groups.append({"params": matrices, "name": name, **extra})
            if vectors:
                groups.append({"params": vectors, "name": f"{name}_no_decay", "weight_decay": 0.0, **extra})
        opt = self.optimizer_factory(groups, **self._unfused_if_clipping_amp())
        if self.scheduler_factory is None:
            return {"optimizer": opt}
        total = int(self.trainer.estimated_stepping_batches)
        if (
            self.hparams.retriever_start_step
        ):  # the config check (preflight.check_run) could not know the data
            from rag_lightning.preflight import start_step_warning

            start_step_warning(int(self.hparams.retriever_start_step), total, "the trainer's estimate")
        sched = self.scheduler_factory(opt, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _unfused_if_clipping_amp(self) -> dict[str, Any]:
        """A fused optimizer (``optimizer.fused: true``) cannot be clipped under Lightning's mixed precision
        plugin (it unscales inside its step): fall back to the unfused update there, keep it everywhere else."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        wants = getattr(self.optimizer_factory, "keywords", {}).get("fused")
        trainer = self._trainer
        if (
            not wants
            or trainer is None
            or not isinstance(getattr(trainer, "precision_plugin", None), MixedPrecision)
        ):
            return {}
        return {"fused": False} if (trainer.gradient_clip_val or 0) > 0 else {}


_DECODING = {
    "num_beams": 1, "max_length": 20, "min_length": 0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "mode": "fast",
}  # fmt: skip


def _decoding(spec: dict[str, Any]) -> dict[str, Any]:
    """`model.decoding` with defaults filled in; an unknown key is an error (not silently ignored)."""
    unknown = sorted(set(spec) - set(_DECODING))
    if unknown:
        raise ValueError(f"model.decoding: unknown keys {unknown}; expected {sorted(_DECODING)}")
    out = {**_DECODING, **spec}
    if out["mode"] not in ("fast", "thorough"):
        raise ValueError(f"model.decoding.mode must be fast or thorough, got {out['mode']!r}")
    if not 0 <= int(out["min_length"]) <= int(out["max_length"]):
        raise ValueError(f"model.decoding: need 0 <= min_length <= max_length, got {out}")
    return out


def _retriever_weights(spec: Any) -> dict[str, float]:
    """`"emdr2"` -> {"emdr2": 1.0}; `{emdr2: 1.0, contrastive: 0.1}` as given; names checked, weights >= 0."""
    weights = {spec: 1.0} if isinstance(spec, str) else {str(k): float(v) for k, v in _plain(spec).items()}
    for name, w in weights.items():
        if name not in RETRIEVER_LOSSES:
            raise ValueError(f"model.retriever_loss: unknown objective {name!r}; expected {RETRIEVER_LOSSES}")
        if not w >= 0:
            raise ValueError(f"model.retriever_loss: weight of {name} must be >= 0, got {w}")
    return weights


def _check_fusion(variant: str, weights: dict[str, float]) -> None:
    """A fusion reader has no per-passage marginal; attention distillation needs one."""
    if variant in FUSION and "marginal" in weights:
        raise ValueError(
            f"model.retriever_loss: marginal needs a per-passage reader, model.variant={variant} reads all "
            f"passages at once; use adist (its attention), pdist, emdr2, lsr or contrastive"
        )
    if variant not in FUSION and "adist" in weights:
        raise ValueError(
            f"model.retriever_loss: adist needs a fusion reader ({FUSION}), not variant={variant}"
        )


def _updated(metric: MeanMetric) -> bool:
    """Whether any rank updated ``metric`` (every rank must take the same decision before ``compute`` syncs)."""
    n = torch.tensor(float(metric.update_count), device=metric.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
    return bool(n > 0)


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(key: str) -> str:
    """A state_dict / parameter name without the segments FSDP, activation checkpointing and compile add."""
    for w in _WRAPPERS:
        key = key.replace(w, "")
    return key


def _plain(x: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else dict(x)
