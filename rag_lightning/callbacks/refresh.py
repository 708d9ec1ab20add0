"""RefreshIndex: periodically re-embed the corpus with the current document encoder and swap the index in.

Schedule on the global optimizer step: `every_n_steps=N`, or piecewise `"0-1000:500,1000-10000:2000"`
(every 500 steps in [0, 1000), then every 2000 in [1000, 10000); an open end `"10000-:5000"` is allowed).
The new index is built aside and swapped in only when complete; a failed refresh (exception, OOM) is logged
with its cause and training goes on with the old index until the next scheduled refresh. With a frozen
document encoder the embeddings cannot change, so the callback says so once and does nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from rag_lightning.retrieval.sharded import ShardedIndex

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
    ):
        if every_n_steps is not None and schedule is not None:
            raise ValueError("give every_n_steps or schedule, not both")
        self.ranges = (
            parse_schedule(schedule) if schedule else ([(0, None, every_n_steps)] if every_n_steps else [])
        )
        self.at_fit_start = at_fit_start
        self.save_dir = save_dir
        self.progress = progress
        self.version = 0
        self.last_refresh_step = -1
        self.last_attempt_step = -1
        self.failures = 0
        self.corpus_fingerprint: str | None = None
        self._restored = False
        self._said_frozen = False

    def due(self, step: int) -> bool:
        return any(
            lo <= step and (hi is None or step < hi) and step % every == 0 for lo, hi, every in self.ranges
        )

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        retriever = pl_module.retriever
        if self._restored and retriever.doc_encoder_changes:
            # resuming: an index built before the weights were restored (e.g. by validate-before-fit) is stale;
            # use the saved one if its stamp matches the checkpoint, else rebuild from the restored encoder
            retriever.index = self._load_saved(pl_module)
            if retriever.index is None:
                pl_module.rebuild_index(progress=self.progress and trainer.is_global_zero)
            else:
                log.info("resumed index v%d from %s", self.version, self.save_dir)
            retriever.index.version = self.version
        pl_module.ensure_index()
        if self.at_fit_start and not self._restored:
            self.refresh(trainer, pl_module)
        self.corpus_fingerprint = getattr(pl_module.corpus, "fingerprint", None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.last_attempt_step or not self.due(step):
            return
        self.refresh(trainer, pl_module)

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Rebuild now. Returns False (and keeps the old index) if the document encoder is frozen or it fails."""
        step = trainer.global_step
        self.last_attempt_step = step
        if not pl_module.retriever.doc_encoder_changes:
            if not self._said_frozen:
                log.info(
                    "RefreshIndex: the document encoder is frozen, its embeddings cannot change: no refresh"
                )
                self._said_frozen = True
            return False
        try:
            stats = pl_module.rebuild_index(progress=self.progress and trainer.is_global_zero)
        except Exception as e:  # noqa: BLE001 - any failure keeps the old index; the cause is logged
            self.failures += 1
            log.exception("index refresh at step %d failed (%s: %s); training goes on with index v%d",
                          step, type(e).__name__, e, self.version)  # fmt: skip
            pl_module.log("index/failures", float(self.failures), rank_zero_only=True)
            return False
        self.version = pl_module.retriever.index.version
        self.last_refresh_step = step
        index = pl_module.retriever.index
        index.meta.update(step=step, version=self.version)
        if self.save_dir and (trainer.is_global_zero or pl_module.retriever.index_mode == "sharded"):
            index.save(self.save_dir)  # atomic; sharded: each rank writes its own shard
        pl_module.log_dict(
            {
                "index/version": float(self.version),
                "index/seconds": stats["seconds"],
                "index/passages_per_s": stats.get("passages_per_s", 0.0),
            },
            rank_zero_only=True,
        )
        return True

    def _load_saved(self, pl_module: L.LightningModule) -> ShardedIndex | None:
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return None
        try:
            index = pl_module.retriever.load_index(self.save_dir)
        except Exception as e:  # noqa: BLE001
            log.warning("saved index at %s unusable (%s): rebuilding", self.save_dir, e)
            return None
        fp = getattr(pl_module.corpus, "fingerprint", None)
        if index.meta.get("version") != self.version or index.meta.get("corpus") != fp:
            log.warning("saved index at %s is v%s for corpus %s, the checkpoint wants v%d for %s: rebuilding",
                        self.save_dir, index.meta.get("version"), index.meta.get("corpus"), self.version, fp)  # fmt: skip
            return None
        index.version = self.version
        return index

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "last_refresh_step": self.last_refresh_step,
            "last_attempt_step": self.last_attempt_step,
            "failures": self.failures,
            "corpus_fingerprint": self.corpus_fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = state["version"]
        self.last_refresh_step = state["last_refresh_step"]
        self.last_attempt_step = state["last_attempt_step"]
        self.failures = state.get("failures", 0)
        self.corpus_fingerprint = state.get("corpus_fingerprint")
        self._restored = True
