"""rag-eval-kilt against the definitions of KILT's kilt/eval_downstream.py and kilt/eval_retrieval.py, on hand-made
cases whose expected values are worked out below (a lowercasing or punctuation-stripping ROUGE, a missing or
wrong KILT gating, a recall that ignores evidence sets, or an R-precision over passages would each fail)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rag_lightning import eval_kilt
from rag_lightning.tasks import kilt

ROOT = Path(__file__).resolve().parents[1]
W = 2.0 * ((1.0 * 1.0) / (1.0 + 1.0 + 1e-8))  # the rouge package's F of two identical texts: 0.999999995


def _prov(*pages):
    return [
        {"wikipedia_id": p, "title": f"t{p}", "start_paragraph_id": 1, "end_paragraph_id": 1} for p in pages
    ]


GOLD = [
    # a: normalized EM only (case, article, "!"); rouge keeps case and punctuation -> 0; R-prec 1 -> KILT counts
    {"id": "a", "input": "q", "output": [{"answer": "The Eiffel Tower", "provenance": _prov("10")}]},
    # b: FEVER-like, two evidence sets; guessed pages 3, 1, 9: R-prec max(1/2, 1/1) = 1; recall: one set of two
    # completed -> 1/2
    {
        "id": "b",
        "input": "claim",
        "output": [
            {"answer": "SUPPORTS", "provenance": _prov("1", "2")},
            {"answer": "SUPPORTS", "provenance": _prov("3")},
        ],
    },
    # c: right answer, gold page second (int id in the gold file): R-prec 0 -> every KILT score 0; recall@5 1
    {"id": 3, "input": "q", "output": [{"answer": "Paris", "provenance": _prov(5)}]},
    # d: empty guess answer -> 0 downstream (and KILT) although the page is right
    {"id": "d", "input": "q", "output": [{"answer": "x", "provenance": _prov("7")}]},
    # e: long form, no provenance: EM 1 after normalization; rouge splits the reference at "." -> union LCS 4 of
    # 6 distinct reference words, 5 distinct guess words
    {"id": "e", "input": "q", "output": [{"answer": "The cat sat. On the mat"}]},
]
GUESS = [
    {"id": "e", "output": [{"answer": "the cat sat on the mat", "provenance": []}]},
    {"id": "a", "output": [{"answer": " eiffel tower! ", "provenance": _prov("10", "11", "10")}]},
    {"id": "b", "output": [{"answer": "SUPPORTS", "provenance": _prov("3", "1", "9")}]},
    {"id": " 3", "output": [{"answer": "Paris", "provenance": _prov("6", "5 ")}]},
    {"id": "d", "output": [{"answer": "  ", "provenance": _prov("7")}]},
    {"id": "extra", "output": [{"answer": "ignored"}]},
]
P_E, R_E = 4 / 5, 4 / 6
ROUGE_E = 2.0 * ((P_E * R_E) / (P_E + R_E + 1e-8))
EXPECTED = {
    "downstream": {"accuracy": 2 / 5, "em": 4 / 5, "f1": 4 / 5, "rougel": (W + W + ROUGE_E) / 5},
    "kilt": {"KILT-accuracy": 1 / 5, "KILT-em": 2 / 5, "KILT-f1": 2 / 5, "KILT-rougel": W / 5},
    "retrieval": {"Rprec": 3 / 5, "recall@5": (1 + 0.5 + 1 + 1 + 0) / 5},
}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_scores(got: dict, want: dict) -> None:
    assert list(got) == list(want) and all(list(got[g]) == list(want[g]) for g in want)
    for g in want:
        for k, v in want[g].items():
            assert got[g][k] == pytest.approx(v, abs=1e-12), (g, k, got[g][k], v)


def test_hand_cases(tmp_path: Path, capsys: pytest.CaptureFixture):
    gold, guess = _write(tmp_path / "gold.jsonl", GOLD), _write(tmp_path / "guess.jsonl", GUESS)
    eval_kilt.main([str(guess), str(gold)])  # KILT's order: GUESS GOLD
    _assert_scores(json.loads(capsys.readouterr().out), EXPECTED)


def test_per_example_definitions():
    assert abs(W - 0.999999995) < 1e-15
    assert kilt.rougel("Paris", "Paris") == W
    assert kilt.rougel("paris", "Paris") == 0.0  # case kept
    assert kilt.rougel("...", "Paris") == 0.0  # no sentence: the package raises, KILT scores 0
    assert kilt.rougel("the cat sat on the mat", "The cat sat. On the mat") == ROUGE_E
    e = kilt.example_scores(kilt.guess_from_record(GUESS[1]), kilt.gold_from_record(GOLD[0]))
    assert (e["accuracy"], e["em"], e["f1"], e["rougel"], e["Rprec"]) == (0.0, 1.0, 1.0, 0.0, 1.0)
    assert (e["KILT-em"], e["KILT-accuracy"]) == (1.0, 0.0)


def test_evidence_sets_and_r_precision():
    gold = kilt.gold_from_record(
        {"id": 1, "output": [{"provenance": _prov("1")}, {"provenance": _prov("1", "2")}, {"provenance": []}]}
    )
    assert gold.evidence_sets == (frozenset({"1"}), frozenset({"1", "2"}), frozenset())
    # page 1 completes set 0 and half of set 1 (one rank entry each); the empty set is never completed
    assert kilt.evidence_rank(["1"], gold.evidence_sets) == [True, "evidence_set:1"]
    assert kilt.recall_at_k(["1"], gold.evidence_sets, 5) == 1 / 3
    assert kilt.evidence_rank(["9", "1", "2"], gold.evidence_sets) == [False, True, True]
    assert kilt.recall_at_k(["9", "1", "2"], gold.evidence_sets, 2) == 1 / 3  # only the first 2 entries
    assert kilt.recall_at_k([], gold.evidence_sets, 5) == 0.0
    assert kilt.r_precision(["2", "1"], gold.page_lists) == 1.0  # output 1: R = 2, both in the first 2
    assert kilt.r_precision(["2", "9"], gold.page_lists) == 0.5
    # a provenance entry without wikipedia_id: skipped for R-precision, an unmatchable "" in its evidence set
    odd = kilt.gold_from_record(
        {"id": 2, "output": [{"provenance": [{"wikipedia_id": "1"}, {"title": "T"}]}]}
    )
    assert odd.page_lists == (("1",),) and odd.evidence_sets == (frozenset({"1", ""}),)
    assert (
        kilt.r_precision(["1"], odd.page_lists) == 1.0
        and kilt.recall_at_k(["1"], odd.evidence_sets, 5) == 0.0
    )


def test_prediction_record_dedupes_pages_in_rank_order(tmp_path: Path):
    rec = kilt.prediction_record("q1", "Paris", ["5", "7", "5", "9"], ["P5", "P7", "P5b", "P9"])
    assert rec == {
        "id": "q1",
        "output": [
            {
                "answer": "Paris",
                "provenance": [
                    {"wikipedia_id": "5", "title": "P5"},
                    {"wikipedia_id": "7", "title": "P7"},
                    {"wikipedia_id": "9", "title": "P9"},
                ],
            }
        ],
    }
    out = kilt.write_predictions(tmp_path / "sub" / "guess.jsonl", [rec])
    assert [json.loads(s) for s in out.read_text().splitlines()] == [rec]
    assert not list((tmp_path / "sub").glob("*.tmp"))


@pytest.mark.parametrize(
    "gold_rows, guess_rows, message",
    [
        (GOLD[:1], [], r"gold.jsonl:1: field 'id': no prediction for id 'a'"),
        (GOLD[:1], [GUESS[1], GUESS[1]], r"guess.jsonl:2: field 'id': duplicate id 'a'"),
        (GOLD[:1], [{"id": "a", "output": []}], r"guess.jsonl:1: field 'output': expected a non-empty list"),
        ([{"id": "a", "output": [{"answer": 3}]}], GUESS[1:2], r"gold.jsonl:1: field 'output\[0\].answer'"),
        ([{"id": "a", "output": [{"provenance": []}]}], GUESS[1:2], r"gold.jsonl:1: .*no gold answer"),
        (GOLD[:1], ["not json"], r"guess.jsonl:1: field '<json>'"),
    ],
)
def test_bad_input_names_file_line_field(tmp_path, capsys, gold_rows, guess_rows, message):
    gold = _write(tmp_path / "gold.jsonl", gold_rows)
    guess = tmp_path / "guess.jsonl"
    guess.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in guess_rows))
    with pytest.raises(SystemExit) as e:
        eval_kilt.main([str(guess), str(gold)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.slow
def test_console_entry_point(tmp_path: Path):
    gold, guess = _write(tmp_path / "gold.jsonl", GOLD), _write(tmp_path / "guess.jsonl", GUESS)
    proc = subprocess.run(
        [sys.executable, "-m", "rag_lightning.eval_kilt", str(guess), str(gold)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _assert_scores(json.loads(proc.stdout), EXPECTED)
