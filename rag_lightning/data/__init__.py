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
from rag_lightning.tokenization import load_tokenizer


def __getattr__(name: str):  # lazy: importing lightning is slow and readers/corpus do not need it
    if name == "QADataModule":
        from rag_lightning.data.datamodule import QADataModule

        return QADataModule
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
