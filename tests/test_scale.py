"""Scale: the retriever's index lifecycle (stamps, prepared indexes, all-rank decisions), numerics, -1 ids;
end to end: prepare, then train / resume / evaluate on a DPR layout load the index and change no cache file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_lightning.data.corpus import Corpus
from rag_lightning.models.encoders import Encoder
from rag_lightning.models.retriever import IndexRefreshError, Retriever
from rag_lightning.models.tiny import tiny_tokenizer
from rag_lightning.retrieval import store

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def _corpus(tmp: Path, n: int = 12) -> Corpus:
    tok = tiny_tokenizer()
    src = tmp / "passages.jsonl"
    if not src.exists():
        rows = [
            {"id": f"p{i}", "title": WORDS[i % 12], "text": " ".join(WORDS[i % 5 :][:6])} for i in range(n)
        ]
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Corpus.from_file(src, cache_dir=tmp / "cache", gen_tokenizer=tok, doc_tokenizer=tok)


def _retriever(root: Path | None = None, **kw) -> Retriever:
    torch.manual_seed(0)
    enc = Encoder.from_pretrained("tiny:bert", pooling="cls")
    index = {"device": "cpu", "root": str(root) if root else None, **kw.pop("index", {})}
    return Retriever(enc, None, n_docs=3, index=index, embed_precision="fp32", **kw)


def _questions(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tiny_tokenizer()(["alpha beta", "zeta eta theta"][:n], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_prepared_index_found_by_stamp_and_stamp_follows_weights(tmp_path, caplog):
    corpus = _corpus(tmp_path)
    r = _retriever(tmp_path / "indexes", index={"keep": False})
    stamp = r.index_stamp(corpus)
    assert set(stamp) == {
        "corpus", "doc_encoder", "factory", "dtype", "embed", "similarity", "pooling", "normalize"
    }  # fmt: skip
    r.ensure_index(corpus, progress=False)  # nothing prepared, index.keep=false: built, in memory
    assert r.index_source["path"] is None and r.index_version == 0
    emb_dir = tmp_path / "chunks"
    from rag_lightning.retrieval import embed_chunks

    embed_chunks(
        r.doc_encoder, corpus.doc_token_view(), emb_dir, chunk_size=5, progress=False, amp_dtype="fp32"
    )
    target = store.write_prepared(r.prepared_path(corpus), emb_dir, len(corpus), stamp, "float32")
    fresh = _retriever(tmp_path / "indexes", index={"keep": False})
    with caplog.at_level("INFO", logger="rag_lightning.models.retriever"):
        fresh.ensure_index(corpus, progress=False)
    assert f"index: loaded {target} ({len(corpus)} passages, {store.stamp_text(stamp)})" in caplog.text
    q = _questions()
    assert torch.equal(fresh.eval()(*q, k=4)[1], r.eval()(*q, k=4)[1])
    with torch.no_grad():  # other document-encoder weights: another stamp, the prepared index does not match
        next(fresh.doc_encoder.parameters()).add_(0.1)
    assert fresh.index_stamp(corpus)["doc_encoder"] != stamp["doc_encoder"]
    fresh.ensure_index(corpus, progress=False)  # no match_weights (validation during training): kept
    assert fresh.index_source["path"] == str(target)
    fresh.ensure_index(corpus, progress=False, match_weights=True)  # test / predict: made with these weights
    assert fresh.index_source["path"] is None and fresh.index_source["stamp"] == fresh.index_stamp(corpus)


def test_non_finite_embeddings_fail_the_refresh_and_keep_the_old_index(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    r = _retriever(train_doc_encoder=True)
    r.ensure_index(corpus, progress=False)
    old = r.index
    real = r.doc_encoder.forward
    monkeypatch.setattr(r.doc_encoder, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(IndexRefreshError, match="non-finite"):
        r.refresh_index(corpus, progress=False)
    assert r.index is old and r.index_version == 0
    monkeypatch.undo()
    r.refresh_index(corpus, progress=False)
    assert r.index is not old and r.index_version == 1 and r.index.meta["version"] == 1


@pytest.mark.parametrize("train_doc", [False, True])
def test_minus_one_ids_score_minus_inf_and_never_crash(tmp_path, train_doc):
    corpus = _corpus(tmp_path, n=4)
    assert (
        corpus.gen_tokens([1, -1])[1] == []
        and corpus.doc_tokens([-1]) == [[]]
        and corpus.titles([-1]) == [""]
    )
    r = _retriever(train_doc_encoder=train_doc)
    r.ensure_index(corpus, progress=False)
    r.train()
    scores, ids = r(*_questions(), k=6, corpus=corpus)  # k > N: padded with -1
    assert (
        (ids[:, 4:] == -1).all()
        and torch.isneginf(scores[:, 4:]).all()
        and torch.isfinite(scores[:, :4]).all()
    )
    scores[:, :4].sum().backward()  # the loss only ever sees finite scores' gradients
    assert all(torch.isfinite(p.grad).all() for p in r.query_encoder.parameters() if p.grad is not None)


def test_scores_are_float32_under_bf16_autocast(tmp_path):
    corpus = _corpus(tmp_path)
    r = _retriever().eval()
    r.ensure_index(corpus, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, ids = r(*_questions(), k=3)
        q = r.query_encoder(*_questions())
    assert scores.dtype == torch.float32
    ref = torch.einsum("bd,bkd->bk", q.float(), r.index.vectors(ids))  # exact fp32 products of the same q
    torch.testing.assert_close(scores, ref)


# ------------------------------------------------------------------ one decision for all ranks
def _refresh_worker(rank: int, world: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        corpus = _corpus(Path(tmp))
        r = _retriever(train_doc_encoder=True).eval()
        assert r.index_mode == "sharded"  # mode auto under DDP
        r.ensure_index(corpus, progress=False)
        old, real = r.index, r._embed_shard
        if rank == 1:  # only rank 1 fails; rank 0 succeeds and must not swap (nor hang)
            r._embed_shard = lambda *a: (_ for _ in ()).throw(MemoryError("injected on rank 1"))
        try:
            r.refresh_index(corpus, progress=False)
            failed = False
        except IndexRefreshError:
            failed = True
        r._embed_shard = real
        q = _questions()
        _, ids = r(*q, k=3)  # a collective search: both ranks still agree on the index
        out = {"failed": failed, "kept": r.index is old, "version": r.index_version, "ids": ids.tolist()}
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_refresh_failure_on_one_rank_keeps_the_old_index_on_every_rank(tmp_path):
    _corpus(tmp_path)  # converted once, before the workers
    ctx = mp.get_context("spawn")
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_refresh_worker, args=(r, 2, str(tmp_path), port)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [o["failed"] for o in out] == [True, True] and [o["kept"] for o in out] == [True, True]
    assert [o["version"] for o in out] == [0, 0] and out[0]["ids"] == out[1]["ids"]


# ------------------------------------------------------------------ end to end on a DPR layout
def _bench_scale():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: it imports benchmarks/_bench.py
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def _tree(*dirs: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*"))}


@pytest.mark.ddp
@pytest.mark.slow
def test_prepare_then_train_resume_evaluate_load_it(tmp_path):
    data = _bench_scale().write_dpr_layout(tmp_path / "data", 40, n_questions=6)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["+experiment=nq", "retriever=tiny", "model=tiny", f"paths.data_dir={data}",
              f"paths.cache_dir={tmp_path}/cache", f"paths.log_dir={tmp_path}/logs", f"paths.root_dir={ROOT}",
              "data.num_workers=0", "data.corpus_num_proc=2"]  # fmt: skip
    prep = [sys.executable, "-m", "rag_lightning.commands.build_index", *common, "chunk_size=16"]
    procs = [
        subprocess.Popen([*prep, f"hydra.run.dir={tmp_path}/prep{r}"], cwd=tmp_path, text=True,
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in (0, 1)
    ]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "index: prepared" in "".join(logs)
    before = _tree(data, tmp_path / "cache")

    def run(args: list[str], script: list[str] = [str(ROOT / "train.py")]) -> str:  # noqa: B006
        proc = subprocess.run([sys.executable, *script, *common, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = proc.stdout + proc.stderr
        assert "index: loaded" in log and "index: built" not in log and "converting corpus" not in log, log[
            -3000:
        ]
        assert _tree(data, tmp_path / "cache") == before  # nothing under data_dir / cache_dir changed
        return log

    train = ["trainer=ddp_sim", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.batch_size=2",
             "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "logger=csv",
             "validate_before_fit=false", "test=false", "optimized_metric=null"]  # fmt: skip
    run([*train, "trainer.max_steps=3", f"hydra.run.dir={tmp_path}/run1"])
    ckpt = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    run([*train, "trainer.max_steps=4", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/run2"])  # new dir
    assert torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    run(
        [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/eval"],
        script=["-m", "rag_lightning.commands.evaluate"],
    )
    rows = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    questions = [
        ln.split("\t")[0] for ln in (data / "retriever" / "qas" / "nq-test.csv").read_text().splitlines()
    ]
    assert [json.loads(r)["question"] for r in rows] == questions  # gathered from 2 ranks, in order, once
