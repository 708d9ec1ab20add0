"""`+experiment=kilt_*` compose onto the KILT files under ${paths.data_dir}/kilt/, and without them stop before
anything is built, with the preflight message naming every missing file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR

from rag_lightning.preflight import data_files, files_problem

ROOT = Path(__file__).resolve().parents[1]
KILT_EXPERIMENTS = {
    "kilt_nq": "nq",
    "kilt_fever": "fever",
    "kilt_eli5": "eli5",
    "kilt_wow": "wow",
    "kilt_triviaqa": "triviaqa",
    "kilt_hotpotqa": "hotpotqa",
    "kilt_zsre": "structured_zeroshot",
    "kilt_trex": "trex",
    "kilt_aidayago2": "aidayago2",
}


def test_the_kilt_experiments_exist():
    assert set(KILT_EXPERIMENTS) <= {p.stem for p in (CONF_DIR / "experiment").glob("kilt_*.yaml")}


@pytest.mark.parametrize("exp", sorted(KILT_EXPERIMENTS))
def test_kilt_experiment_names_its_files(exp, cfg_factory, tmp_path):
    cfg = cfg_factory(f"+experiment={exp}", f"paths.data_dir={tmp_path}")
    stem = KILT_EXPERIMENTS[exp]
    assert dict(data_files(cfg.data)) == {
        "data.train_sets[0]": f"{tmp_path}/kilt/{stem}-train-kilt.jsonl",
        "data.val_sets[0]": f"{tmp_path}/kilt/{stem}-dev-kilt.jsonl",
        "data.corpus": f"{tmp_path}/kilt/kilt_knowledgesource.json",
    }
    msg = files_problem(data_files(cfg.data))
    assert f"{stem}-train-kilt.jsonl" in msg and "kilt_knowledgesource.json" in msg and "docs/kilt.md" in msg


@pytest.mark.slow
def test_offline_without_files_stops_at_once_naming_them(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "train.py", "+experiment=kilt_eli5", f"paths.data_dir={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    for name in ("eli5-train-kilt.jsonl", "eli5-dev-kilt.jsonl", "kilt_knowledgesource.json"):
        assert f"{tmp_path}/kilt/{name}" in proc.stderr
    assert proc.stderr.startswith("error: ") and "missing data file(s):" in proc.stderr
    assert "Traceback" not in proc.stderr
