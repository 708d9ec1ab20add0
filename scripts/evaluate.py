"""Alias of `rag-evaluate` (rag_lightning/commands/evaluate.py), for commands written as `python scripts/evaluate.py ...`."""

from rag_lightning.commands.evaluate import main

if __name__ == "__main__":
    main()
