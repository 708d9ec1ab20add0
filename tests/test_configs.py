"""Every config composes; every experiment instantiates with its models swapped for tiny ones."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import rag_lightning.resolvers  # noqa: F401

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TINY = ["retriever=tiny", "model=tiny"]


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_experiments_exist():
    assert {"demo", "nq", "squad_open"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_composes(exp, tmp_path):
    # paths.root_dir stands in for ${hydra:runtime.cwd} (the model refers to index.root under paths.cache_dir)
    cfg = compose_cfg([f"+experiment={exp}", f"paths.root_dir={tmp_path}"])
    assert cfg.model._target_ == "rag_lightning.module.RagModule"
    assert cfg.data._target_.endswith("QADataModule")
    # everything in the model resolves (the run's output_dir is not in it)
    OmegaConf.to_container(cfg.model, resolve=True)


def test_nq_has_the_paper_settings():
    cfg = compose_cfg(["+experiment=nq"])
    assert cfg.retriever.n_docs == 5
    assert cfg.optimizer.lr == 3e-5 and cfg.scheduler.num_warmup_steps == 500
    assert cfg.model.label_smoothing == 0.1 and cfg.model.generator.max_source_length == 128
    assert cfg.data.max_target_length == 25 and cfg.trainer.gradient_clip_val == 0.1
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp"
    assert cfg.model.generator.name_or_path == "facebook/bart-large"
    assert "dpr-question_encoder" in cfg.retriever.query_encoder.name_or_path


@pytest.mark.parametrize("group_option", ["index=hnsw", "index=ivfpq", "index=torch", "trainer=gpu", "trainer=ddp",
                                          "logger=wandb", "logger=many_loggers", "debug=fdr", "debug=limit",
                                          "debug=overfit", "callbacks=none"])  # fmt: skip
def test_group_options_compose(group_option):
    compose_cfg([group_option])


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_instantiates_with_tiny_models(exp, tmp_path):
    cfg = compose_cfg([f"+experiment={exp}", *TINY, f"paths.root_dir={tmp_path}"])
    module = instantiate(cfg.model)
    assert module.hparams.variant in ("token", "sequence")
    assert module.retriever.n_docs >= 1
