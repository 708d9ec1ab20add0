"""An index built with a frozen document encoder is kept in the prepared-index store (`index.keep`), so that
evaluation, retrieval evaluation and resumes load it instead of embedding the corpus again; an index built with
a document encoder that trains is never kept (its vectors depend on the step)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_scale import _corpus, _questions, _retriever
from test_train import run_cfg

from rag_lightning.models.retriever import Retriever
from rag_lightning.retrieval import store
from rag_lightning.train import train


@pytest.fixture
def embeds(monkeypatch) -> list[int]:
    """Counts the corpus embeddings (Retriever._embed_shard calls) made from now on."""
    calls: list[int] = []
    real = Retriever._embed_shard

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(Retriever, "_embed_shard", counted)
    return calls


def test_frozen_index_is_kept_and_loaded_without_embedding(tmp_path, embeds, caplog):
    corpus, root = _corpus(tmp_path), tmp_path / "indexes"
    built = _retriever(root)
    with caplog.at_level("INFO", logger="rag_lightning.models.retriever"):
        built.ensure_index(corpus, progress=False)
    stamp = built.index_stamp(corpus)
    kept = store.prepared_path(root, stamp)
    assert built.index_source["path"] == str(kept) and store.read_stamp(kept)["passages"] == len(corpus)
    assert f"index: kept {kept} ({len(corpus)} passages, {store.stamp_text(stamp)})" in caplog.text
    assert [p.name for p in root.iterdir()] == [kept.name]  # no work files left beside it
    assert store.verify_prepared(kept, "full", len(corpus)) == len(corpus)

    fresh = _retriever(root)  # same weights (seeded), same corpus: the kept index, nothing embedded
    fresh.ensure_index(corpus, progress=False, match_weights=True)
    assert len(embeds) == 1 and fresh.index_source["path"] == str(kept)
    q = _questions()
    s_built, i_built = built.eval()(*q, k=5)
    s_fresh, i_fresh = fresh.eval()(*q, k=5)
    assert torch.equal(i_fresh, i_built) and torch.equal(s_fresh, s_built)


def test_a_damaged_kept_index_is_embedded_and_kept_again(tmp_path, embeds, caplog):
    corpus, root = _corpus(tmp_path), tmp_path / "indexes"
    _retriever(root).ensure_index(corpus, progress=False)
    (kept,) = root.iterdir()
    vectors = np.load(kept / store.VECTORS_FILE, mmap_mode="r+")
    vectors[3, 0] += 1.0  # same size, another checksum
    vectors.flush()
    del vectors
    fresh = _retriever(root)
    with caplog.at_level("WARNING", logger="rag_lightning.models.retriever"):
        fresh.ensure_index(corpus, progress=False)
    assert f"could not load {kept}" in caplog.text and "checksum" in caplog.text
    assert len(embeds) == 2 and store.verify_prepared(kept, "full", len(corpus)) == len(corpus)


@pytest.mark.parametrize(
    "kw", [{"train_doc_encoder": True}, {"index": {"keep": False}}], ids=["trained-doc-encoder", "keep-false"]
)
def test_nothing_kept_when_the_document_encoder_trains_or_keep_is_off(tmp_path, kw):
    corpus, root = _corpus(tmp_path), tmp_path / "indexes"
    r = _retriever(root, **kw)
    r.ensure_index(corpus, progress=False)
    assert r.index is not None and r.index_source["path"] is None and not root.exists()


def test_a_failure_to_keep_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    corpus = _corpus(tmp_path)
    (tmp_path / "file").write_text("")
    r = _retriever(tmp_path / "file" / "indexes")  # root under a file: nothing can be written there
    with caplog.at_level("WARNING", logger="rag_lightning.models.retriever"):
        r.ensure_index(corpus, progress=False)
    assert "index: could not keep the index under" in caplog.text
    assert r.index is not None and r.index_source["path"] is None


def _keep_worker(rank: int, world: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = _retriever(Path(tmp) / "indexes")
        assert r.index_mode == "sharded"  # mode auto under DDP: each rank embeds and holds its rows
        r.ensure_index(_corpus(Path(tmp)), progress=False)
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"path": r.index_source["path"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_under_ddp_every_rank_writes_its_rows_and_rank_0_merges_them(tmp_path):
    corpus = _corpus(tmp_path)  # converted once, before the workers
    ctx = mp.get_context("spawn")
    port = 30500 + os.getpid() % 1000
    procs = [ctx.Process(target=_keep_worker, args=(r, 2, str(tmp_path), port)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    paths = {json.loads((tmp_path / f"rank{r}.json").read_text())["path"] for r in (0, 1)}
    (kept,) = (tmp_path / "indexes").iterdir()  # the prepared directory alone: no chunk files left
    assert paths == {str(kept)} and store.verify_prepared(kept, "full", len(corpus)) == len(corpus)
    one = _retriever(tmp_path / "one")  # one process, every row: the same vectors
    one.ensure_index(corpus, progress=False)
    (single,) = (tmp_path / "one").iterdir()
    assert single.name == kept.name  # the same stamp
    np.testing.assert_allclose(store.open_vectors(kept), store.open_vectors(single), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluating_a_trained_checkpoint_loads_the_index_training_kept(tmp_path, embeds, monkeypatch, caplog):
    """A tiny run with the frozen document encoder of retriever=tiny trains; evaluating its checkpoint (a run
    with train=false ckpt_path=..., the path rag-evaluate takes too: ensure_index(match_weights=True))
    and resuming it embed nothing, and the evaluation's test figures equal those of one that embeds again."""
    tests: list[dict] = []
    monkeypatch.setattr("rag_lightning.train.print_summary", lambda cfg, trainer, b, a, t: tests.append(t))
    common = ["test=true", "trainer.limit_val_batches=1", "trainer.val_check_interval=2"]
    cfg = run_cfg(tmp_path / "run", [*common, "trainer.max_steps=2"])
    train(cfg)
    assert len(embeds) == 1
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_symlink()  # a link to the step's checkpoint, not a second copy
    (kept,) = Path(cfg.paths.cache_dir, "indexes").iterdir()

    evaluate = ["train=false", f"ckpt_path={ckpt}", *common]
    ev = run_cfg(tmp_path / "eval", evaluate)
    ev.paths.cache_dir = cfg.paths.cache_dir  # the run's: the kept index is found by its stamp
    with caplog.at_level(logging.INFO, logger="rag_lightning.models.retriever"):
        train(ev)
    assert len(embeds) == 1 and f"index: loaded {kept} " in caplog.text
    resume = run_cfg(tmp_path / "resume", [*common, "trainer.max_steps=4", f"ckpt_path={ckpt}"])
    resume.paths.cache_dir = cfg.paths.cache_dir
    train(resume)  # a resume in another output folder loads it too
    assert len(embeds) == 1
    again = run_cfg(tmp_path / "again", [*evaluate, "index.keep=false"])  # its own cache: nothing kept there
    train(again)
    assert len(embeds) == 2
    assert tests[1] and tests[1] == tests[3]
