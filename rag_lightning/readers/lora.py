"""LoRA adapters (peft) for every reader: added in place, merged back into plain layers for export; the
special ids an exported directory needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def apply_lora(model: nn.Module, lora: Mapping[str, Any] | None) -> nn.Module:
    """Add peft LoRA adapters to `model` in place (`lora`: r, alpha, dropout, target_modules; None = no LoRA)
    and return it: the same transformers class (so `base_model`, `get_encoder`, `get_output_embeddings` and
    decoding work unchanged), the base weights frozen, only the adapters train. `target_modules: null` takes
    peft's default for the architecture (e.g. q_proj, v_proj; query, value for BERT)."""
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    unknown = set(lora) - {"r", "alpha", "dropout", "target_modules"}
    if unknown:
        raise ValueError(
            f"model.generator.lora: unknown keys {sorted(unknown)} (r, alpha, dropout, target_modules)"
        )
    targets = lora.get("target_modules")
    config = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=float(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets) if targets is not None else None,
    )
    get_peft_model(model, config)  # injects the adapters into `model` and freezes everything else
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # frozen embeddings + reentrant checkpointing: keep the graph
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place); returns `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return model


def set_special_ids(model: nn.Module, eos: int, pad: int, decoder_start: int | None = None) -> None:
    """EOS / pad (/ decoder start) ids in the model's config and generation config, so that a saved directory
    stops and pads in `generate` as the generator did (a BERT config, e.g., has no EOS)."""
    from transformers import GenerationConfig

    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    gen_cfg = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    gen_cfg.eos_token_id, gen_cfg.pad_token_id = eos, pad
    if decoder_start is not None:
        gen_cfg.decoder_start_token_id = decoder_start
    model.generation_config = gen_cfg
