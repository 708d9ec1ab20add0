"""The bundled demo_longform / demo_verify sets: split by article, balanced, and what
``scripts/make_demo_data.py --tasks`` writes from squad_demo."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "rag_lightning" / "assets"
sys.path.insert(0, str(ROOT / "scripts"))

from _task_demos import TEST_ARTICLE, VAL_ARTICLE, article, build_task_demos  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("demo", ["demo_longform", "demo_verify"])
def test_task_demos_are_split_by_article(demo):
    splits = {s: _rows(ASSETS / demo / f"{s}.jsonl") for s in ("train", "val", "test")}
    articles = {s: {article(r) for r in rows} for s, rows in splits.items()}
    assert articles["val"] == {VAL_ARTICLE} and articles["test"] == {TEST_ARTICLE}
    assert not articles["train"] & {VAL_ARTICLE, TEST_ARTICLE} and len(articles["train"]) == 4
    assert len(splits["val"]) == len(splits["test"]) == 100
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))  # a question in one split only
    if demo == "demo_verify":
        for rows in splits.values():
            assert abs(sum(r["label"] == "SUPPORTS" for r in rows) - len(rows) / 2) <= 0.5


def test_bundled_task_demos_are_what_the_script_writes(tmp_path):
    shutil.copytree(ASSETS / "squad_demo", tmp_path / "squad_demo")
    build_task_demos(tmp_path)
    for demo in ("demo_longform", "demo_verify"):
        for split in ("train", "val", "test"):
            name = f"{demo}/{split}.jsonl"
            assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
