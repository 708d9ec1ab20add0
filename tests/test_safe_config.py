"""A run directory's `.hydra/config.yaml` is data: evaluate.py / export.py build only allowed `_target_`s from it
(rag_lightning/safe_config.py), tested with a hostile run directory."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from rag_lightning.preflight import ConfigError
from rag_lightning.safe_config import check_run_config, package_targets, target_allowed

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = ("data", "retriever", "index", "model", "optimizer", "scheduler", "trainer", "paths")


class Payload:
    """Unpickling it writes `marker` (what `torch.load(weights_only=False)` on a hostile file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def hostile_run(tmp: Path) -> tuple[Path, Path]:
    """A run dir whose config builds the model with `torch.load(weights_only=False)` of a pickle in the run
    folder; returns (checkpoint path, the file the pickle would write)."""
    run, marker = tmp / "run", tmp / "pwned.txt"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    with open(run / "payload.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    cfg = compose_config("retriever=tiny", "model=tiny", root=tmp)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.model = {"_target_": "torch.load", "f": str(run / "payload.pkl"), "weights_only": False}
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt", marker


def test_the_package_own_targets_are_allowed():
    targets = package_targets()
    assert "rag_lightning.module.RagModule" in targets and "torch.optim.AdamW" in targets
    assert all(target_allowed(t) for t in targets)
    for cls in ("torch.optim.SGD", "torch.optim.lr_scheduler.CosineAnnealingLR",
                "lightning.pytorch.callbacks.StochasticWeightAveraging", "lightning.pytorch.strategies.DDPStrategy",
                "lightning.pytorch.loggers.TensorBoardLogger", "rag_lightning.callbacks.RefreshIndex"):  # fmt: skip
        assert target_allowed(cls), cls


@pytest.mark.parametrize(
    "target",
    ["torch.load", "builtins.eval", "builtins.exec", "os.system", "subprocess.run", "pickle.loads",
     "hydra.utils.get_method", "torch.hub.load", "rag_lightning.data.textio.read_lines",
     "rag_lightning.checkpoint_io.os.remove", "torch.nn.Linear", "not_a_module.Thing", "", None, 3],
)  # fmt: skip
def test_anything_else_is_refused(target):
    assert not target_allowed(target)


@pytest.mark.parametrize(
    "where",
    ["model", "model.generator", "trainer.strategy", "data.corpus", "trainer.callbacks[0]", "oc_create"],
)
def test_a_hostile_node_anywhere_is_refused_naming_its_key(tmp_path: Path, where: str):
    cfg = compose_config("retriever=tiny", "model=tiny", root=tmp_path)
    payload = {"_target_": "torch.load", "f": "x.pkl", "weights_only": False}
    with open_dict(cfg):
        if where == "trainer.callbacks[0]":
            cfg.trainer.callbacks = [payload]
        elif where == "oc_create":  # hidden in an interpolation: found after resolving
            cfg.model.generator = "${oc.create:{_target_: os.system, command: touch x}}"
            where = "model.generator"
        else:
            OmegaConf.update(cfg, where, payload, merge=False)
    with pytest.raises(ConfigError, match="^run/config.yaml: " + re.escape(f"{where}._target_='")):
        check_run_config(cfg, RUN_KEYS, "run/config.yaml")
    check_run_config(compose_config("retriever=tiny", "model=tiny", root=tmp_path), RUN_KEYS, "x")  # clean


def test_evaluate_refuses_the_hostile_run_config_in_process(tmp_path: Path):
    from rag_lightning.commands import evaluate as ev

    ckpt, marker = hostile_run(tmp_path)
    cfg = compose_config(f"ckpt_path={ckpt}", config_name="evaluate", root=tmp_path)
    with pytest.raises(ConfigError, match=r"model._target_='torch.load' is not allowed in a run config"):
        ev.apply_run_config(cfg, [])
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluate", "export", "eval_retrieval"])
def test_scripts_refuse_the_hostile_run_dir(tmp_path: Path, script: str):
    """The issue's payload: one line, exit 2, no file written."""
    ckpt, marker = hostile_run(tmp_path)
    args = [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'out'}"]
    if script == "export":
        args.append(f"out={tmp_path / 'gen'}")
    cmd = [sys.executable, "-m", f"rag_lightning.commands.{script}", *args]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not marker.exists()
    assert "model._target_='torch.load' is not allowed in a run config" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "gen").exists()
