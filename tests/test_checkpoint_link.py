"""`last.ckpt` is a link to the current step's checkpoint, or a full checkpoint when top-k kept none of it;
the run summary goes to the log files as well as to stdout (printed once)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf

from rag_lightning.callbacks import ModelCheckpoint
from rag_lightning.checkpoint_io import AtomicCheckpointIO
from rag_lightning.summary import print_summary

VAL_LOSS = {2: 1.0, 4: 2.0, 6: 0.5}  # step -> val/loss: step 4 is worse than step 2, so top-1 keeps step 2


class Scripted(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", VAL_LOSS[self.global_step])


def fit(folder: Path, max_steps: int, ckpt_path: str | None = None) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=folder,
        filename="step_{step:06d}",
        monitor="val/loss",
        save_top_k=1,
        save_last="link",
        auto_insert_metric_name=False,
    )
    trainer = pl.Trainer(
        max_steps=max_steps, val_check_interval=2, limit_val_batches=1, callbacks=[checkpoint],
        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=folder, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Scripted(), ckpt_path=ckpt_path)


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_last_links_to_this_steps_checkpoint_else_is_a_full_one(tmp_path):
    last = tmp_path / "last.ckpt"
    fit(tmp_path, max_steps=2)
    assert last.is_symlink() and os.readlink(last) == "step_000002.ckpt"  # relative: the folder can move
    fit(tmp_path / "b", max_steps=4)
    last_b = tmp_path / "b" / "last.ckpt"
    assert not last_b.is_symlink() and step_of(last_b) == 4  # step 4 not kept by top-1: written in full
    assert sorted(p.name for p in (tmp_path / "b").glob("*.ckpt")) == ["last.ckpt", "step_000002.ckpt"]
    assert (
        step_of(tmp_path / "b" / "step_000002.ckpt") == 2
    )  # the full write replaced the link, not its target


def test_resume_from_the_link(tmp_path):
    fit(tmp_path / "a", max_steps=6)
    last = tmp_path / "a" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step_000006.ckpt" and step_of(last) == 6
    assert sorted(p.name for p in (tmp_path / "a").glob("*.ckpt")) == ["last.ckpt", "step_000006.ckpt"]
    VAL_LOSS[8] = 0.1
    try:
        fit(tmp_path / "resumed", max_steps=8, ckpt_path=str(last))
    finally:
        del VAL_LOSS[8]
    resumed = tmp_path / "resumed" / "last.ckpt"
    assert resumed.is_symlink() and step_of(resumed) == 8
    assert step_of(last) == 6  # the run resumed from is untouched


def test_summary_goes_to_the_log_file_and_is_printed_once(tmp_path, capsys):
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    console = logging.StreamHandler()  # as Hydra's console handler: must not print the summary a second time
    root = logging.getLogger()
    root.addHandler(handler), root.addHandler(console)
    try:
        cfg = OmegaConf.create({"model": {"variant": "token"}, "paths": {"output_dir": str(tmp_path)}})
        trainer = SimpleNamespace(checkpoint_callback=None)
        print_summary(cfg, trainer, {"val/em": 0.0}, {"val/em": 0.25}, {})
    finally:
        root.removeHandler(handler), root.removeHandler(console)
        handler.close()
    out, err = capsys.readouterr()
    assert out.count("rag-lightning run summary (token marginalization)") == 1 and "25.0%" in out
    assert "run summary" not in err
    assert out.strip() in log_file.read_text()


@pytest.mark.parametrize(("variant", "title"), [("sequence", "sequence marginalization"), ("fid", "fid reader"),
                                                ("concat", "concat reader")])  # fmt: skip
def test_summary_names_a_fusion_reader_without_a_marginal(tmp_path, capsys, variant, title):
    cfg = OmegaConf.create({"model": {"variant": variant}, "paths": {"output_dir": str(tmp_path)}})
    print_summary(cfg, SimpleNamespace(checkpoint_callback=None), {"val/em": 0.0}, {"val/em": 0.25}, {})
    assert f"rag-lightning run summary ({title})" in capsys.readouterr().out
