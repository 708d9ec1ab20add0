"""Alias of `rag-build-index` (rag_lightning/commands/build_index.py), for commands written as `python scripts/build_index.py ...`."""

from rag_lightning.commands.build_index import main

if __name__ == "__main__":
    main()
