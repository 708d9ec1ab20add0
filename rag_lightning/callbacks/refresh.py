"""RefreshIndex: periodically re-embed the corpus with the current document encoder and swap the index in.

Schedule on the global optimizer step: `every_n_steps=N`, or piecewise `"0-1000:500,1000-10000:2000"`
(every 500 steps in [0, 1000), then every 2000 in [1000, 10000); an open end `"10000-:5000"` is allowed).
The callback only decides when, saves and restores; the retriever builds, swaps and versions
(`Retriever.refresh_index`). A failed refresh (exception, OOM, non-finite embeddings, on any rank) is logged
with its cause and every rank goes on with the old index until the next scheduled refresh. With a frozen
document encoder the embeddings cannot change, so the callback says so once and does nothing.

Staleness: before each refresh the callback searches a fixed sample of `stale_sample` training questions in
the old index and again in the new one, and logs `refresh/stale_overlap@k` = mean |old top-k & new top-k| / k
(k = retriever.n_docs): 1 means the refresh changed nothing the loss sees, so refreshes can be spaced out.

What it needs from the LightningModule: ``pl_module.corpus`` and ``pl_module.retriever``, a
:class:`~rag_lightning.models.retriever.Retriever` (``ensure_index``, ``load_index``, ``refresh_index``,
``save_index``, ``index_version``, ``index_source``, ``doc_encoder_changes``). Its checkpoint state records
the index version and where that index was saved (``index_path``, ``index_stamp``), so a resumed run, in any
output directory, loads that index instead of re-embedding.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from rag_lightning.models.retriever import IndexRefreshError

log = logging.getLogger(__name__)


def parse_schedule(spec: str) -> list[tuple[int, int | None, int]]:
    """ "0-1000:500,1000-:2000" -> [(0, 1000, 500), (1000, None, 2000)]."""
    out = []
    for part in spec.replace(" ", "").split(","):
        try:
            span, every = part.split(":")
            lo, hi = span.split("-")
            item = (int(lo), int(hi) if hi else None, int(every))
        except ValueError:
            raise ValueError(
                f"bad refresh schedule part {part!r} in {spec!r}: expected 'START-END:EVERY'"
            ) from None
        if item[2] <= 0 or (item[1] is not None and item[1] <= item[0]):
            raise ValueError(
                f"bad refresh schedule part {part!r} in {spec!r}: need EVERY > 0 and END > START"
            )
        out.append(item)
    return out


class RefreshIndex(Callback):
    def __init__(
        self,
        every_n_steps: int | None = None,
        schedule: str | None = None,
        at_fit_start: bool = False,
        save_dir: str | None = None,
        progress: bool = True,
        stale_sample: int = 64,
    ):
        if every_n_steps is not None and schedule is not None:
            raise ValueError("give every_n_steps or schedule, not both")
        self.ranges = (
            parse_schedule(schedule) if schedule else ([(0, None, every_n_steps)] if every_n_steps else [])
        )
        self.at_fit_start = at_fit_start
        self.save_dir = save_dir
        self.progress = progress
        self.stale_sample = stale_sample
        self._sample: dict[str, Any] | None = None  # the tokenized staleness sample, made once
        self.version = 0
        self.last_refresh_step = -1
        self.last_attempt_step = -1
        self.failures = 0
        self.corpus_fingerprint: str | None = None
        self.index_path: str | None = None  # where the index of `version` was saved (or prepared)
        self.index_stamp: dict | None = None
        self._restored = False
        self._said_frozen = False

    def due(self, step: int) -> bool:
        return any(
            lo <= step and (hi is None or step < hi) and step % every == 0 for lo, hi, every in self.ranges
        )

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        retriever, corpus = pl_module.retriever, pl_module.corpus
        progress = self.progress and trainer.is_global_zero
        if self._restored and retriever.doc_encoder_changes:
            # resuming: the index of the checkpoint's version, wherever it was saved; an index made before the
            # weights were restored (e.g. by validate-before-fit) is stale. Same state, same choice on all ranks.
            loaded = self.index_path is not None and retriever.load_index(
                self.index_path, version=self.version, stamp=self.index_stamp, passages=len(corpus)
            )
            if not loaded:
                log.warning("RefreshIndex: no saved index v%d at %s: re-embedding with the restored encoder",
                            self.version, self.index_path)  # fmt: skip
                retriever.refresh_index(corpus, progress=progress, version=self.version)
                self._save(retriever)
        else:
            retriever.ensure_index(corpus, progress=progress)
            if self.at_fit_start and not self._restored:
                self.refresh(trainer, pl_module)
            elif retriever.doc_encoder_changes and retriever.index_source.get("path") is None:
                self._save(retriever)  # v0, so that a resume finds it
        self._record(retriever)
        self.corpus_fingerprint = getattr(corpus, "fingerprint", None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.last_attempt_step or not self.due(step):
            return
        self.refresh(trainer, pl_module)

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Rebuild now. Returns False (and keeps the old index) if the document encoder is frozen or it fails."""
        step = trainer.global_step
        self.last_attempt_step = step
        retriever = pl_module.retriever
        if not retriever.doc_encoder_changes:
            if not self._said_frozen:
                log.info(
                    "RefreshIndex: the document encoder is frozen, its embeddings cannot change: no refresh"
                )
                self._said_frozen = True
            return False
        sample = self._staleness_sample(trainer, pl_module)
        stale = None if sample is None else self._top_ids(pl_module, sample)
        try:
            stats = retriever.refresh_index(
                pl_module.corpus, progress=self.progress and trainer.is_global_zero
            )
        except IndexRefreshError as e:  # raised on every rank alike: all keep the old index
            self.failures += 1
            log.error("index refresh at step %d failed (%s); training goes on with index v%d",
                      step, e, retriever.index_version)  # fmt: skip
            _log(trainer, {"index/failures": float(self.failures)})
            return False
        self.last_refresh_step = step
        row: dict[str, float] = {}  # one logged row per refresh
        if stale is not None:
            k = stale.shape[1]
            overlap = stale_overlap(stale, self._top_ids(pl_module, sample))
            log.info("index refresh at step %d: stale top-%d overlap %.3f", step, k, overlap)
            row[f"refresh/stale_overlap@{k}"] = overlap
        retriever.index.meta["step"] = step
        self._save(retriever)
        self._record(retriever)
        row["index/version"] = float(self.version)
        row["index/seconds"] = stats["seconds"]
        row["index/passages_per_s"] = stats.get("passages_per_s", 0.0)
        _log(trainer, row)
        return True

    def _staleness_sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """A fixed, seeded sample of training questions, collated once (None: disabled or no train items)."""
        dm = getattr(trainer, "datamodule", None)
        if (
            self.stale_sample <= 0
            or pl_module.retriever.index is None
            or not getattr(dm, "train_items", None)
        ):
            return None
        if self._sample is None:
            items = dm.train_items
            pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[: self.stale_sample]
            self._sample = dm.collator(train=False)([items[i] for i in sorted(pick.tolist())])
        return self._sample

    @staticmethod
    def _top_ids(pl_module: L.LightningModule, batch: dict[str, Any]) -> torch.Tensor:
        """(S, n_docs) dense top ids of the sample under the current index, the query encoder in eval mode."""
        retriever = pl_module.retriever
        enc, device = retriever.query_encoder, pl_module.device
        was_training = enc.training
        enc.eval()
        try:
            ids = batch["q_input_ids"].to(device), batch["q_attention_mask"].to(device)
            return retriever.dense_top_ids(*ids, retriever.n_docs).cpu()
        finally:
            enc.train(was_training)

    def _save(self, retriever) -> None:
        if self.save_dir:
            retriever.save_index(self.save_dir)  # atomic; sharded: each rank writes its own shard

    def _record(self, retriever) -> None:
        self.version = retriever.index_version
        self.index_path = retriever.index_source.get("path")
        self.index_stamp = retriever.index_source.get("stamp")

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "last_refresh_step": self.last_refresh_step,
            "last_attempt_step": self.last_attempt_step,
            "failures": self.failures,
            "corpus_fingerprint": self.corpus_fingerprint,
            "index_path": self.index_path,
            "index_stamp": self.index_stamp,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = state["version"]
        self.last_refresh_step = state["last_refresh_step"]
        self.last_attempt_step = state["last_attempt_step"]
        self.failures = state.get("failures", 0)
        self.corpus_fingerprint = state.get("corpus_fingerprint")
        self.index_path, self.index_stamp = state.get("index_path"), state.get("index_stamp")
        self._restored = True


def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """One row per refresh, at its step, straight to the loggers (rank 0 writes: Lightning's loggers are
    rank-zero-only). `LightningModule.log` from a callback would keep the value and repeat it in every later
    logged row, so a curve read from metrics.csv would look measured at every logging step."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def stale_overlap(stale: torch.Tensor, fresh: torch.Tensor) -> float:
    """Mean over rows of |stale_row & fresh_row| / k for (S, k) id lists (ids -1 never count)."""
    k = stale.shape[1]
    hits = [len({i for i in a if i >= 0} & set(b)) for a, b in zip(stale.tolist(), fresh.tolist())]
    return sum(hits) / (k * max(1, len(hits)))
