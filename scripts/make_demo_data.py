"""Build the bundled demo data (rag_lightning/assets/squad_demo) from SQuAD v1.1 dev.

Usage: python scripts/make_demo_data.py /path/to/dev-v1.1.json [--out rag_lightning/assets/squad_demo]

Keeps every paragraph of a few articles as the passage corpus (ids ``{article_idx}-{para_idx}`` in the full
dev file, title with underscores as spaces) and splits their questions, by question and seeded, into
val (100), test (100) and train (the rest): held-out questions over the same corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rag_lightning.data.readers import read_questions, squad_paragraphs  # noqa: E402

ARTICLES = ["Warsaw", "Steam_engine", "Oxygen", "Amazon_rainforest", "Geology", "Immune_system"]
N_VAL, N_TEST, SEED = 100, 100, 0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("squad_dev", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "rag_lightning" / "assets" / "squad_demo")
    args = ap.parse_args()
    sha = hashlib.sha256(args.squad_dev.read_bytes()).hexdigest()
    titles = [a["title"] for a in json.loads(args.squad_dev.read_text(encoding="utf-8"))["data"]]
    idx = sorted(titles.index(t) for t in ARTICLES)

    passages = list(squad_paragraphs(args.squad_dev, articles=idx))
    questions = read_questions(args.squad_dev, "squad", articles=idx)
    rows = [
        {"question": q.question, "answers": q.answers, "id": q.id, "gold_ids": q.gold_ids} for q in questions
    ]
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    val, test = sorted(order[:N_VAL]), sorted(order[N_VAL : N_VAL + N_TEST])
    train = sorted(order[N_VAL + N_TEST :])

    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out / "passages.jsonl", passages)
    for name, part in (("train", train), ("val", val), ("test", test)):
        _write_jsonl(args.out / f"{name}.jsonl", [rows[i] for i in part])

    arts = ", ".join(f"{titles[i]} (#{i})" for i in idx)
    (args.out / "README.md").write_text(
        f"""# squad_demo: a small bundled QA + passage set

Source: SQuAD v1.1 development set (Rajpurkar, Zhang, Lopyrev, Liang, "SQuAD: 100,000+ Questions for
Machine Comprehension of Text", EMNLP 2016), file `dev-v1.1.json`,
sha256 `{sha}`.
Licence: CC BY-SA 4.0 (as the source); this is a derived subset.

Made by `scripts/make_demo_data.py` (deterministic; re-run it to rebuild).

- Articles ({len(idx)}; `#` = index in the dev file): {arts}.
- `passages.jsonl`: every paragraph of those articles, {len(passages)} passages,
  `{{"id": "<article_idx>-<para_idx>", "title": <article title, "_" -> " ">, "text": <paragraph>}}`.
- Questions: all {len(rows)} questions of those articles, each with all its gold answers (deduplicated, order
  kept), its SQuAD `id` and `gold_ids` (the id of the paragraph it was asked on). Split by question with
  `random.Random({SEED}).shuffle`: val = first {N_VAL}, test = next {N_TEST}, train = the rest; each file
  keeps dev-file order. Held-out questions, same corpus.
- Counts: train {len(train)}, val {len(val)}, test {len(test)} questions; {len(passages)} passages.
""",
        encoding="utf-8",
    )
    print(f"wrote {args.out}: {len(passages)} passages, train/val/test {len(train)}/{len(val)}/{len(test)}")


if __name__ == "__main__":
    main()
