"""``rag-eval-kilt GUESS GOLD``: KILT's official downstream, KILT and page-level retrieval scores of a guess
file against a gold file, in KILT's argument order, printed as one JSON object::

    {"downstream": {"accuracy", "em", "f1", "rougel"},
     "kilt": {"KILT-accuracy", "KILT-em", "KILT-f1", "KILT-rougel"},
     "retrieval": {"Rprec", "recall@5"}}

The definitions are those of ``kilt/eval_downstream.py`` (see :mod:`rag_lightning.tasks.kilt`). A missing
file or a bad line: one line naming file, line and field on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from rag_lightning.data.textio import DataError
from rag_lightning.tasks.kilt import evaluate_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rag-eval-kilt", description=__doc__.split("\n\n")[0])
    parser.add_argument("guess", help="predictions, KILT jsonl (id, output: [{answer, provenance}])")
    parser.add_argument("gold", help="gold KILT jsonl file, e.g. nq-dev-kilt.jsonl")
    args = parser.parse_args(argv)
    try:
        result = evaluate_files(args.guess, args.gold)
    except (DataError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
