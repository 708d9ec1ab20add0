"""FSDP2 (trainer=fsdp): two CPU processes (gloo) train a LoRA'd tiny Llama whose decoder layers are sharded;
ranks > 0 build it on the meta device and receive rank 0's weights shard by shard."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rag_lightning.models.sharding import layer_classes

ROOT = Path(__file__).resolve().parents[1]
LORA = "+model.generator.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: null}"


def _save_tiny_llama(path: Path) -> None:
    from rag_lightning.models.causal import CausalGenerator
    from rag_lightning.models.tiny import tiny_causal_lm

    CausalGenerator(*tiny_causal_lm("llama")).save_pretrained(path)


def test_layer_classes_are_the_decoder_blocks():
    from rag_lightning.models.tiny import tiny_causal_lm

    model, _ = tiny_causal_lm("llama")
    assert {c.__name__ for c in layer_classes(model)} == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="none of the layer classes"):
        layer_classes(model, ["NoSuchLayer"])


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_fsdp_lora(tmp_path, cfg_factory):
    gen_dir = tmp_path / "tiny_llama"
    _save_tiny_llama(gen_dir)
    model = ["retriever=tiny", "model=tiny", f"model.generator.name_or_path={gen_dir}", LORA]
    cmd = [
        sys.executable, str(ROOT / "train.py"), "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", *model, "+model.generator._partial_=true",
        "model.generator.gradient_checkpointing=true", "optimizer.lr=1e-3", "data.max_train_examples=16",
        "data.batch_size=2", "trainer.max_steps=4", "trainer.limit_val_batches=0", "optimized_metric=null",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "validate_before_fit=false",
        "test=false", f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache",
        f"paths.root_dir={ROOT}", f"hydra.run.dir={tmp_path}/run",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    sd = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # only what trains: the LoRA adapters (full tensors gathered from the shards) and the query encoder
    assert all("lora_" in k or k.startswith("retriever.query_encoder.") for k in sd)
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # initialized to 0: the adapters trained

    cfg = cfg_factory(*model)  # not under hydra.main: paths.root_dir=tmp_path
    fresh = instantiate(cfg.model)  # one process, unsharded: the checkpoint loads strictly
    fresh.load_state_dict(sd)
    got = dict(fresh.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in sd.items() if "lora_" in k)
