"""Hydra multirun: basic launcher (one dir, csv log and return value per job), Optuna, SLURM config."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["retriever=tiny", "model=tiny", "data.max_train_examples=8", "data.max_eval_examples=4",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "validate_before_fit=false", "test=false",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]  # fmt: skip
# pickles each job's return value to <job dir>/.hydra/job_return.pickle
JOB_INFO = "+hydra.callbacks.job_info._target_=hydra.experimental.callbacks.PickleJobInfoCallback"


def offline_env(tmp: Path) -> dict[str, str]:
    """W&B offline, with its caches under tmp (tests write nothing outside tmp_path)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    # OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads make torch ~10x slower on a busy 2-core machine
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1", OMP_WAIT_POLICY="PASSIVE")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb_home" / var.lower())
    return env


def run_train(
    args: list[str], tmp: Path, cache_dir: Path | None = None, timeout: int = 300, tiny: bool = True
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` (with tiny models unless tiny=False), run from tmp: paths.root_dir is tmp, so the
    default paths put every output under tmp (logs/, .cache/); no hydra.sweep.dir nor paths.log_dir is passed,
    as in the README's commands."""
    flags = [a for a in args if a.startswith("-")]  # -m must come before the overrides
    args = [a for a in args if not a.startswith("-")]
    cache = [f"paths.cache_dir={cache_dir}"] if cache_dir is not None else []
    cmd = [sys.executable, str(ROOT / "train.py"), *flags, *(TINY if tiny else []), *cache, *args]
    return subprocess.run(cmd, cwd=tmp, env=offline_env(tmp), capture_output=True, text=True, timeout=timeout)


def sweep_dirs(tmp: Path, task: str = "train") -> list[Path]:
    """The multirun folders the default `hydra.sweep.dir` made under tmp, oldest first."""
    return sorted((tmp / "logs" / task / "multiruns").iterdir())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized corpus cache shared by the sweeps of this module."""
    return tmp_path_factory.mktemp("cache")


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_readme_multirun_from_a_fresh_cwd(tmp_path: Path):
    """The issue's command as is: no hydra.sweep.dir, no paths overrides (the sweep dir resolves through
    paths.log_dir -> paths.root_dir before Hydra sets its runtime config)."""
    args = ["-m", "model=tiny", "retriever=tiny", "debug=fdr", "model.variant=token,sequence"]
    proc = run_train(args, tmp_path, tiny=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HydraConfig was not set" not in proc.stderr
    (sweep,) = sweep_dirs(tmp_path, "debug")
    jobs = job_dirs(sweep)
    variants = [yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["model"]["variant"] for j in jobs]
    assert variants == ["token", "sequence"]
    assert (tmp_path / ".cache" / "rag_lightning").is_dir()  # paths.cache_dir under the launch dir


@pytest.mark.slow
def test_basic_multirun_two_jobs(tmp_path: Path, cache_dir: Path):
    proc = run_train(["-m", "model.variant=token,sequence", "logger=csv", JOB_INFO], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    assert (sweep / "multirun.yaml").is_file()
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    variants = []
    for job in jobs:
        variants.append(yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["variant"])
        with open(job / "csv" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert any(r.get("val/em") not in (None, "") for r in rows)
        with open(job / ".hydra" / "job_return.pickle", "rb") as f:
            ret = pickle.load(f)
        assert isinstance(ret.return_value, float) and 0.0 <= ret.return_value <= 1.0  # val/em
    assert variants == ["token", "sequence"]


@pytest.mark.slow
def test_optuna_two_trials_then_the_study_resumes(tmp_path: Path, cache_dir: Path):
    """Two trials in a SQLite study; a second multirun with the same study_name + storage adds a third."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "hparams_search=optuna",
        "logger=csv",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=t",
    ]
    for launch, n_trials in enumerate((2, 1)):  # the README's command, then the same again: the study resumes
        proc = run_train(["-m", *args, f"hydra.sweeper.n_trials={n_trials}"], tmp_path, cache_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        sweeps = sweep_dirs(tmp_path)
        assert len(sweeps) == launch + 1  # each launch its own sweep dir (named by its start time)
        sweep = sweeps[-1]
        assert len(job_dirs(sweep)) == n_trials
        results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
        assert results["name"] == "optuna"
        assert set(results["best_params"]) == {
            "optimizer.lr", "retriever.n_docs", "model.label_smoothing", "scheduler.num_warmup_steps",
        }  # fmt: skip
        assert 0.0 <= results["best_value"] <= 1.0
        assert 1e-5 <= results["best_params"]["optimizer.lr"] <= 1e-3
    study = optuna.load_study(study_name="t", storage=storage)
    assert [(t.number, t.state.name) for t in study.trials] == [(i, "COMPLETE") for i in range(3)]
    assert results["n_trials"] == 3 and results["best_value"] == study.best_value
    # the resumed trial ran with its own sampled params
    job = yaml.safe_load((sweep / "0" / ".hydra" / "config.yaml").read_text())
    assert job["optimizer"]["lr"] == pytest.approx(study.trials[2].params["optimizer.lr"])


def test_optuna_config(cfg_factory):
    cfg = cfg_factory("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert (
        sweeper._target_ == "hydra_plugins.rag_lightning_sweeper.OptunaSweeper"
        and sweeper.direction == "maximize"
    )
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == cfg.seed
    assert cfg.optimized_metric == "val/em" and sweeper.n_trials > 0
    assert set(sweeper.params) == {
        "optimizer.lr", "retriever.n_docs", "model.label_smoothing", "scheduler.num_warmup_steps",
    }  # fmt: skip
    assert sweeper.params["optimizer.lr"].startswith("tag(log, interval(")


def test_slurm_launcher_composes_without_submitting(tmp_path: Path, cfg_factory):
    cfg = cfg_factory("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=4",
                      "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4  # one DDP rank per GPU
    assert launcher.nodes == cfg.trainer.num_nodes == 1
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    assert launcher.cpus_per_task > 0 and launcher.mem_gb > 0
    assert launcher.submitit_folder.startswith(str(tmp_path))


def test_slurm_launcher_renders_sbatch_script(tmp_path: Path, cfg_factory):
    """The launcher's params go through submitit as-is (no typo'd keys) into a one-rank-per-GPU sbatch script."""
    from unittest import mock

    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    cfg = cfg_factory("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=2",
                      f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    params = dict(instantiate(cfg.hydra.launcher).params)  # what SlurmLauncher.launch hands to submitit
    with mock.patch.object(SlurmExecutor, "affinity", return_value=1):  # pretend srun exists
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))  # fmt: skip
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = _make_sbatch_string(command="python -m submitit.core._submit x", folder=str(tmp_path),
                                 **executor._executor.parameters)  # fmt: skip
    for line in ("--gpus-per-node=2", "--ntasks-per-node=2", "--nodes=1", "--cpus-per-task=8", "--mem=64GB"):
        assert f"#SBATCH {line}" in script
    assert "\nsrun " in script


def test_sweep_dir_resolves_before_hydra_sets_its_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What a multirun and the submitit launcher read first, with no HydraConfig set and no paths overrides:
    hydra.sweep.dir and the launcher's folder resolve under the launch dir."""
    from conftest import compose_config
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=4")
    assert not HydraConfig.initialized()
    sweep = Path(cfg.hydra.sweep.dir)
    assert sweep.parent == tmp_path / "logs" / "train" / "multiruns"
    assert cfg.hydra.launcher.submitit_folder == f"{sweep}/.submitit/%j"
    assert cfg.paths.cache_dir == str(tmp_path / ".cache" / "rag_lightning")
