"""Every debug preset on every shipped model config: composes, runs where the weights are available offline
(demo, tiny), and `model.retriever_start_step` beyond the run is one warning when the config is built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import compose_config
from hydra.utils import instantiate

from rag_lightning import preflight

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "debug").glob("*.yaml"))
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
TINY = ["retriever=tiny", "model=tiny", "data.max_train_examples=8", "data.max_eval_examples=4",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "_warned", set())  # each test sees its own warnings


def test_the_presets_and_models_exist():
    assert {"fdr", "limit", "overfit"} <= set(PRESETS)
    assert {"demo", "tiny", "bart_large", "llm"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_on_every_model(tmp_path: Path, preset: str, model: str, caplog):
    """The preset fixes the run's length from the config alone; a retriever that would start after the run
    ends is a warning naming model.retriever_start_step, not the schedule's error after the corpus is embedded."""
    cfg = compose_config(f"model={model}", f"debug={preset}", root=tmp_path)
    steps, key = preflight.run_length(cfg.trainer)
    assert steps >= 1 and key.startswith("trainer.")
    with caplog.at_level(logging.WARNING, logger="rag_lightning.preflight"):
        preflight.check_run(cfg)
    start = cfg.model.get("retriever_start_step") or 0
    warned = [r.getMessage() for r in caplog.records if "retriever_start_step" in r.getMessage()]
    if start >= steps:
        assert len(warned) == 1 and f"model.retriever_start_step={start} >= the {steps} " in warned[0]
        assert "never trains" in warned[0] and key in warned[0]
    else:
        assert warned == []


def test_the_warning_is_said_once_and_only_when_the_run_is_too_short(tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="rag_lightning.preflight"):
        preflight.check_run(
            compose_config("model.retriever_start_step=6", "trainer.max_steps=7", root=tmp_path)
        )
        assert not caplog.records
        cfg = compose_config("model.retriever_start_step=7", "trainer.max_steps=7", root=tmp_path)
        preflight.check_run(cfg)
        preflight.check_run(cfg)  # the entry point and train() both check: said once
        preflight.check_run(compose_config("debug=fdr", "train=false", root=tmp_path))  # nothing trains
    assert len(caplog.records) == 1
    unknown = compose_config("model.retriever_start_step=100", "trainer.max_steps=-1", root=tmp_path)
    assert preflight.run_length(unknown.trainer) is None  # length from the data: RagModule checks it


def test_rag_module_warns_and_keeps_the_retriever_at_lr_zero(cfg_factory, caplog):
    """The data-dependent length (max_steps=-1, max_epochs): configure_optimizers warns, the schedule runs."""
    cfg = cfg_factory("retriever=tiny", "model=tiny", "model.retriever_start_step=10")
    module = instantiate(cfg.model)
    module._trainer = SimpleNamespace(estimated_stepping_batches=5)
    with caplog.at_level(logging.WARNING, logger="rag_lightning.preflight"):
        out = module.configure_optimizers()
    assert any("model.retriever_start_step=10 >= the 5 " in r.getMessage() for r in caplog.records)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    for _ in range(5):
        opt.step()
        sched.step()
        assert all(g["lr"] == 0 for g in opt.param_groups if g["name"].startswith("retriever"))


def _train(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"paths.cache_dir={cache}"]
    env = {"OMP_WAIT_POLICY": "PASSIVE", "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fdr", "limit"])
def test_demo_debug_preset_finishes(tmp_path: Path, cache: Path, preset: str):
    """`python train.py debug=fdr` / `debug=limit` on the default (demo) config: the retriever's start step
    (100) is beyond the run, said before the data is built, and the run finishes."""
    proc = _train([f"debug={preset}"], tmp_path, cache)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "rag-lightning run summary" in out
    warning = out.index("model.retriever_start_step=100 >= the ")
    assert warning < out.index("datamodule <")  # checked when the config is built


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_debug_preset_finishes(tmp_path: Path, preset: str, capsys):
    """In process (train() as the app calls it): tiny models, each preset as shipped (overfit cut to 3 steps)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from rag_lightning.train import train

    short = (
        ["trainer.max_steps=3"] if preset == "overfit" else []
    )  # overfit's 100 steps are not the point here
    cfg = compose_config(*TINY, "logger=csv", f"debug={preset}", *short, root=tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        del cfg["hydra"]
    train(cfg)
    assert "rag-lightning run summary" in capsys.readouterr().out
