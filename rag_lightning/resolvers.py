"""OmegaConf resolvers used by the configs: `${minilm:}` and `${asset:squad_demo/train.jsonl}`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).parent / "assets"


def asset(name: str) -> str:
    """Path of a file bundled with the package (rag_lightning/assets/NAME)."""
    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(f"bundled asset {name!r} not found at {path}")
    return str(path)


def register() -> None:
    from rag_lightning.models.encoders import minilm_dir

    for name, fn in {"minilm": minilm_dir, "asset": asset}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
