"""Benchmark helpers: the competing-load processes, the train-step JSON per condition, the GPU check's driver
(dry run, no-CUDA exit, a step that fails or runs past its limit). No timings are asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import _bench
    import bench_gpu
    import bench_train

    return _bench, bench_train, bench_gpu


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_load_starts_and_stops_its_processes(scripts):
    _bench = scripts[0]
    with _bench.Load(2, seconds=120) as load:
        pids = load.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert not any(_alive(p) for p in pids) and load.pids == []
    with pytest.raises(RuntimeError, match="boom"), _bench.Load(1, seconds=120) as load:
        pids = load.pids
        assert _alive(pids[0])
        raise RuntimeError("boom")
    assert not _alive(pids[0])  # stopped on the way out of an exception too
    with _bench.Load(0) as load:
        assert load.pids == []
    with pytest.raises(ValueError, match="kind"):
        _bench.Load(1, kind="nope")


def test_load_process_stops_by_itself(scripts):
    _bench = scripts[0]
    load = _bench.Load(1, seconds=0.2).__enter__()
    try:
        assert load.procs[0].wait(timeout=60) == 0  # its own time bound, nobody stopped it
    finally:
        load.stop()


def test_train_step_json_has_every_ratio(scripts, monkeypatch, tmp_path):
    _, bench_train, _ = scripts
    loads = []

    class FakeLoad:
        def __init__(self, n, seconds, kind):
            loads.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def fake_measure(a, side, variant, threads):  # ours: 2x faster at 2 threads, theirs: not
        sec = {"ours": 1.2 / threads, "theirs": 2.0}[side]
        return {"seconds": sec, "peak_bytes": {"ours": 100, "theirs": 400}[side], "loss": 3.0}

    monkeypatch.setattr(bench_train, "Load", FakeLoad)
    monkeypatch.setattr(bench_train, "_measure", fake_measure)
    out = tmp_path / "r.json"
    bench_train.main(["--mode", "both", "--threads", "1", "2", "--load", "0", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert loads == [0, 0, 2, 2] * 2  # each (threads, load) condition in its own load block, both modes
    assert data["host"]["cores"] and "commit" in data["host"]
    for mode, goal in (("step", 0.8), ("loss", 0.5)):
        conds = data[mode]["conditions"]
        assert [(c["threads"], c["load"]) for c in conds] == [(1, 0), (2, 0), (1, 2), (2, 2)]
        assert data[mode]["goal"]["time"] == goal
        for c in conds:
            for v in ("token", "sequence"):
                assert c[v]["time_ratio"] == pytest.approx(0.6 / c["threads"])
                assert c[v]["peak_memory_ratio"] == pytest.approx(0.25) and c[v]["loss_rel_diff"] == 0
        assert data[mode]["meets_goals"] is (mode == "step")  # loss: 0.6x at 1 thread is over its 0.5x
    assert data["loss"]["settings"]["loss_only"] and not data["step"]["settings"]["loss_only"]


def test_gpu_dry_run_lists_every_step(scripts, tmp_path, capsys):
    assert scripts[2].main(["--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for step in ("tests", "index", "embed", "train-step", "decode", "e2e"):
        assert f"  {step} " in out
    assert "pytest -m gpu" in out and "--d-model 1024 --layers 12" in out
    assert not (tmp_path / "r").exists()


def test_gpu_without_cuda_says_so_and_exits_0(scripts, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scripts[2].main(["--out", str(tmp_path / "r")]) == 0
    assert "no CUDA device, nothing to run" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_gpu_command_line_dry_run_and_no_cuda(tmp_path):
    """The documented commands, as processes: `benchmark.py gpu --dry-run`, and without CUDA an exit 0."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for extra in (["--dry-run"], []):
        proc = subprocess.run(
            [sys.executable, "benchmarks/benchmark.py", "gpu", "--out", str(tmp_path / "r"), *extra],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("e2e" in proc.stdout) if extra else ("no CUDA device" in proc.stdout)
    assert not (tmp_path / "r").exists()


def test_gpu_steps_failures_and_timeouts_are_recorded(scripts, tmp_path):
    bench_gpu = scripts[2]
    py = sys.executable
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    steps = {
        "ok": bench_gpu.Step("ok", 30, "", lambda out: [py, "-c", "print('fine')"]),
        "fails": bench_gpu.Step("fails", 30, "", lambda out: [py, "-c", "import sys; print('bad'); sys.exit(3)"]),
        "slow": bench_gpu.Step("slow", 1, "", lambda out: [py, "-c", sleeper + "time.sleep(60)"]),
    }  # fmt: skip
    deadline = bench_gpu.time.monotonic() + 300
    recs = {n: bench_gpu.run_step(s, tmp_path, deadline) for n, s in steps.items()}
    assert recs["ok"]["status"] == "ok" and recs["ok"]["rc"] == 0
    assert recs["fails"]["status"] == "failed" and recs["fails"]["rc"] == 3 and "bad" in recs["fails"]["tail"]
    assert recs["slow"]["status"] == "timeout" and recs["slow"]["rc"] is None
    assert bench_gpu.run_step(steps["ok"], tmp_path, bench_gpu.time.monotonic())["status"] == "skipped"
    report = {"environment": {"gpu": "test"}, "budget_s": 300, "steps": recs}
    bench_gpu.write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["steps"]["slow"]["status"] == "timeout"
    md = (tmp_path / "report.md").read_text()
    assert "| fails | failed |" in md and "| slow | timeout |" in md and "| ok | ok |" in md
