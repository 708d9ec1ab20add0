"""Entry point: `python train.py [+experiment=NAME] [key=value ...]` (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...} before composing)
from rag_lightning.preflight import ConfigError, preflight


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        preflight(cfg)  # missing models / data files: one clear message, before the heavy imports
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from rag_lightning.data.textio import DataError
    from rag_lightning.train import train

    try:
        return train(cfg)
    except DataError as e:  # a bad question set or corpus row: file, line and field, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
