"""Retriever conventions and candidates: per-side prefixes (where each side is tokenized, and nowhere else),
`last` pooling, the shared tower (one module, both sides' gradients), e5 / bge / contriever configs, BM25 and
hybrid candidates scored densely, rerank_k, and contrastive with BM25 hard negatives (brute-force reference)."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from test_retriever_objectives import _module, _pad

from rag_lightning.data.collate import Item, QACollator
from rag_lightning.data.corpus import Corpus, corpus_fingerprint
from rag_lightning.data.readers import QAExample
from rag_lightning.metrics import has_answer
from rag_lightning.models.encoders import Encoder, last_token
from rag_lightning.models.retriever import Retriever
from rag_lightning.models.tiny import tiny_encoder, tiny_tokenizer
from rag_lightning.retrieval.bm25 import passage_texts


def _enc(**kw) -> Encoder:
    model, tok = tiny_encoder()
    return Encoder(model, tok, **kw)


# ------------------------------------------------------------------------------------------ prefixes
def test_query_prefix_reaches_the_query_tokenizer_only():
    tok = tiny_tokenizer()
    items = [Item(QAExample(question="who wrote hamlet", answers=["shakespeare"]))]
    plain = QACollator(tok, tok)(items)
    pref = QACollator(tok, tok, query_prefix="query: ", query_max_length=5)(items)
    want = tok(["query: who wrote hamlet"], truncation=True, max_length=5)["input_ids"][0]
    assert pref["q_input_ids"][0].tolist() == want  # prefixed, at the query side's own max length
    assert plain["q_input_ids"][0].tolist() == tok(["who wrote hamlet"])["input_ids"][0]
    assert pref["g_question"] == plain["g_question"]  # the generator never sees it
    assert pref["questions"] == ["who wrote hamlet"]  # nor does BM25 (it reads the texts)


def test_passage_prefix_reaches_the_doc_tokenizer_only_and_keys_the_cache(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(
        '{"id": "a", "title": "Paris", "text": "capital of france"}\n{"id": "b", "text": "rome"}\n'
    )
    tok = tiny_tokenizer()
    kw = dict(cache_dir=tmp_path / "cache", gen_tokenizer=tok, doc_tokenizer=tok, max_passage_tokens=32)
    plain = Corpus.from_file(src, **kw)
    pref = Corpus.from_file(src, **kw, doc_prefix="passage: ")
    # no prefix: the fingerprint of before (the demo's cache stays valid); a prefix: another cache
    assert plain.fingerprint == corpus_fingerprint(src, tok, tok, 32, fmt="jsonl",
                                                   fields={"id": "id", "title": "title", "text": "text"}, sep=" / ")  # fmt: skip
    assert pref.fingerprint != plain.fingerprint and pref.path != plain.path
    assert pref.doc_tokens([0])[0] == tok("passage: Paris", "capital of france")["input_ids"]
    assert pref.doc_tokens([1])[0] == tok("passage: rome")["input_ids"]
    assert pref.gen_tokens([0, 1]) == plain.gen_tokens([0, 1])  # generator tokens untouched
    assert pref.texts([0]) == ["capital of france"]


@pytest.mark.parametrize("name", ["e5", "bge", "contriever"])
def test_published_configs_state_each_side(name, cfg_factory):
    cfg = cfg_factory(f"retriever={name}", "retriever.query_encoder.name_or_path=tiny:bert")
    want = {"e5": ("query: ", "passage: "), "bge": ("Represent this sentence for searching relevant passages: ", ""),
            "contriever": ("", "")}[name]  # fmt: skip
    assert (cfg.data.query_prefix, cfg.data.doc_prefix) == want
    assert cfg.data.doc_tokenizer == "tiny:bert"
    r = instantiate(cfg.retriever)
    assert r.shared_encoder and r.doc_encoder.model is r.query_encoder.model
    assert r.query_encoder.pooling == {"e5": "mean", "bge": "cls", "contriever": "mean"}[name]
    assert r.doc_encoder.pooling == r.query_encoder.pooling
    assert r.query_encoder.normalize == r.doc_encoder.normalize == (name != "contriever")
    assert (r.query_encoder.prefix, r.doc_encoder.prefix) == want


def test_offline_preflight_names_the_key(monkeypatch, cfg_factory):
    from rag_lightning.preflight import ConfigError, preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_factory("retriever=e5", "model=tiny", "retriever.query_encoder.name_or_path=org/not-cached-e5")
    with pytest.raises(ConfigError, match=r"retriever\.query_encoder\.name_or_path='org/not-cached-e5'"):
        preflight(cfg)


# ------------------------------------------------------------------------------------------ pooling
def test_last_pooling_takes_the_last_real_token_with_left_or_right_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)  # (B, L, d)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token(h, right), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(last_token(h, left), torch.stack([h[0, 3], h[1, 3]]))
    enc = _enc(pooling="last").eval()
    tok = enc.tokenizer
    a = tok(["who wrote hamlet"], return_tensors="pt")  # (BERT's absolute positions: right padding only)
    b = tok(["who wrote hamlet", "a much longer question about it"], padding=True, return_tensors="pt")
    assert b.attention_mask[0, -1] == 0  # padded
    torch.testing.assert_close(enc(b.input_ids, b.attention_mask)[0], enc(a.input_ids, a.attention_mask)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------------------ shared tower
def _shared(**kw) -> Retriever:
    return Retriever(_enc(pooling="mean", prefix="query: "), {"prefix": "passage: "}, n_docs=2,
                     shared_encoder=True, index={"device": "cpu"}, **kw)  # fmt: skip


def test_shared_tower_is_one_module_in_state_dict_and_parameters():
    r = _shared()
    two = Retriever(_enc(), _enc(), n_docs=2, index={"device": "cpu"})
    assert r.doc_encoder.model is r.query_encoder.model
    assert (r.query_encoder.prefix, r.doc_encoder.prefix) == ("query: ", "passage: ")
    assert not any(k.startswith("doc_encoder") for k in r.state_dict())
    assert len(r.state_dict()) == len(two.state_dict()) // 2
    assert sum(p.numel() for p in r.parameters()) == sum(p.numel() for p in r.query_encoder.parameters())
    assert r.train_doc_encoder and r.doc_encoder_changes  # trains: refreshes re-embed
    assert not _shared(train_query_encoder=False).doc_encoder_changes
    with pytest.raises(ValueError, match="conventions"):
        Retriever(_enc(), _enc(), shared_encoder=True)


def test_shared_tower_is_trained_by_both_sides_gradients():
    r = _shared().train()
    r.query_encoder.model.config.hidden_dropout_prob = 0.0
    r.eval()  # no dropout: the three passes below see the same function
    tok = r.query_encoder.tokenizer
    x = tok(["query: who wrote hamlet"], return_tensors="pt")
    y = tok(["passage: hamlet is a play by shakespeare"], return_tensors="pt")

    def grads(detach_q: bool, detach_d: bool) -> torch.Tensor:
        r.zero_grad(set_to_none=True)
        q = r.query_encoder(x.input_ids, x.attention_mask)
        d = r.doc_encoder(y.input_ids, y.attention_mask)
        ((q.detach() if detach_q else q) * (d.detach() if detach_d else d)).sum().backward()
        return torch.cat([p.grad.flatten() for p in r.parameters()])

    both, q_side, d_side = grads(False, False), grads(False, True), grads(True, False)
    assert q_side.abs().sum() > 0 and d_side.abs().sum() > 0
    torch.testing.assert_close(both, q_side + d_side)


def test_shared_tower_in_the_module_optimizer_and_checkpoint(tmp_path):
    cfg, _, model, batch = _module(tmp_path, ["retriever.shared_encoder=true", "retriever.doc_encoder=null"])
    model.scheduler_factory = None  # (no trainer here to count the steps)
    opt = model.configure_optimizers()["optimizer"]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params)
    enc_params = {id(p) for p in model.retriever.query_encoder.parameters()}
    assert enc_params <= {id(p) for p in params}
    assert not any(".doc_encoder." in k for k in model.state_dict())
    model.train()
    model.training_step(batch, 0).backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.retriever.query_encoder.parameters()
    )


# ------------------------------------------------------------------------------------------ candidates
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _module(tmp_path_factory.mktemp("cand"))


def _bm25_reference(corpus, questions: list[str]) -> np.ndarray:
    """(Q, N) BM25 scores of every passage by bm25s alone (the configured k1, b, stopwords)."""
    tok = bm25s.tokenization.Tokenizer(stopwords="en")
    model = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    model.index(
        tok.tokenize(passage_texts(corpus), return_as="ids", show_progress=False), show_progress=False
    )
    q = tok.tokenize(questions, update_vocab=False, return_as="ids", show_progress=False)
    return np.stack([model.get_scores_from_ids(ids) for ids in q])


@pytest.mark.parametrize("mode", ["bm25", "hybrid"])
def test_sparse_candidates_are_scored_by_the_trainable_dense_encoder(setup, mode):
    _, _, model, batch = setup
    r = model.retriever
    r.retrieval_mode, r.use_bm25 = mode, True
    model.eval()  # no dropout: the reference below sees the same query encoder
    try:
        r.ensure_index(model.corpus, progress=False)
        model.zero_grad(set_to_none=True)
        scores, ids = model.retrieve(batch, 3)
        if mode == "bm25":
            ref = _bm25_reference(model.corpus, batch["questions"])
            want = [sorted(range(ref.shape[1]), key=lambda i: (-row[i], i))[:3] for row in ref]
            assert ids.tolist() == want
        with torch.no_grad():
            q = r.query_encoder(batch["q_input_ids"], batch["q_attention_mask"])
            d = r.doc_encoder(*_pad(model, ids.flatten().tolist())).view(*ids.shape, -1)
        torch.testing.assert_close(scores.detach(), torch.einsum("bd,bkd->bk", q, d), atol=1e-4, rtol=1e-4)
        scores.logsumexp(-1).sum().backward()  # the loss reaches the query encoder
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.query_encoder.parameters())
    finally:
        r.retrieval_mode, r.use_bm25 = "dense", False
        model.train()


def test_rerank_keeps_the_k_best_by_the_current_document_encoder(tmp_path):
    cfg, _, model, batch = _module(tmp_path, ["retriever.train_doc_encoder=true", "retriever.rerank_k=6"])
    r = model.retriever.eval()
    with torch.no_grad():
        for p in r.doc_encoder.parameters():  # the document encoder moves on: the index is stale
            p.add_(0.05 * torch.randn_like(p))
        q = r.query_encoder(batch["q_input_ids"], batch["q_attention_mask"])
        cand = r.index.search(q, 6)[1]  # the stale index's 6
        scores, ids = model.retrieve(batch, 2)
        for b in range(len(cand)):
            d = r.doc_encoder(*_pad(model, cand[b].tolist()))  # current vectors
            best = cand[b][(d @ q[b]).topk(2).indices]
            assert ids[b].tolist() == best.tolist()
        r.rerank_k = None
        _, stale = model.retrieve(batch, 2)
    assert not torch.equal(stale, ids)  # the perturbation changed what the loss sees


def test_contrastive_with_bm25_negatives_against_brute_force(setup):
    _, _, model, batch = setup
    r = model.retriever.eval()
    model.bm25_negatives, r.use_bm25 = 1, True
    try:
        r.ensure_index(model.corpus, progress=False)
        with torch.no_grad():
            _, ids, q, d = r(batch["q_input_ids"], batch["q_attention_mask"], 2, model.corpus, True)
            loss = model.contrastive(batch, ids, q, d)
            gold = [model.corpus.id_to_row(g[0]) for g in batch["gold_ids"]]
            ref = _bm25_reference(model.corpus, batch["questions"])
            negs = []
            for row, answers, g in zip(ref, batch["answers"], gold):
                order = sorted(range(len(row)), key=lambda i: (-row[i], i))
                negs.append(
                    next(p for p in order if p != g and not has_answer(model.corpus.texts([p])[0], answers))
                )
            cand = sorted(set(ids.flatten().tolist()) | set(gold) | set(negs))
            assert set(negs) - set(ids.flatten().tolist()) - set(gold)  # the negatives add columns
            vecs = r.doc_encoder(*_pad(model, cand))
            s = q @ vecs.T
            want = torch.stack(
                [-torch.log_softmax(s[i], -1)[cand.index(g)] for i, g in enumerate(gold)]
            ).mean()
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    finally:
        model.bm25_negatives, r.use_bm25 = 0, False


# ------------------------------------------------------------------------------------------ staleness
def test_stale_overlap_is_the_mean_shared_fraction():
    from rag_lightning.callbacks.refresh import stale_overlap

    stale = torch.tensor([[1, 2, 3], [4, 5, -1]])
    fresh = torch.tensor([[3, 2, 9], [7, 8, 9]])
    assert stale_overlap(stale, fresh) == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["retriever.rerank_k=4"], ["retriever.mode=hybrid", "retriever.shared_encoder=true",
                                                             "retriever.doc_encoder=null"]])  # fmt: skip
def test_training_logs_how_stale_the_index_was(tmp_path, extra):
    import csv
    from pathlib import Path

    from test_train import run_cfg

    from rag_lightning.train import train

    overrides = ["retriever.train_doc_encoder=true", "callbacks.refresh_index.every_n_steps=2", "test=false",
                 "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                 "trainer.log_every_n_steps=1", *extra]  # fmt: skip
    cfg = run_cfg(tmp_path, overrides)
    train(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("refresh/stale_overlap@2")]
    assert len(rows) == 2  # one row per refresh, not repeated in the rows logged after it
    assert len({r["index/version"] for r in rows}) == 2  # logged with each of the two refreshes
    assert all(0.0 <= float(r["refresh/stale_overlap@2"]) <= 1.0 for r in rows)
