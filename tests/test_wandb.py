"""W&B logger: offline without a key, WANDB_MODE respected, runs grouped by sweep, always finished."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_sweeps import job_dirs, run_train

from rag_lightning import loggers


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_offline_without_key(no_key):
    assert not loggers.wandb_api_key_available()
    assert loggers.wandb_mode() == "offline"


def test_online_with_key_and_netrc(no_key, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert loggers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.wandb_mode() == "online"


@pytest.mark.parametrize(("env", "mode"), [("offline", "offline"), ("disabled", "disabled"),
                                           ("dryrun", "offline"), ("online", "online")])  # fmt: skip
def test_wandb_mode_env_wins(no_key, monkeypatch: pytest.MonkeyPatch, env: str, mode: str):
    monkeypatch.setenv("WANDB_MODE", env)
    assert loggers.wandb_mode() == mode


def test_logger_outside_hydra_has_no_group(no_key, tmp_path: Path):
    lg = loggers.wandb_logger(save_dir=str(tmp_path / "out"), project="p", tags=["a"], job_type="train",
                              entity=None, group="")  # fmt: skip
    init = lg._wandb_init
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "out")
    assert init["group"] is None and init["tags"] == ["a"] and init["job_type"] == "train"
    assert "entity" not in init and "anonymous" not in init
    assert "WANDB_MODE" not in os.environ  # Lightning's offline flag would have set it


def test_multirun_job_is_grouped_by_sweep(no_key, tmp_path: Path, cfg_factory):
    cfg_factory(
        "hydra.mode=MULTIRUN",
        "hydra.job.num=3",
        f"hydra.sweep.dir={tmp_path}/2026-01-01_12-00-00",
        hydra_config=True,
    )  # HydraConfig as in a sweep's job (reset after the test)
    lg = loggers.wandb_logger(save_dir=str(tmp_path / "out"))
    assert lg._wandb_init["group"] == "2026-01-01_12-00-00"
    assert lg._wandb_init["name"] == "2026-01-01_12-00-00-3"
    lg = loggers.wandb_logger(save_dir=str(tmp_path / "out"), group="mine", name="run")
    assert (lg._wandb_init["group"], lg._wandb_init["name"]) == ("mine", "run")


# ------------------------------------------------------------------ offline run files
def wandb_records(path: Path) -> Iterator[Any]:
    """Records of a `.wandb` file (LevelDB-log framing: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""  # 7-byte file header ":W&B" + magic + version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full | first | middle | last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def offline_run(job: Path) -> dict[str, Any]:
    """The job's single offline run: id, group, name, exit code (None: never finished), summary keys."""
    runs = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run in {job}/wandb, found {runs}"
    out: dict[str, Any] = {"exit_code": None, "summary": set()}
    for r in wandb_records(runs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, name=r.run.display_name)
        elif kind == "summary":
            out["summary"] |= {u.nested_key[0] if u.nested_key else u.key for u in r.summary.update}
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


@pytest.mark.slow
def test_offline_runs_finish_also_for_a_failing_job(tmp_path: Path):
    """Job 0 fails inside fit (missing checkpoint), job 1 succeeds in the same process: both runs are
    finished (exit record with the right code), and job 1 gets a fresh run in its own dir."""
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", f"ckpt_path={tmp_path / 'missing.ckpt'},null", "logger=many_loggers",
                      f"hydra.sweep.dir={sweep}"], tmp_path, tmp_path / "cache")  # fmt: skip
    assert proc.returncode != 0  # the basic launcher runs every job, then re-raises the failure
    assert "missing.ckpt" in proc.stderr
    failed, ok = (offline_run(j) for j in job_dirs(sweep))
    assert failed["exit_code"] == 1 and ok["exit_code"] == 0
    assert failed["id"] != ok["id"]
    assert failed["group"] == ok["group"] == "sweep"
    assert (failed["name"], ok["name"]) == ("sweep-0", "sweep-1")
    assert {"val/em", "val/samples"} <= ok["summary"]  # metrics and the LogSamples table
    assert (job_dirs(sweep)[1] / "csv" / "metrics.csv").is_file()
