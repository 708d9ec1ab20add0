"""QA sets and passage corpora: readers, registry, Arrow corpus conversion, collate, DataModule."""

from rag_lightning.data.collate import Item, QACollator
from rag_lightning.data.corpus import Corpus, corpus_fingerprint
from rag_lightning.data.readers import (
    FORMATS,
    DataError,
    QAExample,
    QASet,
    read_questions,
    squad_article_split,
    squad_paragraphs,
)
from rag_lightning.data.registry import CORPORA, SETS, asset_path, resolve_corpus, resolve_set


def __getattr__(name: str):  # lazy: importing lightning is slow and readers/corpus do not need it
    if name in ("QADataModule", "load_tokenizer"):
        from rag_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(name)


__all__ = [
    "CORPORA",
    "FORMATS",
    "SETS",
    "Corpus",
    "DataError",
    "Item",
    "QACollator",
    "QADataModule",
    "QAExample",
    "QASet",
    "asset_path",
    "corpus_fingerprint",
    "load_tokenizer",
    "read_questions",
    "resolve_corpus",
    "resolve_set",
    "squad_article_split",
    "squad_paragraphs",
]
