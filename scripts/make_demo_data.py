"""Build the bundled demo data (rag_lightning/assets/squad_demo) from SQuAD v1.1 dev.

Usage: python scripts/make_demo_data.py /path/to/dev-v1.1.json [--out rag_lightning/assets/squad_demo]
       [--words 48]
       python scripts/make_demo_data.py --tasks     (demo_longform and demo_verify from squad_demo)

Takes every paragraph of a few articles and cuts it, DPR-style, into passages of about ``--words`` words
(non-overlapping word windows of equal size, ids ``{article_idx}-{para_idx}-{window}`` in the full dev file,
title with underscores as spaces). Short passages let the generator see the whole passage next to the
question in few tokens. The questions of those articles are split, by question and seeded, into val (100),
test (100) and train (the rest): held-out questions over the same corpus. A question's ``gold_ids`` are the
windows of its paragraph that hold an answer span (SQuAD's ``answer_start``; a span cut by a window border
counts for both windows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rag_lightning.data.readers import read_questions  # noqa: E402

ARTICLES = ["Warsaw", "Steam_engine", "Oxygen", "Amazon_rainforest", "Geology", "Immune_system"]
N_VAL, N_TEST, SEED, WORDS = 100, 100, 0, 48


def word_windows(text: str, words: int) -> list[tuple[int, int]]:
    """(start, end) character spans of ceil(n / words) consecutive word windows of near-equal word count."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    n = max(1, math.ceil(len(spans) / words))
    cuts = [round(i * len(spans) / n) for i in range(n + 1)]
    return [(spans[a][0], spans[b - 1][1]) for a, b in zip(cuts, cuts[1:]) if b > a]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("squad_dev", type=Path, nargs="?")
    ap.add_argument("--tasks", action="store_true", help="build demo_longform / demo_verify from squad_demo")
    ap.add_argument("--out", type=Path, default=ROOT / "rag_lightning" / "assets" / "squad_demo")
    ap.add_argument("--words", type=int, default=WORDS)
    args = ap.parse_args()
    if args.tasks:
        from _task_demos import build_task_demos

        build_task_demos(ROOT / "rag_lightning" / "assets")
        return
    if args.squad_dev is None:
        ap.error("the SQuAD dev file is required (or --tasks)")
    raw = args.squad_dev.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    data = json.loads(raw.decode("utf-8"))["data"]
    titles = [a["title"] for a in data]
    idx = sorted(titles.index(t) for t in ARTICLES)

    passages: list[dict] = []
    gold: dict[str, list[str]] = {}  # SQuAD question id -> ids of the windows holding an answer span
    cut = 0  # questions whose first answer span crosses a window border
    for a in idx:
        title = data[a]["title"].replace("_", " ")
        for p, para in enumerate(data[a]["paragraphs"]):
            text = para["context"]
            wins = word_windows(text, args.words)
            ids = [f"{a}-{p}-{w}" for w in range(len(wins))]
            passages += [{"id": i, "title": title, "text": text[s:e]} for i, (s, e) in zip(ids, wins)]
            for qa in para["qas"]:
                hits: list[str] = []
                for j, ans in enumerate(qa["answers"]):
                    s0, e0 = ans["answer_start"], ans["answer_start"] + len(ans["text"])
                    inside = [i for i, (s, e) in zip(ids, wins) if s <= s0 and e0 <= e]
                    cut += j == 0 and not inside
                    hits += inside or [i for i, (s, e) in zip(ids, wins) if s < e0 and s0 < e]
                gold[qa["id"]] = list(dict.fromkeys(hits))
    questions = read_questions(args.squad_dev, "squad", articles=idx)
    rows = [
        {"question": q.question, "answers": q.answers, "id": q.id, "gold_ids": gold[q.id]} for q in questions
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
    n_par = sum(len(data[a]["paragraphs"]) for a in idx)
    (args.out / "README.md").write_text(
        f"""# squad_demo: a small bundled QA + passage set

Source: SQuAD v1.1 development set (Rajpurkar, Zhang, Lopyrev, Liang, "SQuAD: 100,000+ Questions for
Machine Comprehension of Text", EMNLP 2016), file `dev-v1.1.json`,
sha256 `{sha}`.
Licence: CC BY-SA 4.0 (as the source); this is a derived subset.

Made by `scripts/make_demo_data.py --words {args.words}` (deterministic; re-run it to rebuild).

- Articles ({len(idx)}; `#` = index in the dev file): {arts}.
- `passages.jsonl`: the {n_par} paragraphs of those articles cut DPR-style into {len(passages)} passages of
  about {args.words} words (each paragraph into ceil(words / {args.words}) consecutive, non-overlapping
  windows of near-equal word count),
  `{{"id": "<article_idx>-<para_idx>-<window>", "title": <article title, "_" -> " ">, "text": <window>}}`.
- Questions: all {len(rows)} questions of those articles, each with all its gold answers (deduplicated, order
  kept), its SQuAD `id` and `gold_ids` (the windows of the paragraph it was asked on that hold an answer
  span, by SQuAD's `answer_start`; the first answer span of {cut} questions ({100 * cut / len(rows):.1f}%)
  crosses a window border, and then both windows count). Split by question with `random.Random({SEED}).shuffle`:
  val = first {N_VAL}, test = next {N_TEST}, train = the rest; each file keeps dev-file order. Held-out
  questions, same corpus.
- Counts: train {len(train)}, val {len(val)}, test {len(test)} questions; {len(passages)} passages.
""",
        encoding="utf-8",
    )
    print(f"wrote {args.out}: {len(passages)} passages, train/val/test {len(train)}/{len(val)}/{len(test)}")


if __name__ == "__main__":
    main()
