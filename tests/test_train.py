"""End-to-end training with tiny models: both marginalizations, resume with the refresh state, failures."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from rag_lightning.callbacks import RefreshIndex, parse_schedule
from rag_lightning.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
QUICK = [
    "retriever=tiny", "model=tiny", "data.max_train_examples=8", "data.max_eval_examples=4", "data.batch_size=2",
    "data.eval_batch_size=4", "validate_before_fit=false", "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null", "logger=csv",
]  # fmt: skip


def run_cfg(tmp_path: Path, overrides: list[str]):
    """The job config of `python train.py QUICK OVERRIDES` with HydraConfig set, as train() sees it inside the
    app (conftest resets HydraConfig after each test); every output under tmp_path."""
    cfg = compose_config(*QUICK, *overrides)
    HydraConfig.instance().set_config(cfg)
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
    cfg2 = run_cfg(  # resumed into a new output dir: the index is found from the checkpoint, not re-embedded
        tmp_path / "resumed",
        [*common, "trainer.max_steps=6", f"ckpt_path={ckpt}", "validate_before_fit=true"],
    )
    with caplog.at_level("INFO", logger="rag_lightning.models.retriever"):
        train(cfg2)
    n_passages = len(Path(cfg.data.corpus.path).read_text(encoding="utf-8").splitlines())  # bundled jsonl
    assert (
        f"index: loaded {Path(cfg.paths.output_dir) / 'index'} ({n_passages} passages" in caplog.text
    )  # v2, not rebuilt
    state = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    (refresh,) = [v for k, v in state["callbacks"].items() if k.startswith("RefreshIndex")]
    assert state["global_step"] == 6
    assert refresh["version"] == 3 and refresh["last_refresh_step"] == 6  # continued, not restarted at v0


class _Boom(RuntimeError):
    pass


def test_failed_refresh_keeps_old_index_and_training_goes_on(tmp_path, monkeypatch):
    from rag_lightning.models.retriever import Retriever

    calls = {"n": 0}
    real = Retriever._embed_shard

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:  # the first refresh during training fails (the 1st call is the initial build)
            raise _Boom("injected: out of memory")
        return real(self, *args)

    monkeypatch.setattr(Retriever, "_embed_shard", flaky)
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


def test_several_val_sets_feed_one_metric(tmp_path, capsys):
    sets = "[demo_val,demo_test]"
    cfg = run_cfg(tmp_path, ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
                             "trainer.limit_test_batches=1",
                             f"data.val_sets={sets}", f"data.test_sets={sets}", "test=true"])  # fmt: skip
    metric = train(cfg)  # optimized_metric val/em exists, not val/em/dataloader_idx_N
    assert metric is not None and 0.0 <= metric <= 1.0
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = next(r for r in rows if r.get("val/em"))
    for stage in ("val", "test"):
        for name in ("demo_val", "demo_test"):
            assert all(
                rows[0].get(f"{stage}/{name}/{k}") is not None for k in ("em", "f1", "loss", "recall@1")
            )
    for k in ("em", "recall@1", "loss"):  # 4 questions per set: pooled = mean of the two sets
        pooled = (float(val[f"val/demo_val/{k}"]) + float(val[f"val/demo_test/{k}"])) / 2
        assert float(val[f"val/{k}"]) == pytest.approx(pooled, rel=1e-6, abs=1e-6)
    out = capsys.readouterr().out
    assert "-- val set demo_val" in out and "-- test set demo_test" in out and "all sets pooled" in out


@pytest.mark.slow
def test_bad_question_file_is_one_error_line(tmp_path):
    bad = tmp_path / "val.jsonl"
    bad.write_text(
        '{"question": "q1", "answers": ["a"]}\n{"question": "q2", "answers": [""]}\n', encoding="utf-8"
    )
    args = ["retriever=tiny", "model=tiny", f"data.val_sets=[{bad}]", f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}", "callbacks.rich_progress_bar=null"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=CONF.parent, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'answers': empty answer string"
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert not (tmp_path / "cache").exists()  # stopped before the corpus conversion


NO_VAL = ["trainer.max_steps=1", "trainer.val_check_interval=2", "test=false"]  # validation never runs


def test_run_without_validation_warns_and_cleans_stale_partial_checkpoints(tmp_path, caplog):
    ckpt_dir = tmp_path / "out" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    stale, other = ckpt_dir / ".tmp-abc123.ckpt", ckpt_dir / "notes.tmp"  # a write cut by kill -9; not ours
    for f in (stale, other):
        f.write_bytes(b"partial")
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    cfg = run_cfg(tmp_path, NO_VAL)
    with caplog.at_level("WARNING", logger="rag_lightning"):
        assert train(cfg) is None  # trained and checkpointed; nothing to return, not a failure
    assert "optimized_metric='val/em' was not logged" in caplog.text
    assert not stale.exists() and other.exists()
    assert (ckpt_dir / "last.ckpt").is_file()


def test_run_without_validation_fails_inside_a_multirun(tmp_path):
    cfg = run_cfg(tmp_path, [*NO_VAL, "hydra.mode=MULTIRUN"])  # as a sweep's job: a trial needs its value
    with pytest.raises(KeyError, match="optimized_metric='val/em' was not logged"):
        train(cfg)


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
