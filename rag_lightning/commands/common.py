"""What every command shares: its Hydra app on the package's configs, atomic writes, ``results.json``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...} before composing)
from rag_lightning.cli import conf_dir

RESULTS = "results.json"


def hydra_app(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml`` (the checkout's or the wheel's, as rag-train)."""
    hydra.main(config_path=conf_dir(), config_name=config_name, version_base="1.3")(task)()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it: a reader sees all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_results(out_dir: str | os.PathLike, result: Any) -> Path:
    """``<out_dir>/results.json`` (atomically); its path is printed."""
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {path}", flush=True)
    return path


def fail(e: BaseException, code: int = 2) -> None:
    """A bad input (missing file, bad row, refused config): one line on stderr, no traceback, exit ``code``."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(code)
