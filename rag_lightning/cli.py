"""`rag-train` (the console script of an installed package) and `python train.py`: one Hydra app.

Configs: the repository's `conf/`. A wheel ships that same directory as `rag_lightning/conf` (pyproject.toml maps
one onto the other, so there is a single copy); a source checkout or editable install reads `<repo>/conf`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...} before composing)
from rag_lightning.preflight import ConfigError, check_run, preflight


def conf_dir() -> str:
    """The config directory: `rag_lightning/conf` when installed from a wheel, else the checkout's `conf/`."""
    package = Path(__file__).resolve().parent
    candidates = (package / "conf", package.parent / "conf")
    for d in candidates:
        if (d / "train.yaml").is_file():
            return str(d)
    raise FileNotFoundError(
        f"rag-lightning's configs (train.yaml) are in neither {candidates[0]} (installed package) nor "
        f"{candidates[1]} (source checkout): reinstall the package, or run train.py from the repository"
    )


def train(cfg: DictConfig) -> float | None:
    try:
        preflight(cfg)  # missing models / data files: one clear message, before the heavy imports
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    check_run(cfg)  # warnings about the config itself (e.g. a retriever start step beyond the run)
    from rag_lightning.callbacks.nonfinite import NonFiniteTrainingError
    from rag_lightning.checkpoint_io import CheckpointError
    from rag_lightning.data.textio import DataError
    from rag_lightning.train import train as run

    try:
        return run(cfg)
    # a bad row, a corrupt checkpoint, an index not built (BM25 under DDP), a setting the data contradicts (a
    # verbalizer longer than data.max_target_length): the file or key named, no traceback
    except (DataError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteTrainingError as e:  # the run diverged: the step named, the last finite checkpoint kept
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")(train)()


if __name__ == "__main__":
    main()
