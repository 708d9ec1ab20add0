"""rag_lightning/sweeper.py: search-space syntax, override formatting, and the ask/launch/tell loop with a
stand-in launcher (the real multirun, with SQLite storage and resume, is in test_sweeps.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

optuna = pytest.importorskip("optuna")
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402

from rag_lightning.sweeper import OptunaSweeper, format_value, search_space  # noqa: E402


def test_search_space_syntax():
    space, fixed = search_space([
        "optimizer.lr=tag(log, interval(1e-5, 1e-3))", "retriever.n_docs=choice(2, 4, 8)",
        "model.label_smoothing=interval(0.0, 0.2)", "+steps=range(0, 100, 20)", "k=tag(int, interval(1, 5))",
        "f=range(0, 1, 0.25)", "model.variant=token,sequence", "model=tiny", "seed=1",
    ])  # fmt: skip
    assert space == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "retriever.n_docs": CategoricalDistribution((2, 4, 8)),
        "model.label_smoothing": FloatDistribution(0.0, 0.2),
        "+steps": IntDistribution(0, 80, step=20),  # range() excludes its stop, as Python's does
        "k": IntDistribution(1, 5),
        "f": FloatDistribution(0.0, 0.75, step=0.25),
        "model.variant": CategoricalDistribution(("token", "sequence")),
    }
    assert fixed == ["model=tiny", "seed=1"]
    space, fixed = search_space(["a=choice(1, 2)", "a=3"])  # the later override (command line) wins
    assert space == {} and fixed == ["a=3"]


@pytest.mark.parametrize(
    "override, match",
    [
        ("a=range(5, 1)", "empty"),
        ("a=choice([1, 2], [3])", "numbers, strings"),
        ("a=glob(*)", "interval, range"),
    ],
)
def test_search_space_errors_name_the_key(override: str, match: str):
    with pytest.raises(ValueError, match=f"^a: .*{match}"):
        search_space([override])


@pytest.mark.parametrize(
    "value", [None, True, False, 3, -2, 1e-05, 0.1, "token", "a b", "it's", "x,y", "p/q.r"]
)
def test_format_value_round_trips_through_hydra(value):
    (parsed,) = OverridesParser.create().parse_overrides([f"key={format_value(value)}"])
    assert parsed.value() == value and type(parsed.value()) is type(value)


class FakeLauncher:
    """Runs each job in-process: its value is `objective(params)`; records the batches."""

    def __init__(self, objective):
        self.objective, self.batches = objective, []

    def launch(self, job_overrides, initial_job_idx):
        self.batches.append([list(o) for o in job_overrides])
        returns = []
        for overrides in job_overrides:
            params = {
                o.get_key_element(): o.value() for o in OverridesParser.create().parse_overrides(overrides)
            }
            try:
                ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED, working_dir="job")
                ret.return_value = self.objective(params)
            except Exception as e:
                ret.status, ret.return_value = JobStatus.FAILED, e
            returns.append(ret)
        return returns


def make_sweeper(
    tmp_path: Path, objective, n_trials: int, n_jobs: int = 1, sweep: str = "sweep", storage=None
) -> OptunaSweeper:
    sweeper = OptunaSweeper(
        direction="maximize", n_trials=n_trials, n_jobs=n_jobs, study_name="rag",
        storage=storage or f"sqlite:///{tmp_path / 'optuna.db'}",
        sampler=OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 3, "n_startup_trials": 10}),
        params=OmegaConf.create({"x": "interval(0, 1)", "n": "choice(1, 2, 4)"}),
    )  # fmt: skip
    # what setup() would give: the job config (for the sweep dir) and the launcher
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / sweep)}}})
    sweeper.launcher = FakeLauncher(objective)
    sweeper.validate_batch_is_legal = lambda batch: (
        None
    )  # needs Hydra's config loader; the jobs here are fake
    return sweeper


def objective(params):
    return -((params["x"] - 0.3) ** 2) + 0.01 * params["n"]


def test_batches_fixed_overrides_results_and_resume(tmp_path: Path):
    first = make_sweeper(tmp_path, objective, n_trials=5, n_jobs=2)
    first.sweep(["model=tiny"])
    assert [len(b) for b in first.launcher.batches] == [2, 2, 1]
    assert all(job[0] == "model=tiny" and len(job) == 3 for b in first.launcher.batches for job in b)
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    study = optuna.load_study(study_name="rag", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    values = [t.value for t in study.trials]
    assert results["n_trials"] == 5 and results["best_value"] == max(values)
    assert results["best_params"] == study.trials[values.index(max(values))].params

    second = make_sweeper(tmp_path, objective, n_trials=2, sweep="sweep2")  # same study_name + storage
    second.sweep(["model=tiny"])
    study = optuna.load_study(study_name="rag", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.number for t in study.trials] == list(range(7))
    assert yaml.safe_load((tmp_path / "sweep2" / "optimization_results.yaml").read_text())["n_trials"] == 7
    old = [t.params for t in study.trials[:5]]
    assert all(t.params not in old for t in study.trials[5:])  # the sampler's seed moved on: no replay


def test_a_failed_trial_is_recorded_and_stops_the_sweep(tmp_path: Path):
    def flaky(params):
        if params["n"] == 4:
            raise RuntimeError("CUDA out of memory")
        return objective(params)

    sweeper = make_sweeper(tmp_path, flaky, n_trials=20)
    with pytest.raises(RuntimeError, match="out of memory"):
        sweeper.sweep([])
    study = optuna.load_study(study_name="rag", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states[-1] == "FAIL" and set(states[:-1]) <= {"COMPLETE"}


def test_a_job_returning_none_fails(tmp_path: Path):
    with pytest.raises(ValueError, match="returned None"):
        make_sweeper(tmp_path, lambda params: None, n_trials=1).sweep([])


def test_storage_given_as_a_config_node(tmp_path: Path):
    """A `_target_` storage (here optuna's journal file, for file systems where SQLite locking is unreliable)."""
    journal = pytest.importorskip("optuna.storages.journal")
    node = OmegaConf.create({
        "_target_": "optuna.storages.JournalStorage",
        "log_storage": {"_target_": "optuna.storages.journal.JournalFileBackend", "file_path": str(tmp_path / "j.log")},
    })  # fmt: skip
    for _ in range(2):
        make_sweeper(tmp_path, objective, n_trials=1, storage=node).sweep([])
    storage = journal.JournalStorage(journal.JournalFileBackend(str(tmp_path / "j.log")))
    assert len(optuna.load_study(study_name="rag", storage=storage).trials) == 2
