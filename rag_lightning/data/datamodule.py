"""QADataModule: question sets + passage corpus + tokenizers -> DataLoaders of contract batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader

from rag_lightning.data.collate import Item, QACollator
from rag_lightning.data.corpus import Corpus
from rag_lightning.data.readers import QASet
from rag_lightning.data.registry import ASSETS_DIR, _to_plain, resolve_corpus, resolve_set
from rag_lightning.data.textio import DataError
from rag_lightning.metrics import set_regex_timeout
from rag_lightning.tasks.base import Task, build_task
from rag_lightning.tokenization import generator_kind, load_tokenizer

log = logging.getLogger(__name__)

CORPUS_ENV = "RAG_LIGHTNING_CORPUS_FINGERPRINT"  # local rank 0's, inherited by the ranks it launches


class QADataModule(L.LightningDataModule):
    """Reads train/val/test question sets and a passage corpus; collates contract batches.

    Set specs: path strings, registry names (:data:`rag_lightning.data.registry.SETS`, ``{data_dir}``
    substituted) or dicts ``{path, format, fields, regex, name, ...}`` (other keys go to the reader).
    Several sets per split: train sets are concatenated; each val/test set gets its own DataLoader (a list
    when there are several; names in ``val_set_names`` / ``test_set_names``).
    ``validate_sets`` reads and checks every question set (bad rows, invalid regexes and empty sets fail
    here, with file and line); ``prepare_data`` calls it before it converts the corpus to Arrow (once),
    ``setup`` before it memory-maps the corpus.
    Without val sets, ``val_split_fraction`` > 0 carves a seeded val split out of train.
    ``task`` (``rag_lightning.tasks``, default QA) reads the sets and chooses the training targets.
    """

    def __init__(
        self,
        train_sets: Sequence[Any] = (),
        val_sets: Sequence[Any] = (),
        test_sets: Sequence[Any] = (),
        corpus: Any = None,
        query_tokenizer: str = "",
        generator_tokenizer: str = "",
        generator_kind: str = "auto",
        doc_tokenizer: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_question_length: int = 64,
        max_target_length: int = 25,
        max_passage_tokens: int = 256,
        cache_dir: str | os.PathLike = "cache",
        train_answer: str = "first",
        skip_bad_rows: bool = False,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        val_split_fraction: float = 0.0,
        seed: int = 0,
        data_dir: str | os.PathLike | None = None,
        corpus_num_proc: int | None = None,
        pin_memory: bool = False,
        query_prefix: str = "",
        doc_prefix: str = "",
        query_max_length: int | None = None,
        doc_max_length: int | None = None,
        regex_timeout_s: float = 0.5,
        task: Task | str | dict | None = None,
    ) -> None:
        super().__init__()
        self.task = build_task(task)
        set_regex_timeout(regex_timeout_s)  # answer regexes: a time budget per match (metrics.py)
        if train_answer not in ("first", "random"):
            raise ValueError(f"train_answer must be 'first' or 'random', got {train_answer!r}")
        self.train_specs = [resolve_set(s, data_dir) for s in _as_list(train_sets)]
        self.val_specs = [resolve_set(s, data_dir) for s in _as_list(val_sets)]
        self.test_specs = [resolve_set(s, data_dir) for s in _as_list(test_sets)]
        self.corpus_spec = None if corpus is None else resolve_corpus(corpus, data_dir)
        self.tokenizer_names = {
            "query": query_tokenizer,
            "generator": generator_tokenizer,
            "doc": doc_tokenizer,
        }
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.max_question_length, self.max_target_length = max_question_length, max_target_length
        self.max_passage_tokens, self.cache_dir, self.corpus_num_proc = (
            max_passage_tokens,
            cache_dir,
            corpus_num_proc,
        )
        self.train_answer, self.skip_bad_rows, self.seed = train_answer, skip_bad_rows, seed
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.val_split_fraction = val_split_fraction
        self.generator_kind = generator_kind  # causal generators need other targets (data/collate.py)
        # the retriever encoders' text conventions, applied where each side is tokenized (query: collator,
        # passages: corpus conversion, in the corpus fingerprint); the generator never sees them
        self.query_prefix, self.query_max_length = query_prefix or "", query_max_length
        self.doc_prefix, self.doc_max_length = doc_prefix or "", doc_max_length
        self.query_tokenizer = self.gen_tokenizer = self.doc_tokenizer = None
        self.corpus: Corpus | None = None
        self.corpus_fingerprint: str | None = None  # this rank's view of the corpus source
        self.train_items: list[Item] = []
        self.val_sets: list[tuple[str, list[Item]]] = []
        self.test_sets: list[tuple[str, list[Item]]] = []
        self._sets_loaded = False

    # ------------------------------------------------------------------ setup
    def _load_tokenizers(self) -> None:
        if self.gen_tokenizer is not None:
            return
        cache: dict[str, Any] = {}
        for name in self.tokenizer_names.values():
            if name and name not in cache:
                cache[name] = load_tokenizer(name)
        self.query_tokenizer = cache.get(self.tokenizer_names["query"])
        self.gen_tokenizer = cache.get(self.tokenizer_names["generator"])
        self.doc_tokenizer = cache.get(self.tokenizer_names["doc"] or "")
        if self.query_tokenizer is None or self.gen_tokenizer is None:
            raise ValueError("query_tokenizer and generator_tokenizer must be given")

    def _corpus_kwargs(self) -> dict[str, Any]:
        spec = dict(self.corpus_spec)
        return {
            "path": spec.pop("path"),
            "fmt": spec.pop("format", "auto"),
            "fields": spec.pop("fields", None),
            "cache_dir": self.cache_dir,
            "gen_tokenizer": self.gen_tokenizer,
            "doc_tokenizer": self.doc_tokenizer,
            "max_passage_tokens": self.max_passage_tokens,
            "num_proc": self.corpus_num_proc,
            **({"doc_prefix": self.doc_prefix} if self.doc_prefix else {}),
            **({"doc_max_length": self.doc_max_length} if self.doc_max_length else {}),
        }

    def prepare_corpus(self) -> None:
        """Convert the corpus to its Arrow cache (once per fingerprint), outside any distributed barrier:
        local rank 0 (env ``LOCAL_RANK``) converts, the other local ranks wait for the finished cache with no
        timeout, unless they see another content than local rank 0 converted (its fingerprint is passed on in
        the environment of the ranks Lightning starts): then they stop at ``setup``, where every rank compares
        fingerprints. Once per datamodule: ``train.py`` and ``scripts/build_index.py`` call it before the
        trainer starts."""
        if (
            self.corpus_spec is None or self.corpus_fingerprint is not None
        ):  # (once: prepare_data after train.py)
            return
        self._load_tokenizers()
        kwargs = self._corpus_kwargs()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            self.corpus_fingerprint = Corpus.prepare(**kwargs).name
            os.environ[CORPUS_ENV] = self.corpus_fingerprint  # what the ranks Lightning starts must agree on
            return
        self.corpus_fingerprint = Corpus.fingerprint_of(**kwargs)
        rank0 = os.environ.get(CORPUS_ENV)
        if rank0 is not None and rank0 != self.corpus_fingerprint:  # nobody will build ours: do not wait
            log.error("corpus %s: local rank 0 converted fingerprint %s, this rank sees %s (the file changed in "
                      "between): every rank stops at setup", kwargs["path"], rank0, self.corpus_fingerprint)  # fmt: skip
            return
        Corpus.wait_for(**kwargs, fingerprint=self.corpus_fingerprint)

    def prepare_data(self) -> None:
        """Lightning's hook (local rank 0, before a barrier with the process group's timeout): read and check
        the question sets (seconds), then the corpus: a no-op when ``prepare_corpus`` ran before, as in
        train.py; otherwise it converts here (hours for psgs_w100, once per fingerprint)."""
        self.validate_sets()
        self.prepare_corpus()

    def setup(self, stage: str | None = None) -> None:
        self.validate_sets()
        self._load_tokenizers()
        self.task.check_targets(self.collator(False).encode_targets, self.max_target_length)
        if self.corpus is None and self.corpus_spec is not None:
            self._agree_on_corpus()
            target = Path(self.cache_dir) / str(self.corpus_fingerprint)
            if (target / "corpus_meta.json").is_file():  # the conversion every rank agreed on
                self.corpus = Corpus.load(target)
            else:
                self.corpus = Corpus.from_file(**self._corpus_kwargs())  # converts here (no prepare_corpus)
            log.info("corpus: %d passages (%s)", len(self.corpus), self.corpus.fingerprint)

    def _agree_on_corpus(self) -> None:
        """Every rank (process group up, all of them here) compares its corpus fingerprint with the others':
        a source changed between two ranks' starts is a DataError on every rank, never a wait for a cache that
        nobody builds. The fingerprint is the content's, so copies of one corpus on each node agree."""
        if self.corpus_fingerprint is None:
            self.corpus_fingerprint = Corpus.fingerprint_of(**self._corpus_kwargs())
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, self.corpus_fingerprint)
        if len(set(seen)) > 1:
            raise DataError(
                self.corpus_spec["path"], 0, "<corpus>",
                f"the ranks see different corpus contents (fingerprint by rank: {seen}): the file changed while "
                "the run started, or the nodes hold different copies; make them identical and start again",
            )  # fmt: skip

    def validate_sets(self) -> None:
        """Read every train / val / test set once (a DataError names file, line and field)."""
        if self._sets_loaded:
            return
        self._warn_demo_questions_on_another_corpus()
        train = [it for s in self.train_specs for it in self._read(s)[1]]
        self.val_sets = [self._read(s) for s in self.val_specs]
        self.test_sets = [self._read(s) for s in self.test_specs]
        if not self.val_sets and self.val_split_fraction > 0 and train:
            perm = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, round(self.val_split_fraction * len(train)))
            val_idx = set(perm[:n_val].tolist())
            self.val_sets = [("train_split", [train[i] for i in sorted(val_idx)])]
            train = [it for i, it in enumerate(train) if i not in val_idx]
            log.info("carved %d val examples out of train (seed %d)", n_val, self.seed)
        self.train_items = train[: self.max_train_examples] if self.max_train_examples else train
        if self.max_eval_examples:
            self.val_sets = [(n, s[: self.max_eval_examples]) for n, s in self.val_sets]
            self.test_sets = [(n, s[: self.max_eval_examples]) for n, s in self.test_sets]
        log.info(
            "examples: train %d; val %s; test %s",
            len(self.train_items),
            {n: len(s) for n, s in self.val_sets},
            {n: len(s) for n, s in self.test_sets},
        )
        self._sets_loaded = True

    def _warn_demo_questions_on_another_corpus(self) -> None:
        """The bundled demo's questions are answered by the bundled passages only: scored against another
        corpus, EM / F1 / recall@k say nothing. Said once, naming the keys that still point at the demo."""
        if self.corpus_spec is None or _bundled(self.corpus_spec["path"]):
            return
        splits = {"train_sets": self.train_specs, "val_sets": self.val_specs, "test_sets": self.test_specs}
        keys = [f"data.{k}" for k, specs in splits.items() if any(_bundled(s["path"]) for s in specs)]
        if any(k != "data.train_sets" for k in keys):
            log.warning(
                "%s: the demo's bundled questions, but the corpus is %s: their answers are not in it, so the "
                "figures mean nothing; set %s to your own questions (docs/data.md)",
                ", ".join(keys), self.corpus_spec["path"], "it" if len(keys) == 1 else "them",
            )  # fmt: skip

    def _read(self, spec: dict[str, Any]) -> tuple[str, list[Item]]:
        qa: QASet = self.task.read(spec, skip_bad_rows=self.skip_bad_rows)
        log.info(
            "read %d examples from %s (%s), skipped %d bad rows", len(qa), qa.name, spec["path"], qa.skipped
        )
        return qa.name, [Item(e, qa.regex, qa.name) for e in qa]

    # ------------------------------------------------------------------ loaders
    @property
    def val_set_names(self) -> list[str]:
        return [n for n, _ in self.val_sets]

    @property
    def test_set_names(self) -> list[str]:
        return [n for n, _ in self.test_sets]

    def collator(self, train: bool) -> QACollator:
        return QACollator(
            self.query_tokenizer,
            self.gen_tokenizer,
            self.max_question_length,
            self.max_target_length,
            self.train_answer if train else "first",
            causal=self._causal,
            query_prefix=self.query_prefix,
            query_max_length=self.query_max_length,
            task=self.task,
        )

    @property
    def _causal(self) -> bool:
        return generator_kind(self.tokenizer_names["generator"], self.generator_kind) == "causal"

    def _loader(self, items: list[Item], train: bool) -> DataLoader:
        return DataLoader(
            items,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=self.collator(train),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_items:
            raise ValueError("no training examples (data.train_sets is empty?)")
        return self._loader(self.train_items, train=True)

    def _eval_loaders(self, sets: list[tuple[str, list[Item]]]) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(items, train=False) for _, items in sets]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.val_sets)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.test_sets)


def _bundled(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the package's bundled assets (the demo's questions and passages)."""
    return Path(path).resolve().is_relative_to(ASSETS_DIR)


def _as_list(x: Any) -> list[Any]:
    x = _to_plain(x)
    if x is None:
        return []
    if isinstance(x, (str, Path, dict)):
        return [x]
    return list(x)
