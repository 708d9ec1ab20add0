"""FSDP2 (trainer=fsdp): two CPU processes (gloo) train a LoRA'd tiny Llama whose decoder layers are sharded;
ranks > 0 build it on the meta device and receive rank 0's weights shard by shard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rag_lightning.models.sharding import layer_classes
from rag_lightning.readers import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
LORA = "+model.generator.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: null}"


def _save_tiny_llama(path: Path) -> None:
    from rag_lightning.models.tiny import tiny_causal_lm
    from rag_lightning.readers.causal import CausalGenerator

    CausalGenerator(*tiny_causal_lm("llama")).save_pretrained(path)


def test_layer_classes_are_the_decoder_blocks():
    from rag_lightning.models.tiny import tiny_causal_lm

    model, _ = tiny_causal_lm("llama")
    assert {c.__name__ for c in layer_classes(model)} == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="none of the layer classes"):
        layer_classes(model, ["NoSuchLayer"])


def _saved_generators(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (directory, kind): BART, Llama, a BERT warm-started as bert2bert, and that bert2bert saved."""
    from transformers import BertConfig, BertModel

    from rag_lightning.models.tiny import tiny_generator, tiny_tokenizer

    out = {"bart": (root / "bart", "seq2seq"), "llama": (root / "llama", "causal")}
    model, tok = tiny_generator()
    model.save_pretrained(out["bart"][0])
    tok.save_pretrained(out["bart"][0])
    _save_tiny_llama(out["llama"][0])
    tok = tiny_tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    out["bert2bert"] = (root / "bert", "bert2bert")
    from_pretrained(str(root / "bert"), kind="bert2bert").save_pretrained(root / "enc-dec")
    out["encoder-decoder"] = (root / "enc-dec", "seq2seq")
    return out


def test_meta_built_generators_match_the_loaded_ones(tmp_path):
    """FSDP ranks > 0 build the generator on the meta device (empty_init) and receive rank 0's weights: every
    kind must build the same parameters (names, shapes, dtypes) and, filled with them, the same outputs."""

    for name, (path, kind) in _saved_generators(tmp_path).items():
        real = from_pretrained(str(path), kind=kind, max_source_length=24).eval()
        meta = from_pretrained(str(path), kind=kind, max_source_length=24, empty_init=True).eval()
        assert all(p.is_meta for p in meta.parameters()), name
        want = real.state_dict()
        got = {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()}
        assert got == {k: (v.shape, v.dtype) for k, v in want.items()}, name
        meta.to_empty(device="cpu")
        meta.load_state_dict(want)
        for buf, ref in zip(meta.buffers(), real.buffers()):  # as load_full_state broadcasts them
            buf.copy_(ref)
        q = [real.tokenizer("who wrote it", add_special_tokens=False).input_ids] * 2
        p = [real.tokenizer(t, add_special_tokens=False).input_ids for t in ("a book by anna", "the sea")]
        src, mask = real.build_sources(q, p, n_docs=1)
        labels = torch.tensor([[5, 6, real.eos_token_id], [7, real.eos_token_id, -100]])
        with torch.no_grad():
            torch.testing.assert_close(meta(src, mask, labels), real(src, mask, labels), msg=name)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("copy", [False, True])
def test_two_process_fsdp_lora(tmp_path, cfg_factory, copy):
    """copy=True: the pointer head (root unit, trained next to the adapters) is gathered into the checkpoint."""
    gen_dir = tmp_path / "tiny_llama"
    _save_tiny_llama(gen_dir)
    model = ["retriever=tiny", "model=tiny", f"model.generator.name_or_path={gen_dir}", LORA]
    if copy:
        model.append("+model.generator.copy=true")
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
    # only what trains: the LoRA adapters (full tensors gathered from the shards), the query encoder, the copy head
    trains = ("retriever.query_encoder.", "generator.pointer.")
    assert all("lora_" in k or k.startswith(trains) for k in sd)
    assert copy == ("generator.pointer.query.weight" in sd)
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")[-4000:]
    # initialized to 0: the adapters trained (the log's tail says why not, e.g. skipped non-finite steps)
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), (
        os.path.realpath(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        log,
    )

    cfg = cfg_factory(*model)  # not under hydra.main: paths.root_dir=tmp_path
    fresh = instantiate(cfg.model)  # one process, unsharded: the checkpoint loads strictly
    fresh.load_state_dict(sd)
    got = dict(fresh.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in sd.items() if "lora_" in k or "pointer" in k)
