"""rag-evaluate: run-config merging (fast), train tiny -> evaluate end to end (slow, subprocesses), and the
Python entry point (RagPipeline) against what rag-evaluate wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_PASSAGES, TINY_QUESTIONS, run_python
from omegaconf import OmegaConf

from rag_lightning.commands import evaluate as ev
from rag_lightning.commands.common import write_atomic
from rag_lightning.commands.run_config import find_run_config, merge_run_config

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["em", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "count"]
ROW_FIELDS = {"question", "answers", "prediction", "passage_ids", "titles", "scores", "em", "f1"}
N_PASSAGES, N_QUESTIONS = TINY_PASSAGES, TINY_QUESTIONS


def test_find_run_config(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model: {}\n")
    assert find_run_config(tmp_path / "checkpoints" / "last.ckpt") == tmp_path / ".hydra" / "config.yaml"
    assert find_run_config(tmp_path / "last.ckpt") == tmp_path / ".hydra" / "config.yaml"
    assert find_run_config(tmp_path / "a" / "b" / "c.ckpt") is None


def test_merge_run_config_user_overrides_win():
    cfg = OmegaConf.create(
        {"data": {"a": 1, "b": 2}, "model": {"x": 1, "y": 1}, "retriever": {"n": 5}, "split": "val"}
    )
    run = OmegaConf.create({"data": {"a": 10, "b": 20}, "model": {"x": 7, "y": 7}, "retriever": {"n": 2}})
    out = merge_run_config(cfg, run, ["data.b=2", "retriever=tiny", "split=val", "model.y=1"])
    assert out.data == {"a": 10, "b": 2}  # run's node, the user's dotted override on top
    assert out.model == {"x": 7, "y": 1}
    assert out.retriever.n == 5  # group chosen by the user: the freshly composed node
    assert out.split == "val"


def test_summarize_clamps_k_and_write_atomic(tmp_path):
    rows = [{"em": 1.0, "f1": 1.0, "recall@1": 0.0, "recall@3": 1.0}, {"em": 0.0, "f1": 0.5, "recall@1": 1.0, "recall@3": 1.0}]  # fmt: skip
    m = ev.summarize(rows, [1, 100], n_passages=3)
    assert m == {"em": 0.5, "f1": 0.75, "recall@1": 0.5, "recall@100": 1.0, "count": 2}
    write_atomic(tmp_path / "m.json", json.dumps(m))
    assert json.loads((tmp_path / "m.json").read_text()) == m
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> tuple[Path, list[str]]:
    return tiny_checkpoint


def _check_outputs(out_dir: Path, n_questions: int) -> None:
    metrics = json.loads((out_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert set(metrics) >= set(KEYS)
    assert metrics["count"] == len(rows) == n_questions
    for row in rows:
        assert set(row) >= ROW_FIELDS
        assert len(row["passage_ids"]) == len(row["titles"]) == len(row["scores"]) == N_PASSAGES
    assert metrics["em"] == pytest.approx(sum(r["em"] for r in rows) / len(rows))
    assert metrics["f1"] == pytest.approx(sum(r["f1"] for r in rows) / len(rows))
    assert metrics["recall@100"] == pytest.approx(sum(r[f"recall@{N_PASSAGES}"] for r in rows) / len(rows))
    assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@20"] <= metrics["recall@100"]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> tuple[Path, str]:
    """`rag-evaluate ckpt_path=...` alone, run from an empty folder: (its output folder, its stdout)."""
    ckpt, _ = trained
    cwd = tmp_path_factory.mktemp("evaluate")
    # model / retriever / data come from the run's .hydra/config.yaml; lift its max_eval_examples=4
    args = ["-m", "rag_lightning.commands.evaluate", f"ckpt_path={ckpt}", "data.max_eval_examples=null"]
    proc = run_python(args, cwd=cwd)
    (out,) = cwd.glob("logs/evaluate/runs/*")  # outputs under logs/<command>/runs/<date_time>
    return out, proc.stdout


@pytest.mark.slow
def test_evaluate_with_run_config(evaluated):
    out, stdout = evaluated
    _check_outputs(out, N_QUESTIONS)
    assert "recall@100" in stdout and f"results: {out / 'results.json'}" in stdout


@pytest.mark.slow
def test_pipeline_answers_and_retrieves_as_rag_evaluate(trained, evaluated, tmp_path, monkeypatch):
    """`RagPipeline.from_checkpoint(ckpt).answer(questions)` gives rag-evaluate's predictions; `retrieve` its
    top passages (id, title, text, score); nothing is written where it runs."""
    from rag_lightning import RagPipeline

    out, _ = evaluated
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in rows]
    monkeypatch.chdir(tmp_path)
    pipe = RagPipeline.from_checkpoint(str(trained[0]))
    assert pipe.answer(questions) == [r["prediction"] for r in rows]
    found = pipe.retrieve(questions, k=N_PASSAGES)  # the k rag-evaluate searched: the same search
    assert len(found) == len(rows)
    for row, passages in zip(rows, found):
        assert [p["id"] for p in passages] == row["passage_ids"]
        assert [p["title"] for p in passages] == row["titles"]
        assert [p["score"] for p in passages] == pytest.approx(row["scores"], abs=1e-3)
        assert all(set(p) == {"id", "title", "text", "score"} and p["text"] for p in passages)
    top = pipe.retrieve(questions[:1], k=5)[0]
    assert len(top) == 5 and [p["score"] for p in top] == sorted((p["score"] for p in top), reverse=True)
    assert len(pipe.retrieve(questions[:1], k=100)[0]) == N_PASSAGES  # k beyond the corpus: all of it
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_evaluate_with_explicit_overrides_val_split(trained, tmp_path):
    ckpt, common = trained
    run_python(
        ["-m",
            "rag_lightning.commands.evaluate", f"ckpt_path={ckpt}", "use_run_config=false", "split=val",
         "data.max_eval_examples=3", f"hydra.run.dir={tmp_path}", *common]
    )  # fmt: skip
    _check_outputs(tmp_path, 3)
    assert json.loads((tmp_path / "results.json").read_text())["split"] == "val"
