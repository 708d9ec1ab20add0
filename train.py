"""Entry point: `python train.py [+experiment=NAME] [key=value ...]` (see README.md); installed: `rag-train`."""

from rag_lightning.cli import main

if __name__ == "__main__":
    main()
