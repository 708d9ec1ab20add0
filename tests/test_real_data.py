"""The real QA files in ../shared/data (skipped where absent): counts, SQuAD-open article split."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_lightning.data.readers import read_questions, squad_article_split, squad_paragraphs
from rag_lightning.data.registry import resolve_set


def _file(data_dir: Path, name: str) -> Path:
    p = data_dir / name
    if not p.exists():
        pytest.skip(f"{p} not present (real data lives in ../shared/data)")
    return p


def test_squad_dev(shared_data_dir: Path) -> None:
    p = _file(shared_data_dir, "dev-v1.1.json")
    qa = read_questions(p)
    assert len(qa) == 10570 and qa.skipped == 0
    assert len({e.id for e in qa}) == 10570 and all(e.answers for e in qa)
    paras = list(squad_paragraphs(p))
    assert len(paras) == 2067 and len({x["id"] for x in paras}) == 2067
    assert paras[0]["title"] == "Super Bowl 50"


def test_efficientqa_dev(shared_data_dir: Path) -> None:
    qa = read_questions(_file(shared_data_dir, "NQ-open.efficientqa.dev.1.1.jsonl"))
    assert len(qa) == 1800 and all(e.answers for e in qa)


def test_squad_open_split(shared_data_dir: Path) -> None:
    _file(shared_data_dir, "dev-v1.1.json")
    parts = {}
    for split in ("train", "val", "test"):
        spec = resolve_set(f"squad_open_{split}", shared_data_dir)
        opts = {k: v for k, v in spec.items() if k in ("split", "split_seed")}
        qa = read_questions(spec["path"], spec["format"], **opts)
        parts[split] = {g.split("-")[0] for e in qa for g in e.gold_ids}
        assert len(qa) > 0
    assert [len(parts[s]) for s in ("train", "val", "test")] == [36, 6, 6]
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])
    assert not (parts["val"] & parts["test"])
    assert parts["test"] == {str(a) for a in squad_article_split(48)["test"]}


# public files as published, where a copy lies in ../shared/data (exact counts of the published files)
PUBLISHED = [
    ("curatedtrec/large2180-test.tsv", "curatedtrec", 694),  # brmson/dataset-factoid-curated @ 087375a
    ("curatedtrec/large2180-train.tsv", "curatedtrec", 1479),
    ("curatedtrec/curated-test.tsv", "curatedtrec", 430),
    ("curatedtrec/curated-train.tsv", "curatedtrec", 430),
    ("curatedtrec/curated-full.tsv", "curatedtrec", 867),
]


@pytest.mark.parametrize(("name", "fmt", "count"), PUBLISHED)
def test_published_files(shared_data_dir: Path, name: str, fmt: str, count: int) -> None:
    p = _file(shared_data_dir, name)
    qa = read_questions(p)
    assert (qa.name, len(qa), qa.skipped, qa.regex) == (p.stem, count, 0, fmt == "curatedtrec")
