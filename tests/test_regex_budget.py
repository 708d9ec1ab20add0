"""Answer regexes under a time budget: catastrophic patterns are "no match", logged once with file:line,
on every rank of a gloo run, and a SIGTERM flag is seen between matches."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_lightning import metrics
from rag_lightning.data.readers import read_questions

HOSTILE = [r"(a|aa)+$", r"(x+x+)+y"]
LONG = {"(a|aa)+$": "a" * 5000 + "b", "(x+x+)+y": "x" * 5000}


def _trec(path: Path) -> Path:
    rows = ["1\tfactoid\twhich year?\t18\\d\\d"] + [
        f"{i + 2}\tfactoid\thostile {i}?\t{p}" for i, p in enumerate(HOSTILE)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(autouse=True)
def _short_budget():
    before = metrics.REGEX_TIMEOUT_S
    metrics.set_regex_timeout(0.05)
    metrics._TIMED_OUT.clear()
    yield
    metrics.set_regex_timeout(before)
    metrics._TIMED_OUT.clear()


def test_catastrophic_pattern_is_no_match_and_logged_once_with_file_line(tmp_path, caplog) -> None:
    qa = read_questions(_trec(tmp_path / "curated-test.tsv"))
    caplog.set_level(logging.WARNING, logger="rag_lightning.metrics")
    for ex in qa.examples[1:]:
        text = LONG[ex.answers[0]]
        assert metrics.exact_match(text, ex.answers, regex=True) == 0.0
        assert not metrics.has_answer(text, ex.answers, regex=True)
        assert metrics.recall_at_k([[text, text]], [ex.answers], ks=(1, 2), regex=True) == {1: 0.0, 2: 0.0}
    assert set(metrics.regex_timeouts()) == set(HOSTILE)
    warned = [r.getMessage() for r in caplog.records if "time budget" in r.getMessage()]
    assert len(warned) == 2  # once per pattern, not once per match
    for i, pattern in enumerate(HOSTILE):
        assert any(f"curated-test.tsv:{i + 2}:" in m and repr(pattern) in m for m in warned), warned
    # a well-behaved pattern is unaffected, and a hostile one still matches nothing after its timeout
    assert metrics.exact_match("1889 or so", qa.examples[0].answers, regex=True) == 1.0
    assert metrics.exact_match("aa", [HOSTILE[0]], regex=True) == 0.0


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        metrics.set_regex_timeout(0)


def _rank(rank: int, world: int, init: str, trec: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        metrics.set_regex_timeout(0.05)
        qa = read_questions(trec)
        ex = qa.examples[1 + rank]  # each rank evaluates its own hostile pattern
        text = LONG[ex.answers[0]]
        res = metrics.em_f1([text], [ex.answers], regex=True)
        rec = metrics.recall_at_k([[text] * 3], [ex.answers], ks=(1, 3), regex=True)
        done = torch.tensor([1.0 + res["em"] + rec[3]])
        dist.all_reduce(done)  # both ranks reach this: neither hangs in its pattern
        Path(out, f"rank{rank}").write_text(f"{done.item()} {sorted(metrics.regex_timeouts())}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_ranks_both_finish_with_catastrophic_patterns(tmp_path) -> None:
    trec = _trec(tmp_path / "curated-test.tsv")
    init = f"file://{tmp_path / 'pg'}"
    ctx = mp.spawn(_rank, args=(2, init, str(trec), str(tmp_path)), nprocs=2, join=False)
    for _ in range(120):  # a hang detector, not a timing assert
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("a rank hung in a catastrophic answer regex")
    for rank in range(2):
        done, _, patterns = Path(tmp_path, f"rank{rank}").read_text().partition(" ")
        assert float(done) == 2.0 and HOSTILE[rank] in patterns


@pytest.mark.slow
def test_sigterm_flag_is_seen_between_budgeted_matches(tmp_path) -> None:
    """As Lightning's SIGTERM handler does, the handler only sets a flag; the loop checks it between matches."""
    script = tmp_path / "loop.py"
    script.write_text(
        textwrap.dedent("""
        import signal, sys
        from rag_lightning import metrics
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        metrics.set_regex_timeout(0.05)
        print("ready", flush=True)
        for i in range(10_000):
            metrics.exact_match("x" * 100_000, [f"(x+x+)+y{i}"], regex=True)  # a new hostile pattern each time
            if stop:
                sys.exit(5)
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 5
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM was not handled: a regex match never returned")
