"""Alias of `rag-eval-retrieval` (rag_lightning/commands/eval_retrieval.py), for commands written as `python scripts/eval_retrieval.py ...`."""

from rag_lightning.commands.eval_retrieval import main

if __name__ == "__main__":
    main()
