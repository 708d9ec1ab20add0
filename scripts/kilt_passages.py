#!/usr/bin/env python
"""Cut KILT's knowledge source into 100-word passages, written once as a tsv (streamed, flat memory):

    python scripts/kilt_passages.py /data/kilt/kilt_knowledgesource.json /data/kilt/kilt_w100_title.tsv

Columns ``id<TAB>text<TAB>title<TAB>wikipedia_id`` with a header (the corpus registry name ``kilt_w100``
reads it, keeping ``wikipedia_id``). Training can also read ``kilt_knowledgesource.json`` directly (registry
name ``kilt_ks``): the same passages are cut while the corpus is converted to Arrow. See docs/kilt.md.
"""

from __future__ import annotations

import argparse
import sys

from rag_lightning.data.kilt import write_passages_tsv
from rag_lightning.data.textio import DataError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="kilt_knowledgesource.json (one page per line)")
    parser.add_argument("out", help="the tsv to write")
    parser.add_argument("--words", type=int, default=100, help="words per passage (default 100)")
    args = parser.parse_args(argv)
    try:
        n, path = write_passages_tsv(args.source, args.out, passage_words=args.words)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{n} passages -> {path}")


if __name__ == "__main__":
    main()
