"""Every config composes; every experiment instantiates with its models swapped for tiny ones."""

import shutil

import pytest
from conftest import CONF_DIR, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "base")
TINY = ["retriever=tiny", "model=tiny"]


def test_experiments_exist():
    assert {"demo", "nq", "squad_open"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_composes(exp, cfg_factory):
    # paths.root_dir=tmp_path stands in for ${hydra:runtime.cwd}, which index.root resolves through
    cfg = cfg_factory(f"+experiment={exp}")
    assert cfg.model._target_ == "rag_lightning.module.RagModule"
    assert cfg.data._target_.endswith("QADataModule")
    # everything in the model resolves (the run's output_dir is not in it)
    OmegaConf.to_container(cfg.model, resolve=True)


def test_nq_has_the_paper_settings(cfg_factory):
    cfg = cfg_factory("+experiment=nq")
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
def test_group_options_compose(group_option, cfg_factory):
    cfg_factory(group_option)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_instantiates_with_tiny_models(exp, cfg_factory):
    cfg = cfg_factory(f"+experiment={exp}", *TINY)
    module = instantiate(cfg.model)
    assert module.hparams.variant in ("token", "sequence")
    assert module.retriever.n_docs >= 1


@pytest.mark.parametrize("name", DATA)
def test_data_configs_state_only_what_differs_from_their_base(name, cfg_factory):
    """conf/data/<name>.yaml starts from a base (base.yaml, or another data config) and restates none of its
    values; the composed config keeps every key of base.yaml, in its order, with the `???` ones filled."""
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))
    (parent,) = [d for d in own.pop("defaults") if d != "_self_" and "override /task" not in d]
    base = OmegaConf.load(CONF_DIR / "data" / "base.yaml")
    ref = OmegaConf.to_container(base if parent == "base" else compose_config(f"data={parent}").data)
    assert [k for k, v in own.items() if ref.get(k) == v] == [], f"{name} restates values of {parent}"
    composed = cfg_factory(f"data={name}").data
    assert list(composed)[: len(base)] == list(base) and not OmegaConf.missing_keys(composed)


def test_local_config_overrides_the_groups_but_not_experiments_or_the_command_line(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /data/dpr\ntrainer:\n  max_steps: 7\n"
    )
    cfg = compose_config(conf_dir=conf, local=True)
    assert cfg.paths.data_dir == "/data/dpr" and cfg.trainer.max_steps == 7
    assert compose_config("trainer.max_steps=9", conf_dir=conf, local=True).trainer.max_steps == 9
    exp = compose_config("+experiment=squad_open", conf_dir=conf, local=True)
    assert exp.paths.data_dir == "/data/dpr" and exp.trainer.max_steps == 600  # the experiment's own value
    assert compose_config(config_name="build_index", conf_dir=conf, local=True).paths.data_dir == "/data/dpr"
    assert compose_config(conf_dir=conf).trainer.max_steps != 7  # the tests leave a machine's file out
