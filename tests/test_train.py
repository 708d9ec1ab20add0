"""End-to-end training with tiny models: both marginalizations, resume with the refresh state, failures."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import rag_lightning.resolvers  # noqa: F401
from rag_lightning.callbacks import RefreshIndex, parse_schedule
from rag_lightning.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
QUICK = [
    "retriever=tiny", "model=tiny", "data.max_train_examples=8", "data.max_eval_examples=4", "data.batch_size=2",
    "data.eval_batch_size=4", "validate_before_fit=false", "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null", "logger=csv",
]  # fmt: skip


def run_cfg(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*QUICK, *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.root_dir = str(CONF.parent)
        del cfg["hydra"]  # as inside a Hydra app: the job's config has no `hydra` node
    return cfg


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_fast_dev_run(tmp_path, variant):
    cfg = run_cfg(tmp_path, ["debug=fdr", f"model.variant={variant}", "test=true"])
    metric = train(cfg)
    assert metric is not None and 0.0 <= metric <= 1.0  # val/em from the one validation batch


def test_train_steps_checkpoint_and_resume_refresh_state(tmp_path, caplog):
    common = ["retriever.train_doc_encoder=true", "callbacks.refresh_index.every_n_steps=2", "test=false",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]  # fmt: skip
    cfg = run_cfg(tmp_path, [*common, "trainer.max_steps=4"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    (refresh,) = [v for k, v in state["callbacks"].items() if k.startswith("RefreshIndex")]
    assert refresh["version"] == 2 and refresh["last_refresh_step"] == 4  # refreshed at steps 2 and 4
    assert (Path(cfg.paths.output_dir) / "index" / "meta.json").exists()

    # validate-before-fit builds an index from the un-restored weights; the resumed fit must not keep it
    cfg2 = run_cfg(
        tmp_path, [*common, "trainer.max_steps=6", f"ckpt_path={ckpt}", "validate_before_fit=true"]
    )
    with caplog.at_level("INFO", logger="rag_lightning.callbacks.refresh"):
        train(cfg2)
    assert "resumed index v2" in caplog.text
    state = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    (refresh,) = [v for k, v in state["callbacks"].items() if k.startswith("RefreshIndex")]
    assert state["global_step"] == 6
    assert refresh["version"] == 3 and refresh["last_refresh_step"] == 6  # continued, not restarted at v0


class _Boom(RuntimeError):
    pass


def test_failed_refresh_keeps_old_index_and_training_goes_on(tmp_path, monkeypatch):
    from rag_lightning.module import RagModule

    calls = {"n": 0}
    real = RagModule.rebuild_index

    def flaky(self, progress=True):
        calls["n"] += 1
        if calls["n"] == 2:  # the first refresh during training fails (the 1st call is the initial build)
            raise _Boom("injected: out of memory")
        return real(self, progress)

    monkeypatch.setattr(RagModule, "rebuild_index", flaky)
    cfg = run_cfg(tmp_path, ["retriever.train_doc_encoder=true", "callbacks.refresh_index.every_n_steps=2",
                             "trainer.max_steps=4", "test=false", "trainer.limit_val_batches=1",
                             "trainer.val_check_interval=4"])  # fmt: skip
    train(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    (refresh,) = [v for k, v in state["callbacks"].items() if k.startswith("RefreshIndex")]
    assert state["global_step"] == 4
    assert refresh["failures"] == 1 and refresh["version"] == 1 and refresh["last_refresh_step"] == 4


def test_frozen_doc_encoder_refresh_is_a_no_op(tmp_path):
    cfg = run_cfg(tmp_path, ["callbacks.refresh_index.every_n_steps=1", "trainer.max_steps=2", "test=false",
                             "trainer.limit_val_batches=1", "trainer.val_check_interval=2"])  # fmt: skip
    train(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    (refresh,) = [v for k, v in state["callbacks"].items() if k.startswith("RefreshIndex")]
    assert refresh["version"] == 0 and refresh["last_refresh_step"] == -1


def test_schedule_parsing_and_due():
    assert parse_schedule("0-1000:500, 1000-:2000") == [(0, 1000, 500), (1000, None, 2000)]
    cb = RefreshIndex(schedule="0-1000:500,1000-10000:2000")
    assert [s for s in range(0, 12001, 250) if cb.due(s)] == [0, 500, 2000, 4000, 6000, 8000]
    with pytest.raises(ValueError, match="START-END:EVERY"):
        parse_schedule("0-100")
    with pytest.raises(ValueError, match="END > START"):
        parse_schedule("100-50:5")
    with pytest.raises(ValueError, match="not both"):
        RefreshIndex(every_n_steps=5, schedule="0-:5")


def test_several_val_sets_feed_one_metric(tmp_path):
    cfg = run_cfg(tmp_path, ["debug=fdr", "data.val_sets=[demo_val,demo_test]", "test=false"])
    metric = train(cfg)  # optimized_metric val/em exists, not val/em/dataloader_idx_N
    assert metric is not None and 0.0 <= metric <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "variant"), [("gpt2", "token"), ("llama", "sequence")])
def test_causal_generator_overfits_and_decodes(tmp_path, arch, variant):
    """A saved decoder-only checkpoint (byte-level BPE, EOS, no pad token) trains through the RAG marginal: the
    logged loss falls by >= 40% while overfitting 2 batches, and validation decodes with it."""
    import csv

    from rag_lightning.models.tiny import tiny_causal_lm

    model, tok = tiny_causal_lm(arch)
    assert tok.pad_token_id is None
    model.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    cfg = run_cfg(tmp_path, [
        "model.generator.kind=causal", f"model.generator.name_or_path={tmp_path / arch}", "debug=overfit",
        "optimizer.lr=3e-3", "scheduler.num_warmup_steps=0", "trainer.max_steps=60",
        "trainer.val_check_interval=60", "trainer.limit_val_batches=1", f"model.variant={variant}",
    ])  # fmt: skip
    em = train(cfg)  # val/em: validation decoded answers
    assert em is not None and 0.0 <= em <= 1.0
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 5 and losses[-1] <= 0.6 * losses[0], losses
