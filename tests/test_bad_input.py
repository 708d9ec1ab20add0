"""Bad input is one line naming file, line and field (exit 2 from the CLI), nothing left behind: an empty corpus,
a JSON answer nested too deeply, an unknown format, answers made of invisible characters, a bad file seen by DDP
rank 1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_lightning.data.corpus import Corpus
from rag_lightning.data.readers import FORMATS, read_questions
from rag_lightning.data.textio import DataError, iter_json_array
from rag_lightning.launch import _exit_code
from rag_lightning.tokenization import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "rag_lightning" / "assets" / "squad_demo"
DEEP = "[" * 100_000 + "]" * 100_000  # past any recursion limit of the json parser


def _run_train(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "retriever=tiny", "model=tiny", *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- empty corpus


@pytest.mark.parametrize(("name", "text"), [("c.tsv", "id\ttext\ttitle\n"), ("c.jsonl", "\n\n")])
def test_empty_corpus_is_an_error_and_leaves_no_cache(tmp_path: Path, name: str, text: str):
    src, cache = tmp_path / name, tmp_path / "cache"
    src.write_text(text)
    with pytest.raises(DataError, match=rf"^{src}:1: field '<passages>': no passages read as '\w+'"):
        Corpus.prepare(src, cache_dir=cache, gen_tokenizer=tiny_tokenizer())
    assert list(cache.iterdir()) == []  # neither a 0-passage cache nor a work dir


@pytest.mark.slow
def test_empty_corpus_from_the_command_line_is_one_line_exit_2(tmp_path: Path):
    corpus = tmp_path / "passages.tsv"
    corpus.write_text("id\ttext\ttitle\n")
    proc = _run_train([f"data.corpus.path={corpus}", "data.corpus.format=tsv", "debug=fdr"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"error: {corpus}:1: field '<passages>': no passages")
    )
    assert "Traceback" not in proc.stderr
    assert not [p for p in (tmp_path / ".cache" / "rag_lightning").iterdir() if not p.name.startswith(".")]


# ----------------------------------------------------------------------------- JSON nested too deeply


def _deep_files(tmp_path: Path) -> dict[str, Path]:
    good = [{"question": "q1", "answers": ["a"]}, {"question": "q3", "answers": ["c"]}]
    rows = [json.dumps(good[0]), '{"question": "q2", "answers": ' + DEEP + "}", json.dumps(good[1])]
    files = {
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "dpr_csv": tmp_path / "d_dpr.csv",
    }
    files["jsonl"].write_text("\n".join(rows) + "\n")
    files["json"].write_text("[\n" + ",\n".join(rows) + "\n]\n")
    files["csv"].write_text(f"question\tanswers\nq1\t['a']\nq2\t{DEEP}\nq3\t['c']\n")
    files["dpr_csv"].write_text(f"q1\t['a']\nq2\t{DEEP}\nq3\t['c']\n")
    return files


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "dpr_csv"])
def test_deeply_nested_answer_is_a_row_error(tmp_path: Path, fmt: str):
    path = _deep_files(tmp_path)[fmt]
    line = 3 if fmt == "csv" else 2  # the csv's header is line 1; a JSON list's "line" is the record number
    with pytest.raises(DataError, match=rf"^{path}:{line}: field '[<>\w]+': "):
        read_questions(path, fmt=fmt)
    qa = read_questions(path, fmt=fmt, skip_bad_rows=True)
    assert [e.question for e in qa] == ["q1", "q3"] and qa.skipped == 1


def test_a_deep_record_is_skipped_across_stream_chunks(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('[{"q": "a\\"]["}, ' + DEEP + ', {"q": "b"}]')
    records = list(iter_json_array(path, chunk=64))
    assert [n for n, _ in records] == [1, 2, 3]
    assert records[0][1] == {"q": 'a"]['} and records[2][1] == {"q": "b"}
    assert isinstance(records[1][1], DataError) and "nested too deeply" in str(records[1][1])


# ----------------------------------------------------------------------------- unknown format


def test_unknown_question_format_lists_the_valid_ones(tmp_path: Path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "q", "answers": ["a"]}\n')
    with pytest.raises(
        DataError, match=r"field 'format': unknown question format 'foo'; valid formats: auto, "
    ):
        read_questions(path, fmt="foo")
    assert all(f in str(pytest.raises(DataError, read_questions, path, fmt="foo").value) for f in FORMATS)


def test_unknown_corpus_format_lists_the_valid_ones(tmp_path: Path):
    with pytest.raises(DataError, match=r"unknown corpus format 'foo'; valid formats: auto, tsv, jsonl"):
        Corpus.prepare(DEMO / "passages.jsonl", "foo", cache_dir=tmp_path)


@pytest.mark.slow
def test_unknown_format_from_the_command_line_is_one_line_exit_2(tmp_path: Path):
    proc = _run_train(["data.val_sets.0.format=foo", "debug=fdr"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        "unknown question format 'foo'; valid formats: auto, dpr_csv" in last
        and "Traceback" not in proc.stderr
    )


# ----------------------------------------------------------------------------- invisible answers


@pytest.mark.parametrize("answer", ["\u200b", "\u200b\u200c\u200d", "\ufeff", " \u2060 ", "\u00ad", "\u3164"])
def test_invisible_answers_are_rejected_like_empty_ones(tmp_path: Path, answer: str):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": ["ok"]}) + "\n" + json.dumps({"question": "q2", "answers": [answer]}) + "\n")  # fmt: skip
    with pytest.raises(DataError, match=rf"^{path}:2: field 'answers': empty answer string \(only invisible"):
        read_questions(path)
    assert len(read_questions(path, skip_bad_rows=True)) == 1


def test_visible_answers_with_invisible_characters_stay(tmp_path: Path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": ["a\u200bb", "\u00e9"]}) + "\n")
    assert read_questions(path)[0].answers == ["a\u200bb", "\u00e9"]


# ----------------------------------------------------------------------------- a bad file on DDP rank 1


def test_child_exit_codes_as_a_shell_reports_them():
    assert _exit_code(2) == 2 and _exit_code(-9) == 137 and _exit_code(-15) == 143


@pytest.mark.slow
@pytest.mark.ddp
def test_a_bad_file_on_rank_1_exits_2(tmp_path: Path):
    """Each rank reads its own copy of the question set (a node-local path): rank 1's is bad. Rank 1 says so
    in one line and exits 2, and the command (rank 0) exits 2 too, not 137 (Lightning's SIGKILL)."""
    good, bad = tmp_path / "q0.jsonl", tmp_path / "q1.jsonl"
    good.write_text((DEMO / "val.jsonl").read_text())
    bad.write_text(json.dumps({"question": "q", "answers": []}) + "\n")
    per_rank = str(tmp_path / "q${oc.env:LOCAL_RANK,0}.jsonl")
    args = ["trainer=ddp_sim", f"data.val_sets.0.path={per_rank}", "data.max_train_examples=8",
            "data.max_eval_examples=4", "trainer.max_steps=1", "validate_before_fit=false", "test=false",
            "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]  # fmt: skip
    proc = _run_train(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {bad}:1: field 'answers': empty answer list" in proc.stderr
    assert "error: rank 1 exited with code 2" in proc.stderr
