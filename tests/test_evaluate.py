"""scripts/evaluate.py: run-config merging (fast) and train tiny -> evaluate end to end (slow, subprocesses)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "rag_lightning" / "assets" / "squad_demo"
KEYS = ["em", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "count"]
ROW_FIELDS = {"question", "answers", "prediction", "passage_ids", "titles", "scores", "em", "f1"}
N_PASSAGES, N_QUESTIONS = 24, 6  # a corpus smaller than 100: recall@100 is over all 24 passages


def _load_script():
    spec = importlib.util.spec_from_file_location("rag_evaluate_script", ROOT / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ev = _load_script()


def test_find_run_config(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model: {}\n")
    assert ev.find_run_config(tmp_path / "checkpoints" / "last.ckpt") == tmp_path / ".hydra" / "config.yaml"
    assert ev.find_run_config(tmp_path / "last.ckpt") == tmp_path / ".hydra" / "config.yaml"
    assert ev.find_run_config(tmp_path / "a" / "b" / "c.ckpt") is None


def test_merge_run_config_user_overrides_win():
    cfg = OmegaConf.create(
        {"data": {"a": 1, "b": 2}, "model": {"x": 1, "y": 1}, "retriever": {"n": 5}, "split": "val"}
    )
    run = OmegaConf.create({"data": {"a": 10, "b": 20}, "model": {"x": 7, "y": 7}, "retriever": {"n": 2}})
    out = ev.merge_run_config(cfg, run, ["data.b=2", "retriever=tiny", "split=val", "model.y=1"])
    assert out.data == {"a": 10, "b": 2}  # run's node, the user's dotted override on top
    assert out.model == {"x": 7, "y": 1}
    assert out.retriever.n == 5  # group chosen by the user: the freshly composed node
    assert out.split == "val"


def test_summarize_clamps_k_and_write_atomic(tmp_path):
    rows = [{"em": 1.0, "f1": 1.0, "recall@1": 0.0, "recall@3": 1.0}, {"em": 0.0, "f1": 0.5, "recall@1": 1.0, "recall@3": 1.0}]  # fmt: skip
    m = ev.summarize(rows, [1, 100], n_passages=3)
    assert m == {"em": 0.5, "f1": 0.75, "recall@1": 0.5, "recall@100": 1.0, "count": 2}
    ev.write_atomic(tmp_path / "m.json", json.dumps(m))
    assert json.loads((tmp_path / "m.json").read_text()) == m
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}  # scripts/ import this checkout
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model trained 2 steps on a 24-passage corpus; returns (checkpoint, shared overrides)."""
    tmp = tmp_path_factory.mktemp("eval")
    corpus, questions = tmp / "passages.jsonl", tmp / "questions.jsonl"
    corpus.write_text("".join((DEMO / "passages.jsonl").read_text().splitlines(True)[:N_PASSAGES]))
    questions.write_text("".join((DEMO / "test.jsonl").read_text().splitlines(True)[:N_QUESTIONS]))
    data = [f"data.corpus.path={corpus}"] + [
        f"data.{s}_sets.0.path={questions}" for s in ("train", "val", "test")
    ]
    common = [
        "retriever=tiny",
        "model=tiny",
        *data,
        f"paths.log_dir={tmp}",
        f"paths.cache_dir={tmp / 'cache'}",
    ]
    _run(
        ["train.py", *common, "data.max_train_examples=8", "data.max_eval_examples=4", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "validate_before_fit=false", "test=false",
         "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "logger=csv"]
    )  # fmt: skip
    (ckpt,) = tmp.glob("train/runs/*/checkpoints/last.ckpt")
    return ckpt, common


def _check_outputs(out_dir: Path, n_questions: int) -> None:
    metrics = json.loads((out_dir / "metrics.json").read_text())
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


@pytest.mark.slow
def test_evaluate_with_run_config(trained, tmp_path):
    ckpt, _ = trained
    # model / retriever / data come from the run's .hydra/config.yaml; lift its max_eval_examples=4
    proc = _run(
        [
            "scripts/evaluate.py",
            f"ckpt_path={ckpt}",
            f"hydra.run.dir={tmp_path}",
            "data.max_eval_examples=null",
        ]
    )
    _check_outputs(tmp_path, N_QUESTIONS)
    assert "recall@100" in proc.stdout


@pytest.mark.slow
def test_evaluate_with_explicit_overrides_val_split(trained, tmp_path):
    ckpt, common = trained
    _run(
        ["scripts/evaluate.py", f"ckpt_path={ckpt}", "use_run_config=false", "split=val",
         "data.max_eval_examples=3", f"hydra.run.dir={tmp_path}", *common]
    )  # fmt: skip
    _check_outputs(tmp_path, 3)
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "val"
