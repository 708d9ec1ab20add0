"""Experiment nq_llm: DPR retriever + Qwen2.5-1.5B-Instruct with LoRA, K=5, bf16."""

import pytest
import torch
from hydra.utils import instantiate

from rag_lightning.preflight import ConfigError
from rag_lightning.train import train

EXP = "+experiment=nq_llm"


def test_composes_with_the_stated_settings(cfg_factory):
    cfg = cfg_factory(EXP)
    g = cfg.model.generator
    assert g.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and g.kind == "causal" and g._partial_
    assert g.lora.r == 16 and "q_proj" in g.lora.target_modules and g.gradient_checkpointing
    assert cfg.retriever.n_docs == 5 and "dpr-question_encoder" in cfg.retriever.query_encoder.name_or_path
    assert cfg.trainer.precision == "bf16-mixed"
    assert "{passage}" in g.template and "{question}" in g.template


def test_instantiates_with_tiny_models(cfg_factory):
    cfg = cfg_factory(
        EXP, "retriever=tiny", "model.generator.name_or_path=tiny:llama", "model.decoding.num_beams=1"
    )
    module = instantiate(cfg.model)
    assert module.generator is None  # deferred to configure_model (FSDP: only rank 0 loads the weights)
    module.configure_model()
    trainable = [n for n, p in module.generator.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q = [module.generator.tokenizer("who?", add_special_tokens=False).input_ids]
    src, mask = module.generator.build_sources(q, [[5, 6, 7]] * 5, n_docs=5)
    logits = module.generator(src, mask, torch.tensor([[8, module.generator.eos_token_id]] * 5))
    assert logits.shape[:2] == (5, 2) and torch.isfinite(logits).all()


def test_offline_stops_at_once_naming_the_model(monkeypatch, tmp_path, cfg_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    cfg = cfg_factory(EXP, f"paths.data_dir={tmp_path}")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    msg = str(e.value)
    assert "model.generator.name_or_path='Qwen/Qwen2.5-1.5B-Instruct'" in msg
    assert "model.generator.name_or_path=/models/Qwen2.5-1.5B-Instruct" in msg  # how to fix it
