"""A trained checkpoint asked from Python::

    from rag_lightning import RagPipeline

    p = RagPipeline.from_checkpoint("logs/train/runs/<run>/checkpoints/last.ckpt")
    p.answer(["who wrote hamlet?"])          # the task's predictions: answers, texts or labels
    p.retrieve(["who wrote hamlet?"], k=5)   # passages: [{"id", "title", "text", "score"}, ...] per input

The model, corpus and index are those ``rag-evaluate`` would use for the same checkpoint and overrides: the
run's config next to the checkpoint (``rag_lightning.commands.run_config``), the weights loaded strictly, the
index whose stamp matches the document encoder (prepared, saved by the run's last refresh, else embedded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device

from rag_lightning.commands.run_config import apply_run_config, load_run


def compose_evaluate(ckpt_path: str, overrides: Sequence[str] = ()) -> Any:
    """``conf/evaluate.yaml`` with ``ckpt_path`` and ``overrides``, the run's config merged in, as
    ``rag-evaluate ckpt_path=... OVERRIDES`` composes it (outside a Hydra app; one inside is left as it was)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rag_lightning.cli import conf_dir

    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"ckpt_path={ckpt_path}", *overrides])
    finally:
        if outer is not None:
            gh.clear()
            gh.initialize(outer)
    return apply_run_config(cfg, list(overrides))


class RagPipeline:
    """A RagModule with its corpus and index, in eval mode: :meth:`answer` and :meth:`retrieve` lists of inputs."""

    def __init__(self, model: Any, datamodule: Any, batch_size: int = 8) -> None:
        self.model, self.datamodule, self.batch_size = model.eval(), datamodule, batch_size
        self.collate = datamodule.collator(train=False)
        model.retriever.ensure_index(model.corpus, progress=False, match_weights=True)

    @classmethod
    def from_checkpoint(
        cls, ckpt_path: str, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
    ) -> RagPipeline:
        """Load ``ckpt_path`` (a Lightning checkpoint of ``rag-train``); ``overrides`` as on the command line."""
        from rag_lightning.preflight import preflight

        cfg = compose_evaluate(ckpt_path, overrides)
        preflight(cfg, trainer=False)
        datamodule, model = load_run(cfg, "predict", cfg.model.get("eval_ks"))
        return cls(model.to(device), datamodule, batch_size=int(cfg.data.get("eval_batch_size") or 8))

    def _batches(self, inputs: Sequence[str]) -> Any:
        task = self.model.task
        for start in range(0, len(inputs), self.batch_size):
            items = [self._item(task.query(text)) for text in inputs[start : start + self.batch_size]]
            yield move_data_to_device(self.collate(items), self.model.device)

    @staticmethod
    def _item(example: Any) -> Any:
        from rag_lightning.data.collate import Item

        return Item(example)

    @torch.no_grad()
    def predict(self, inputs: Sequence[str]) -> list[dict[str, Any]]:
        """One row per input, as ``rag-evaluate`` writes them: prediction, passage ids, titles, scores."""
        rows = []
        for batch in self._batches(list(inputs)):
            rows += self.model.predict_step(batch, 0)
        for row in rows:  # the placeholder target's columns
            for key in [k for k in row if k == "answers" or isinstance(row[k], float)]:
                del row[key]
        return rows

    def answer(self, inputs: Sequence[str]) -> list[str]:
        """The task's prediction for each input: an answer (QA), a text (generation), a label (classification)."""
        return [row["prediction"] for row in self.predict(inputs)]

    @torch.no_grad()
    def retrieve(self, inputs: Sequence[str], k: int = 5) -> list[list[dict[str, Any]]]:
        """The top ``k`` passages of each input, best first: ``{"id", "title", "text", "score"}``."""
        corpus, out = self.model.corpus, []
        for batch in self._batches(list(inputs)):
            scores, ids = self.model.retrieve(batch, min(k, len(corpus)))  # (B, k) each
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
                fields = zip(
                    corpus.ext_ids(row_ids), corpus.titles(row_ids), corpus.texts(row_ids), row_scores
                )
                out.append([{"id": i, "title": t, "text": x, "score": s} for i, t, x, s in fields])
        return out
