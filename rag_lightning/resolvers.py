"""OmegaConf resolvers used by the configs: `${minilm:}` and `${asset:squad_demo/train.jsonl}`."""

from __future__ import annotations

from omegaconf import OmegaConf

from rag_lightning.tokenization import minilm_dir


def register() -> None:
    from rag_lightning.data.registry import asset_path as asset

    for name, fn in {"minilm": minilm_dir, "asset": asset}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
