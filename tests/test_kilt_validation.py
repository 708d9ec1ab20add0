"""KILT scores at validation: a KILT set over the knowledge source logs val/KILT-em, val/kilt_rprec, ... equal to
rag-eval-kilt on the KILT-format predictions of the same evaluation (tiny models, answers fixed per example)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from rag_lightning.tasks.base import build_task
from rag_lightning.tasks.kilt import evaluate_files, metric_names

ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["lions", "tigers", "rivers", "mountains", "oceans", "deserts"]


def _pages() -> list[dict]:
    return [
        {
            "wikipedia_id": str(100 + i),
            "wikipedia_title": t.title(),
            "text": [f"{t.title()}\n", f"{t} are a topic . " * 30 + "\n", f"more about {t} " * 40 + "\n"],
        }
        for i, t in enumerate(TOPICS)
    ]


def _records() -> list[dict]:
    def rec(i: int, answer: str, pages: list[list[int]]) -> dict:
        outs = [{"answer": answer, "provenance": [{"wikipedia_id": str(100 + p), "title": "x"} for p in ps]}
                for ps in pages]  # fmt: skip
        return {"id": f"q{i}", "input": f"what about {TOPICS[i % 6]} number {i}?", "output": outs}

    return [
        rec(0, "Paris", [[0]]),
        rec(1, "the Nile", [[2], [1, 3]]),
        rec(2, "Everest", [[3]]),
        rec(3, "SUPPORTS", [[4, 5]]),
        rec(4, "sand dunes", [[5]]),
    ]


ANSWERS = {"q0": "paris", "q1": "Nile", "q2": "K2", "q3": "SUPPORTS", "q4": ""}  # the "generated" answers
LABELS = ["task=classification", "task.labels=[SUPPORTS,REFUTES]"]


def _fever(records: list[dict]) -> list[dict]:
    for i, r in enumerate(records):
        for o in r["output"]:
            o["answer"] = ["SUPPORTS", "REFUTES"][i % 2]
    return records


def _evaluate_script():
    from rag_lightning.commands import evaluate

    return evaluate


@pytest.fixture(params=["qa", "generation", "classification"])
def kilt_run(request, tmp_path: Path):
    ks, gold = tmp_path / "kilt_knowledgesource.json", tmp_path / "x-dev-kilt.jsonl"
    ks.write_text("".join(json.dumps(p) + "\n" for p in _pages()))
    records = _fever(_records()) if request.param == "classification" else _records()
    gold.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = LABELS if request.param == "classification" else [f"task={request.param}"]
    cfg = compose_config(
        "retriever=tiny", "model=tiny", f"data.train_sets=[{gold}]", f"data.val_sets=[{gold}]",
        "data.test_sets=[]", f"data.corpus={ks}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.root_dir={tmp_path}", "data.eval_batch_size=2", "model.eval_ks=[1,3]", "retriever.n_docs=2", *task,
    )  # fmt: skip
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("validate")
    model = instantiate(cfg.model)
    model.corpus = dm.corpus
    model.generate = lambda batch, *a, **k: [ANSWERS[i] for i in batch["ids"]]
    return dm, model, gold, request.param


def test_validation_logs_kilt_scores_equal_to_rag_eval_kilt(kilt_run, tmp_path: Path):
    dm, model, gold, task = kilt_run
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    logged = trainer.validate(model, datamodule=dm, verbose=False)[0]
    rows = []
    model.eval()
    with torch.no_grad():  # the rows rag-evaluate gets from trainer.predict
        for batch in dm.val_dataloader():
            rows += [{"set": "x", **r} for r in model.predict_step(batch, 0)]
    (guess,) = _evaluate_script().write_kilt_predictions(rows, ["x"], tmp_path)
    assert guess.name == "kilt_predictions.jsonl"
    first = json.loads(guess.read_text().splitlines()[0])
    pages = [p["wikipedia_id"] for p in first["output"][0]["provenance"]]
    assert (
        pages == list(dict.fromkeys(rows[0]["page_ids"])) and len(rows[0]["page_ids"]) == 3
    )  # kmax passages
    want = evaluate_files(guess, gold)
    flat = {f"kilt_{k}": v for k, v in want["downstream"].items()} | want["kilt"]
    flat |= {"kilt_rprec": want["retrieval"]["Rprec"], "kilt_recall@5": want["retrieval"]["recall@5"]}
    assert set(flat) | {"kilt_recall@1", "kilt_recall@3"} == set(metric_names([1, 3]))
    assert logged["val/kilt_recall@1"] <= logged["val/kilt_recall@3"] <= logged["val/kilt_recall@5"]
    for name, value in flat.items():
        assert logged[f"val/{name}"] == pytest.approx(value, abs=1e-6), name
    if task != "classification":  # (classification predicts by scoring the labels, not by generate)
        assert want["downstream"]["em"] == pytest.approx(3 / 5)  # paris, Nile, SUPPORTS: the fixed answers
        assert want["downstream"]["accuracy"] == pytest.approx(1 / 5)
    assert logged[f"val/{model.task.monitor}"] >= 0  # the task's own metric beside KILT's


def test_no_kilt_scores_without_provenance_or_pages(kilt_run):
    dm, model, _, _ = kilt_run
    batch = next(iter(dm.val_dataloader()))
    task, ids = build_task("qa"), torch.zeros(2, 3, dtype=torch.long)
    assert set(task.provenance_metrics(dm.corpus, batch, ids, ["a", "b"], [1])) == set(metric_names([1]))
    assert task.provenance_metrics(dm.corpus, {**batch, "provenance": [[], []]}, ids, ["a", "b"]) == {}

    class NoPages:
        has_pages = False

    assert task.provenance_metrics(NoPages(), batch, ids, ["a", "b"]) == {}


@pytest.mark.slow
def test_train_evaluate_and_rag_eval_kilt_end_to_end(tmp_path: Path):
    """train.py (2 steps, tiny) -> rag-evaluate writes kilt_predictions.jsonl -> rag-eval-kilt scores it;
    its KILT scores equal the means evaluate.py reports (every example has provenance)."""
    ks, gold = tmp_path / "kilt_knowledgesource.json", tmp_path / "nq-dev-kilt.jsonl"
    ks.write_text("".join(json.dumps(p) + "\n" for p in _pages()))
    gold.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    common = ["retriever=tiny", "model=tiny", f"data.train_sets=[{gold}]", f"data.val_sets=[{gold}]",
              "data.test_sets=[]", f"data.corpus={ks}", f"paths.log_dir={tmp_path}",
              f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip

    def run(*args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    run("train.py", *common, "trainer.max_steps=2", "trainer.val_check_interval=2", "validate_before_fit=false",
        "test=false", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "logger=csv")  # fmt: skip
    (ckpt,) = tmp_path.glob("train/runs/*/checkpoints/last.ckpt")
    out = tmp_path / "eval"
    run("-m", "rag_lightning.commands.evaluate", f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={out}")
    scores = json.loads(run("-m", "rag_lightning.eval_kilt", str(out / "kilt_predictions.jsonl"), str(gold)))
    means = json.loads((out / "results.json").read_text())
    assert means["KILT-em"] == pytest.approx(scores["kilt"]["KILT-em"])
    assert means["kilt_f1"] == pytest.approx(scores["downstream"]["f1"])
    assert means["kilt_rprec"] == pytest.approx(scores["retrieval"]["Rprec"])
    assert means["kilt_recall@5"] == pytest.approx(scores["retrieval"]["recall@5"])
    assert means["em"] == pytest.approx(scores["downstream"]["em"])  # the QA task's EM is KILT's
