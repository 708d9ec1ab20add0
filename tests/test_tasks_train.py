"""Each task trains a few steps end to end with tiny models and logs its metrics (both marginals, both
generator kinds); the demo experiments compose; bad task input stops with one line and exit code 2."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import run_cfg

from rag_lightning.train import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false"]


def _logged(cfg) -> dict[str, float]:
    (path,) = Path(cfg.paths.output_dir).rglob("metrics.csv")
    out: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


GENERATORS = {"seq2seq": "tiny:bart", "causal": "tiny:gpt2"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_generation_task_trains_and_logs_its_metrics(tmp_path, variant, kind):
    cfg = run_cfg(tmp_path, ["+experiment=demo_longform", "retriever=tiny", "model=tiny", *STEPS,
                             f"model.variant={variant}", f"model.generator.name_or_path={GENERATORS[kind]}",
                             "model.decoding.max_length=8", "model.decoding.no_repeat_ngram_size=2"])  # fmt: skip
    metric = train(cfg)
    logged = _logged(cfg)
    for name in (
        "val/rougeL",
        "val/bleu",
        "val/bleu1",
        "val/chrf",
        "val/f1",
        "val/gold_recall@1",
        "val/rprec",
    ):
        assert 0.0 <= logged[name] <= 1.0, name
    assert "val/em" not in logged and "val/recall@1" not in logged  # no answer string in this task
    assert metric == logged["val/rougeL"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_classification_task_trains_and_logs_its_metrics(tmp_path, variant, kind, caplog):
    cfg = run_cfg(tmp_path, ["+experiment=demo_verify", "retriever=tiny", "model=tiny", *STEPS,
                             f"model.variant={variant}", f"model.generator.name_or_path={GENERATORS[kind]}"])  # fmt: skip
    with caplog.at_level("INFO", logger="rag_lightning.tasks.classification"):
        metric = train(cfg)
    logged = _logged(cfg)
    for name in ("val/accuracy", "val/macro_f1", "val/gold_recall@1", "val/rprec"):
        assert 0.0 <= logged[name] <= 1.0, name
    assert metric == logged["val/accuracy"]
    assert "val confusion matrix" in caplog.text and "SUPPORTS" in caplog.text


def _cli(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", "retriever=tiny", "model=tiny", f"paths.output_dir={tmp_path}/out",
            f"hydra.run.dir={tmp_path}/run", "trainer.max_steps=1", *overrides]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_label_outside_the_set_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "v.jsonl"
    bad.write_text('{"input": "a b", "label": "SUPPORTS"}\n{"input": "c d", "label": "MAYBE"}\n')
    proc = _cli("+experiment=demo_verify", f"data.train_sets=[{bad}]", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"{bad}:2: field 'label'" in line and "MAYBE" in line
