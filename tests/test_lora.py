"""LoRA through peft: only adapters (and the query encoder) train, checkpoints drop frozen weights and load
strictly, rag-export merges the adapters into a plain directory with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rag_lightning.readers import from_pretrained
from rag_lightning.readers.seq2seq import Generator

ROOT = Path(__file__).resolve().parents[1]
LORA = "+model.generator.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: null}"  # peft default modules
TINY = ["retriever=tiny", "model=tiny", LORA]
GENERATORS = {
    "tiny:bart": "BartForConditionalGeneration",
    "tiny:gpt2": "GPT2LMHeadModel",
    "tiny:llama": "LlamaForCausalLM",
}


def _perturb_adapters(module: torch.nn.Module) -> None:
    """lora_B starts at 0 (the adapted model equals the base); give the adapters a nonzero update."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(gen: Generator) -> torch.Tensor:
    q = [gen.tokenizer("who wrote it", add_special_tokens=False).input_ids] * 2
    p = [gen.tokenizer(t, add_special_tokens=False).input_ids for t in ("a book by anna", "the sea is blue")]
    src, mask = gen.build_sources(q, p, n_docs=1)
    a, b = (gen.tokenizer(t, add_special_tokens=False).input_ids[:2] for t in ("anna karenina", "blue"))
    eos = gen.eos_token_id
    labels = torch.tensor([a + [eos], b[:1] + [eos, -100]])  # (2, 3)
    gen.eval()
    with torch.no_grad():
        return gen(src, mask, labels)  # (2, 3, V)


def test_only_adapters_and_query_encoder_train(cfg_factory):
    module = instantiate(cfg_factory(*TINY).model)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("retriever.query_encoder.") for n in trainable)
    assert any("lora_" in n for n in trainable) and any(n.startswith("retriever.") for n in trainable)
    module.scheduler_factory = None  # no trainer here to count steps
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.parameters() if p.requires_grad}


def test_checkpoint_holds_only_trainable_and_loads_strictly(cfg_factory):
    cfg = cfg_factory(*TINY)
    module = instantiate(cfg.model)
    _perturb_adapters(module)
    sd = module.state_dict()
    frozen = module.frozen_keys()
    assert frozen and not frozen & set(sd)
    assert {n for n, p in module.named_parameters() if p.requires_grad} <= set(sd)
    n_saved = sum(v.numel() for k, v in sd.items() if "lora_" in k or k.startswith("retriever.query"))
    assert n_saved < sum(p.numel() for p in module.parameters()) / 2  # the frozen half is not copied

    fresh = instantiate(cfg.model)
    fresh.load_state_dict(sd)  # strict by default, without the frozen weights
    assert torch.equal(_logits(fresh.generator), _logits(module.generator))
    with pytest.raises(RuntimeError, match="unexpected keys.*bogus"):
        fresh.load_state_dict({**sd, "bogus.weight": torch.zeros(1)})
    lora_key = next(k for k in sd if "lora_A" in k)
    with pytest.raises(RuntimeError, match="missing trainable keys.*lora_A"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != lora_key})
    full = torch.nn.Module.state_dict(module)  # an older checkpoint that holds the frozen weights too
    fresh.load_state_dict(full)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_export_merges_adapters(tmp_path, cfg_factory, name):
    from rag_lightning.commands import export

    gen = f"model.generator.name_or_path={name}"
    cfg = cfg_factory(
        *TINY, gen, f"ckpt_path={tmp_path / 'x.ckpt'}", f"out={tmp_path / 'gen'}", config_name="export"
    )
    module = instantiate(cfg.model)
    _perturb_adapters(module)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, cfg.ckpt_path)
    expected = _logits(module.generator)
    base = _logits(instantiate(cfg_factory(*TINY[:2], gen).model).generator)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapters change the outputs

    out = export.export(cfg, [])
    plain = from_pretrained(str(out), max_source_length=48)
    assert type(plain.model).__name__ == GENERATORS[name]
    assert not any("lora" in k for k in plain.model.state_dict())
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "x.ckpt"]  # no temporary directory left
    with pytest.raises(FileExistsError):
        export.export(cfg, [])


def test_copy_head_trains_under_lora_and_is_exported(tmp_path, cfg_factory):
    """The pointer head is new: it trains next to the adapters, the checkpoint holds it, and the exported
    directory carries it (rag_pointer.safetensors) with the same outputs."""
    from rag_lightning.commands import export

    over = (*TINY, "model.generator.name_or_path=tiny:llama", "+model.generator.copy=true")
    cfg = cfg_factory(
        *over, f"ckpt_path={tmp_path / 'x.ckpt'}", f"out={tmp_path / 'gen'}", config_name="export"
    )
    module = instantiate(cfg.model)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {"generator.pointer.query.weight", "generator.pointer.gate.bias"} <= trainable
    assert all(
        "lora_" in n or n.startswith(("retriever.query_encoder.", "generator.pointer.")) for n in trainable
    )
    _perturb_adapters(module)
    with torch.no_grad():
        module.generator.pointer.gate.bias.fill_(1.5)  # a trained head, not the fresh one
    sd = module.state_dict()
    assert "generator.pointer.gate.bias" in sd
    torch.save({"state_dict": sd, "hyper_parameters": dict(module.hparams)}, cfg.ckpt_path)
    expected = _logits(module.generator)
    out = export.export(cfg, [])
    assert (out / "rag_pointer.safetensors").is_file()
    plain = from_pretrained(str(out), max_source_length=48)
    assert plain.pointer is not None and plain.pointer.gate.bias.item() == 1.5
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=1e-4)
