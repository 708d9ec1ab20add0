"""Alias of `rag-eval-retrieval` (rag_lightning/commands/eval_retrieval.py), for commands written as
`python scripts/eval_retrieval.py ...`; the older `+modes=` / `+eval_ks=` spelling still works here."""

import sys

from rag_lightning.commands.eval_retrieval import main

if __name__ == "__main__":
    sys.argv = [a[1:] if a.startswith(("+modes=", "+eval_ks=")) else a for a in sys.argv]
    main()
