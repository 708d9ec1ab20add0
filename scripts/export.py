"""Alias of `rag-export` (rag_lightning/commands/export.py), for commands written as `python scripts/export.py ...`."""

from rag_lightning.commands.export import main

if __name__ == "__main__":
    main()
