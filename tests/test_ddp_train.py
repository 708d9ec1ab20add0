"""Two-process DDP training on CPU (gloo) with a sharded index refreshed mid-run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_sharded_refresh(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "train.py"), "trainer=ddp_sim", "index.mode=sharded", "retriever=tiny",
        "model=tiny", "data.max_train_examples=16", "data.max_eval_examples=8", "data.batch_size=2",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "retriever.train_doc_encoder=true",
        "callbacks.refresh_index.every_n_steps=2", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "validate_before_fit=false", "test=false",
        f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache", f"paths.root_dir={ROOT}",
        f"hydra.run.dir={tmp_path}/run",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    (refresh,) = [v for k, v in state["callbacks"].items() if k.startswith("RefreshIndex")]
    assert refresh["version"] == 2 and refresh["last_refresh_step"] == 4
    metas = [json.loads((run / "index" / f"shard-{r}-of-2" / "meta.json").read_text()) for r in (0, 1)]
    assert [m["meta"]["version"] for m in metas] == [2, 2]  # both ranks completed both refreshes
    assert metas[0]["meta"]["start"] == 0 and metas[1]["meta"]["start"] == metas[0]["ntotal"]
    assert metas[0]["ntotal"] + metas[1]["ntotal"] == 693  # the bundled demo corpus, split in two
