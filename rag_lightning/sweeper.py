"""Optuna sweeper for Hydra multiruns, on optuna >= 3 (RDB / journal storage that persists and resumes).

`python train.py -m hparams_search=optuna`: each batch of `n_jobs` trials is asked from the study, launched as
Hydra jobs by the configured launcher (basic: one after another; submitit: in parallel on SLURM), and told the
value each job returns (train() returns `optimized_metric`). With `storage` set (e.g.
`sqlite:///optuna.db`, `postgresql://...`, or a `_target_` node such as optuna's JournalStorage) and
`load_if_exists: true`, a second multirun with the same `study_name` continues the study, and parallel
processes share it. The best parameters of the whole study go to `<sweep dir>/optimization_results.yaml`.

Search space, in `hydra.sweeper.params` or on the command line, in Hydra's override syntax:
`interval(a, b)` (float; `tag(log, ...)` log-uniform, `tag(int, ...)` integer), `range(a, b[, step])`
(Python semantics: `b` excluded), `choice(x, y, ...)` or `x,y,...` (categorical). Other overrides are passed to
every job unchanged.

Hydra instantiates sweepers only from the `hydra_plugins` namespace: `hydra_plugins/rag_lightning_sweeper.py`
registers this class there.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)

_PLAIN = re.compile(r"[\w./:@-]+")  # strings Hydra reads back without quotes


def distribution(override: Override) -> Any:
    """The optuna distribution of one sweep override (`interval`, `range`, `choice`)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    name, sweep = override.get_key_element(), override.value()
    tags = getattr(sweep, "tags", set())
    if isinstance(sweep, IntervalSweep):
        if "int" in tags:
            return IntDistribution(math.ceil(sweep.start), math.floor(sweep.end), log="log" in tags)
        return FloatDistribution(float(sweep.start), float(sweep.end), log="log" in tags)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        n = math.ceil((stop - start) / step) if step > 0 else 0
        if n <= 0:
            raise ValueError(f"{name}: {override.input_line!r} is empty (range needs start < stop, step > 0)")
        last = start + (n - 1) * step  # range excludes stop, as Python's does
        if all(isinstance(x, int) for x in (start, stop, step)):
            return IntDistribution(start, last, step=step, log="log" in tags and step == 1)
        return FloatDistribution(float(start), float(last), step=float(step))
    if isinstance(sweep, ChoiceSweep):
        choices = list(sweep.list)
        bad = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
        if bad:
            raise ValueError(f"{name}: choice() takes numbers, strings, booleans or null, got {bad[0]!r}")
        return CategoricalDistribution(choices)
    raise ValueError(f"{name}: {override.input_line!r}: the Optuna sweeper takes interval, range or choice")


def search_space(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Parse `key=value` overrides into ({key: distribution} for the sweeps, [fixed overrides]).

    Keys keep their `+` / `++` prefix. A later override of the same key wins (the command line comes after
    the config's params).
    """
    parsed = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(list(overrides))}
    space = {k: distribution(o) for k, o in parsed.items() if o.is_sweep_override()}
    fixed = [o.input_line for o in parsed.values() if not o.is_sweep_override()]
    return space, fixed


def format_value(value: Any) -> str:
    """A sampled value as the right-hand side of a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not _PLAIN.fullmatch(value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value) if isinstance(value, float) else str(value)


class OptunaSweeper(Sweeper):
    """Config: conf/hydra/sweeper/rag_optuna.yaml (every argument documented there)."""

    def __init__(
        self,
        direction: str = "minimize",
        n_trials: int = 20,
        n_jobs: int = 1,
        study_name: str | None = None,
        storage: str | DictConfig | None = None,
        load_if_exists: bool = True,
        sampler: DictConfig | None = None,
        params: DictConfig | None = None,
    ):
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction must be minimize or maximize, got {direction!r}")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper: n_trials ({n_trials}) and n_jobs ({n_jobs}) must be >= 1")
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.study_name, self.storage, self.load_if_exists = study_name, storage, load_if_exists
        self.sampler, self.params = sampler, params
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _make_sampler(self, n_done: int) -> Any:
        """The configured sampler (optuna's default, TPE, when none is); its seed is offset by the study's trial
        count, so a resumed study does not replay the random start-up trials it already ran."""
        import optuna

        if self.sampler is None:
            return optuna.samplers.TPESampler()
        overrides = {}
        if self.sampler.get("seed") is not None:
            overrides["seed"] = int(self.sampler.seed) + n_done
        return instantiate(self.sampler, **overrides)

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = search_space([*params, *arguments])
        if not space:
            raise ValueError("the Optuna sweeper has nothing to search: set hydra.sweeper.params")
        storage = instantiate(self.storage) if isinstance(self.storage, DictConfig) else self.storage
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self.direction,
            load_if_exists=self.load_if_exists,
        )  # fmt: skip
        study.sampler = self._make_sampler(len(study.trials))
        log.info(
            "Optuna study %r (%s, %d trials so far): %d more, %d per batch, over %s",
            study.study_name, storage or "in memory", len(study.trials), self.n_trials, self.n_jobs,
            ", ".join(space),
        )  # fmt: skip

        done = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*fixed, *(f"{k}={format_value(v)}" for k, v in t.params.items())] for t in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            done += len(trials)
            failure: BaseException | None = None
            for trial, ret in zip(trials, returns, strict=True):
                try:
                    value = ret.return_value  # re-raises the job's exception when it failed
                    if value is None:
                        raise ValueError(f"job {ret.working_dir} returned None: nothing to optimize")
                    study.tell(trial, float(value))
                except Exception as e:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failure = failure or e
            if failure is not None:
                raise failure
        self._write_results(study, storage)

    def _write_results(self, study: Any, storage: Any) -> None:
        from optuna.trial import TrialState

        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": storage if isinstance(storage, str) or storage is None else type(storage).__name__,
            "n_trials": len(completed),
            "best_trial": study.best_trial.number,
            "best_value": study.best_value,
            "best_params": study.best_params,
        }
        out = Path(str(self.config.hydra.sweep.dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / "optimization_results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
        log.info("Best of %d trials: %s -> %s", len(completed), study.best_params, study.best_value)
