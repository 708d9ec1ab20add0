"""Entry point: `python train.py [+experiment=NAME] [key=value ...]` (see README.md)."""

import hydra
from omegaconf import DictConfig

from rag_lightning import resolvers  # noqa: F401  (registers ${minilm:} and ${asset:...} before composing)
from rag_lightning.train import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
