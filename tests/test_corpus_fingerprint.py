"""The corpus fingerprint follows the content: a copy finds its conversion; ranks that see different contents
stop with one error each, never wait for a cache nobody builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from rag_lightning.data import corpus as corpus_mod
from rag_lightning.data.corpus import Corpus, content_digest

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = [{"id": f"p{i}", "title": f"T{i}", "text": f"passage number {i} about things"} for i in range(5)]


def _jsonl(path: Path, rows: list[dict] = PASSAGES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(src: Path, cache: Path) -> Path:
    return Corpus.prepare(src, cache_dir=cache, max_passage_tokens=16)


def test_a_copy_elsewhere_finds_the_existing_conversion(tmp_path, monkeypatch) -> None:
    src = _jsonl(tmp_path / "a" / "psgs.jsonl")
    first = _prepare(src, tmp_path / "cache")
    copy = tmp_path / "scratch" / "node1" / "psgs.jsonl"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(src, copy)
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))  # another path, another mtime
    monkeypatch.setattr(corpus_mod, "_write_raw", lambda *a, **k: pytest.fail("converted again"))
    assert _prepare(copy, tmp_path / "cache") == first  # so its prepared indexes (stamped by it) match too
    os.utime(src)  # touched: hashed again, same content, same conversion
    assert _prepare(src, tmp_path / "cache") == first


def test_changed_content_is_another_fingerprint(tmp_path) -> None:
    src = _jsonl(tmp_path / "psgs.jsonl")
    before = Corpus.fingerprint_of(src, cache_dir=tmp_path / "cache")
    _jsonl(src, [*PASSAGES[:-1], {**PASSAGES[-1], "text": "passage number 4 about thingz"}])  # same size
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 1))
    assert Corpus.fingerprint_of(src, cache_dir=tmp_path / "cache") != before


def test_content_is_hashed_once_per_path_size_and_mtime(tmp_path, monkeypatch) -> None:
    src = _jsonl(tmp_path / "psgs.jsonl")
    digest = content_digest(src, tmp_path / "cache", remember=True)
    monkeypatch.setattr(corpus_mod, "new_hasher", lambda: pytest.fail("hashed again"))
    monkeypatch.setattr(corpus_mod, "_DIGESTS", {})  # another process: only the file in the cache
    assert content_digest(src, tmp_path / "cache") == digest
    (arrow := tmp_path / "dir").mkdir()
    monkeypatch.undo()
    (arrow / "a.arrow").write_bytes(b"12")
    one = content_digest(arrow)
    (arrow / "a.arrow").rename(arrow / "b.arrow")  # same bytes, another file name: another content
    assert content_digest(arrow) != one


class _ChangeCorpusOnRankZero(Callback):
    """Instantiated (as a callback) by train.py after local rank 0 converted the corpus and before the trainer
    starts rank 1: appends a passage, as a job touching the file in between would."""

    def __init__(self, path: str) -> None:
        super().__init__()
        if os.environ.get("LOCAL_RANK", "0") == "0":
            with open(path, "a") as f:
                f.write(
                    json.dumps({"id": "late", "title": "Late", "text": "appended after the conversion"})
                    + "\n"
                )


@pytest.mark.slow
@pytest.mark.ddp
def test_ranks_seeing_different_corpora_both_fail(tmp_path) -> None:
    src = tmp_path / "data" / "passages.jsonl"
    src.parent.mkdir()
    shutil.copyfile(ROOT / "rag_lightning" / "assets" / "squad_demo" / "passages.jsonl", src)
    cmd = [
        sys.executable, str(ROOT / "train.py"), "trainer=ddp_sim", "retriever=tiny", "model=tiny",
        f"data.corpus.path={src}", "data.max_train_examples=4", "data.max_eval_examples=2", "data.batch_size=2",
        "trainer.max_steps=1", "validate_before_fit=false", "test=false", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", f"+callbacks.change._target_={__name__}._ChangeCorpusOnRankZero",
        f"+callbacks.change.path={src}", f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache",
        f"paths.root_dir={ROOT}", f"hydra.run.dir={tmp_path}/run",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )  # hang guard
    assert proc.returncode == 2, proc.stderr[-3000:]
    # one line from each rank (both write to the same pipe: the two may share a line)
    assert proc.stderr.count("error: ") == proc.stderr.count("the ranks see different corpus contents") == 2
