"""The generation and classification demo sets, derived from the bundled squad_demo (same passages, all its
questions). Run through ``python scripts/make_demo_data.py --tasks`` (deterministic).

Split by article (squad_demo's own split is by question): the questions of the two smallest articles are held
out, ``VAL_ARTICLE`` (Geology) for val and ``TEST_ARTICLE`` (Amazon rainforest) for test, ``N_EVAL`` of each
drawn with a seeded shuffle (ordered by paragraph, as in the dev file); train = every question of the other four articles. No
article has questions in two splits; the passages of all six stay the corpus.

- ``demo_longform``: input = the question; target = the sentence of its gold paragraph that holds the
  answer (MS-MARCO-like well-formed answers); ``gold_ids`` kept.
- ``demo_verify``: input = ``{question} Answer: {candidate}``; label ``SUPPORTS`` when the candidate is the
  question's first gold answer, ``REFUTES`` when it is another question's answer of the same kind (number,
  name, other) in the same split that matches none of the question's gold answers. Each question gives one
  example; the labels alternate over a seeded shuffle, so each split is balanced.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from rag_lightning.metrics import normalize_answer

SEED = 0
# article index in the SQuAD v1.1 dev file (the first part of a passage id), as in squad_demo
VAL_ARTICLE, TEST_ARTICLE, N_EVAL = "21", "16", 100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\u201c])")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def paragraphs(passages: list[dict]) -> dict[str, str]:
    """``{article}-{paragraph}`` -> the paragraph's text, its windows joined in order."""
    parts: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for p in passages:
        a, para, w = p["id"].split("-")
        parts[f"{a}-{para}"].append((int(w), p["text"]))
    return {k: " ".join(t for _, t in sorted(v)) for k, v in parts.items()}


def answer_sentence(paragraph: str, window: str, answers: list[str]) -> str | None:
    """The sentence of ``paragraph`` that holds the first answer found, preferring one that overlaps the gold
    ``window``."""
    sentences = _SENTENCE_END.split(paragraph)
    for answer in answers:
        hits = [s for s in sentences if answer in s]
        if hits:
            return next((s for s in hits if s in window or window in s or s[:30] in window), hits[0]).strip()
    return None


def kind(answer: str) -> str:
    if re.match(r"[\d$]", answer.strip()):
        return "number"
    return "name" if answer[:1].isupper() else "other"


def longform(rows: list[dict], paras: dict[str, str], windows: dict[str, str]) -> list[dict]:
    out = []
    for r in rows:
        gold = r["gold_ids"][0]
        para = paras["-".join(gold.split("-")[:2])]
        sentence = answer_sentence(para, windows[gold], r["answers"])
        if sentence:
            out.append({"input": r["question"], "target": sentence, "id": r["id"], "gold_ids": r["gold_ids"]})
    return out


def verify(rows: list[dict], split: str) -> list[dict]:
    by_kind: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_kind[kind(r["answers"][0])].append(r["answers"][0])
    rng = random.Random(f"{SEED}-{split}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = []
    for n, i in enumerate(order):
        r = rows[i]
        gold = {normalize_answer(a) for a in r["answers"]}
        if n % 2 == 0:
            candidate, label = r["answers"][0], "SUPPORTS"
        else:
            pool = [a for a in by_kind[kind(r["answers"][0])] if normalize_answer(a) not in gold]
            candidate, label = rng.choice(pool), "REFUTES"
        out.append({"input": f"{r['question']} Answer: {candidate}", "label": label, "id": r["id"],
                    "gold_ids": r["gold_ids"]})  # fmt: skip
    return sorted(out, key=lambda x: [r["id"] for r in rows].index(x["id"]))


def article(row: dict) -> str:
    """The article of a squad_demo question: the first part of its first gold passage id."""
    return row["gold_ids"][0].split("-")[0]


def split_by_article(rows: list[dict]) -> dict[str, list[dict]]:
    """squad_demo questions (dev-file order) -> train / val / test by article (module docstring)."""
    held = {"val": VAL_ARTICLE, "test": TEST_ARTICLE}
    out = {"train": [r for r in rows if article(r) not in held.values()]}
    for split, a in held.items():
        idx = [i for i, r in enumerate(rows) if article(r) == a]
        random.Random(f"{SEED}-{split}-article").shuffle(idx)
        out[split] = [rows[i] for i in sorted(idx[:N_EVAL])]
    return out


def build_task_demos(assets: Path) -> None:
    src = assets / "squad_demo"
    passages = _read(src / "passages.jsonl")
    paras, windows = paragraphs(passages), {p["id"]: p["text"] for p in passages}
    every = [r for split in ("train", "val", "test") for r in _read(src / f"{split}.jsonl")]
    order = {p["id"]: i for i, p in enumerate(passages)}  # dev-file order of the questions' paragraphs
    every.sort(key=lambda r: order[r["gold_ids"][0]])
    for split, rows in split_by_article(every).items():
        lf, vf = longform(rows, paras, windows), verify(rows, split)
        _write(assets / "demo_longform" / f"{split}.jsonl", lf)
        _write(assets / "demo_verify" / f"{split}.jsonl", vf)
        n_sup = sum(r["label"] == "SUPPORTS" for r in vf)
        print(
            f"{split}: demo_longform {len(lf)} of {len(rows)} questions; demo_verify {len(vf)} ({n_sup} SUPPORTS)"
        )
