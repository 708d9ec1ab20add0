"""Named question sets and corpora, and the bundled assets.

A *set spec* is a path string, a registry name, or a dict ``{path, format, fields, regex, name, split, ...}``.
Registry paths use ``{data_dir}`` (DPR's download layout under it) and ``{assets}`` (bundled data).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a bundled asset, e.g. ``asset_path("squad_demo/train.jsonl")`` (OmegaConf ``asset``)."""
    p = ASSETS_DIR / name
    if not p.exists():
        raise FileNotFoundError(f"no bundled asset {name!r} under {ASSETS_DIR}")
    return str(p)


_QAS = "{data_dir}/retriever/qas"  # DPR: python download_data.py --resource data.retriever.qas.<name>
SETS: dict[str, dict[str, Any]] = {
    "nq_train": {"path": f"{_QAS}/nq-train.csv", "format": "dpr_csv"},
    "nq_dev": {"path": f"{_QAS}/nq-dev.csv", "format": "dpr_csv"},
    "nq_test": {"path": f"{_QAS}/nq-test.csv", "format": "dpr_csv"},
    "trivia_train": {"path": f"{_QAS}/trivia-train.csv", "format": "dpr_csv"},
    "trivia_dev": {"path": f"{_QAS}/trivia-dev.csv", "format": "dpr_csv"},
    "trivia_test": {"path": f"{_QAS}/trivia-test.csv", "format": "dpr_csv"},
    "webq_test": {"path": f"{_QAS}/webq-test.csv", "format": "dpr_csv"},
    "curatedtrec_test_dpr": {"path": f"{_QAS}/curatedtrec-test.csv", "format": "dpr_csv", "regex": True},
    "squad1_test": {"path": f"{_QAS}/squad1-test.csv", "format": "dpr_csv"},
    # as published: CuratedTREC (brmson/dataset-factoid-curated; large2180-* are the 1,479 / 694-question
    # train / test files DPR and RAG use, at commit 087375a), TriviaQA (triviaqa-unfiltered.tar.gz),
    # WebQuestions (SEMPRE release)
    "curatedtrec_train": {"path": "{data_dir}/curatedtrec/large2180-train.tsv", "format": "curatedtrec"},
    "curatedtrec_test": {"path": "{data_dir}/curatedtrec/large2180-test.tsv", "format": "curatedtrec"},
    "triviaqa_unfiltered_train": {
        "path": "{data_dir}/triviaqa-unfiltered/unfiltered-web-train.json",
        "format": "triviaqa",
    },
    "triviaqa_unfiltered_dev": {
        "path": "{data_dir}/triviaqa-unfiltered/unfiltered-web-dev.json",
        "format": "triviaqa",
    },
    "webquestions_train": {
        "path": "{data_dir}/webquestions/webquestions.examples.train.json",
        "format": "webquestions",
    },
    "webquestions_test": {
        "path": "{data_dir}/webquestions/webquestions.examples.test.json",
        "format": "webquestions",
    },
    "efficientqa_dev": {"path": "{data_dir}/NQ-open.efficientqa.dev.1.1.jsonl", "format": "nq_open"},
    "squad_dev": {"path": "{data_dir}/dev-v1.1.json", "format": "squad"},
    # SQuAD-open: dev questions split by article (36/6/6, seeded): test articles unseen in training.
    "squad_open_train": {"path": "{data_dir}/dev-v1.1.json", "format": "squad", "split": "train"},
    "squad_open_val": {"path": "{data_dir}/dev-v1.1.json", "format": "squad", "split": "val"},
    "squad_open_test": {"path": "{data_dir}/dev-v1.1.json", "format": "squad", "split": "test"},
    "demo_train": {"path": "{assets}/squad_demo/train.jsonl", "format": "jsonl"},
    "demo_val": {"path": "{assets}/squad_demo/val.jsonl", "format": "jsonl"},
    "demo_test": {"path": "{assets}/squad_demo/test.jsonl", "format": "jsonl"},
}

# KILT (facebookresearch/KILT, files as published under {data_dir}/kilt/): name -> (file stem, task, splits).
# Entity linking (aidayago2, wned, cweb) and slot filling (trex, zsre) are short answers (an entity title, a
# slot value): the qa task. TriviaQA: KILT publishes *_id-kilt.jsonl without questions; its
# scripts/get_triviaqa_input.py writes the triviaqa-{train,dev}-kilt.jsonl registered here.
EL_WINDOW = 32  # entity linking: words kept on each side of the [START_ENT] mention of the input document
KILT: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fever": ("fever", "classification", ("train", "dev")),
    "aidayago2": ("aidayago2", "qa", ("train", "dev")),
    "wned": ("wned", "qa", ("dev",)),
    "cweb": ("cweb", "qa", ("dev",)),
    "trex": ("trex", "qa", ("train", "dev")),
    "zsre": ("structured_zeroshot", "qa", ("train", "dev")),
    "nq": ("nq", "qa", ("train", "dev")),
    "hotpotqa": ("hotpotqa", "qa", ("train", "dev")),
    "triviaqa": ("triviaqa", "qa", ("train", "dev")),
    "eli5": ("eli5", "generation", ("train", "dev")),
    "wow": ("wow", "generation", ("train", "dev")),
}
SETS.update(
    {
        f"kilt_{name}_{split}": {
            "path": f"{{data_dir}}/kilt/{stem}-{split}-kilt.jsonl",
            "format": "kilt",
            "task": task,
            **({"window": EL_WINDOW} if name in ("aidayago2", "wned", "cweb") else {}),
        }
        for name, (stem, task, splits) in KILT.items()
        for split in splits
    }
)

CORPORA: dict[str, dict[str, Any]] = {
    "psgs_w100": {"path": "{data_dir}/wikipedia_split/psgs_w100.tsv", "format": "tsv"},
    "squad_dev": {"path": "{data_dir}/dev-v1.1.json", "format": "squad"},
    "demo": {"path": "{assets}/squad_demo/passages.jsonl", "format": "jsonl"},
    # KILT's Wikipedia (5.9M pages), cut into 100-word passages while converting (rag_lightning/data/kilt.py)
    "kilt_ks": {"path": "{data_dir}/kilt/kilt_knowledgesource.json", "format": "kilt"},
    # the same passages written once as a tsv (scripts/kilt_passages.py): id, text, title, wikipedia_id
    "kilt_w100": {"path": "{data_dir}/kilt/kilt_w100_title.tsv", "format": "tsv"},
}


def _to_plain(spec: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(spec, (DictConfig, ListConfig)):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return spec


def _resolve(
    spec: Any, table: Mapping[str, dict[str, Any]], data_dir: str | os.PathLike | None
) -> dict[str, Any]:
    spec = _to_plain(spec)
    if isinstance(spec, os.PathLike):
        spec = str(spec)
    if isinstance(spec, str):
        out = {**table[spec], "name": spec} if spec in table else {"path": spec}
    elif isinstance(spec, Mapping):
        out = dict(spec)
        if "path" not in out:
            raise ValueError(f"set spec needs a 'path': {spec!r}")
    else:
        raise TypeError(f"set spec must be a path, a registry name or a dict, got {type(spec).__name__}")
    if isinstance(out.get("fields"), Mapping):  # null: the reader's own name (the configs declare the keys)
        out["fields"] = {k: v for k, v in out["fields"].items() if v is not None} or None
    path = str(out["path"])
    if "{data_dir}" in path and data_dir is None:
        raise ValueError(f"{path!r} needs data_dir (set data.data_dir / paths.data_dir)")
    out["path"] = path.replace("{data_dir}", str(data_dir)).replace("{assets}", str(ASSETS_DIR))
    out.setdefault("format", "auto")
    out.setdefault(
        "name", Path(out["path"]).stem if "split" not in out else f"{Path(out['path']).stem}_{out['split']}"
    )
    return out


def resolve_set(spec: Any, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Registry name / path / dict -> dict with at least ``path``, ``format``, ``name``."""
    return _resolve(spec, SETS, data_dir)


def resolve_corpus(spec: Any, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Corpus registry name / path / dict -> dict with ``path``, ``format``, ``name``."""
    return _resolve(spec, CORPORA, data_dir)
