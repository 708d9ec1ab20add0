"""QADataModule on the bundled demo data: setup, batches, splits, registry, Hydra config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from rag_lightning.data.datamodule import QADataModule
from rag_lightning.data.registry import SETS, asset_path, resolve_corpus, resolve_set


def _dm(tmp_path: Path, minilm_dir: str, **kw) -> QADataModule:
    args = dict(
        train_sets=["demo_train"],
        val_sets=["demo_val"],
        test_sets=["demo_test"],
        corpus="demo",
        query_tokenizer=minilm_dir,
        generator_tokenizer=minilm_dir,
        doc_tokenizer=minilm_dir,
        cache_dir=tmp_path / "cache",
        batch_size=4,
        max_passage_tokens=32,
    )
    args.update(kw)
    return QADataModule(**args)


def test_setup_and_train_batch(tmp_path: Path, minilm_dir: str) -> None:
    dm = _dm(tmp_path, minilm_dir, num_workers=0)
    assert dm.corpus is None and dm.gen_tokenizer is None  # no work in __init__
    dm.prepare_data()
    dm.setup("fit")
    assert dm.query_tokenizer is dm.gen_tokenizer is dm.doc_tokenizer  # same path -> one object
    assert len(dm.corpus) == 693 and len(dm.train_items) == 1046
    assert [len(s) for _, s in dm.val_sets + dm.test_sets] == [100, 100]
    assert dm.val_set_names == ["demo_val"] and dm.test_set_names == ["demo_test"]
    tok = dm.gen_tokenizer
    b = next(iter(dm.train_dataloader()))
    B = 4
    assert b["q_input_ids"].shape == b["q_attention_mask"].shape and b["q_input_ids"].shape[0] == B
    assert (b["q_input_ids"][:, 0] == tok.cls_token_id).all()
    assert len(b["g_question"]) == B and all(tok.cls_token_id not in g for g in b["g_question"])
    labels = b["labels"]
    assert labels.dtype == torch.int64 and labels.shape[0] == B
    for row, ans, q, g in zip(labels, b["answers"], b["questions"], b["g_question"]):
        want = tok(text_target=ans[0], truncation=True, max_length=25)["input_ids"]
        assert row[: len(want)].tolist() == want and (row[len(want) :] == -100).all()
        assert g == tok(q, add_special_tokens=False)["input_ids"][:64]
    assert (labels == -100).any()  # answers of different lengths in a batch of 4 (seeded shuffle aside)
    assert b["regex"] is False and len(b["answers"]) == B and len(b["gold_ids"][0]) == 1


def test_loaders(tmp_path: Path, minilm_dir: str) -> None:
    dm = _dm(tmp_path, minilm_dir, corpus=None, num_workers=0, eval_batch_size=7, max_eval_examples=10)
    dm.setup("fit")
    tl, vl = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(tl.sampler, RandomSampler) and isinstance(vl.sampler, SequentialSampler)
    assert vl.batch_size == 7 and len(dm.val_sets[0][1]) == 10
    first = next(iter(vl))
    assert first["questions"] == [it.example.question for it in dm.val_sets[0][1][:7]]
    two = _dm(tmp_path, minilm_dir, corpus=None, val_sets=["demo_val", "demo_test"], num_workers=1)
    two.setup("validate")
    loaders = two.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2 and loaders[0].num_workers == 1


def test_val_split_and_limits(tmp_path: Path, minilm_dir: str) -> None:
    def split(seed: int) -> tuple[list[str], list[str]]:
        dm = _dm(tmp_path, minilm_dir, corpus=None, val_sets=[], val_split_fraction=0.1, seed=seed)
        dm.setup("fit")
        return [i.example.id for i in dm.train_items], [i.example.id for i in dm.val_sets[0][1]]

    tr, va = split(0)
    assert len(va) == 105 and len(tr) == 941 and not set(tr) & set(va)
    assert split(0) == (tr, va) and split(1)[1] != va
    dm = _dm(tmp_path, minilm_dir, corpus=None, max_train_examples=5)
    dm.setup("fit")
    assert len(dm.train_items) == 5


def test_mixed_sets_and_random_answer(tmp_path: Path, minilm_dir: str) -> None:
    dm = _dm(
        tmp_path,
        minilm_dir,
        corpus=None,
        train_sets=["demo_train", {"path": asset_path("squad_demo/val.jsonl"), "regex": True}],
    )
    dm.setup("fit")
    assert len(dm.train_items) == 1146 and dm.train_items[-1].regex
    multi = [it for it in dm.train_items if len(set(it.example.answers)) > 2][:8]
    coll = _dm(tmp_path, minilm_dir, train_answer="random").collator(train=True)
    coll.query_tokenizer = coll.gen_tokenizer = dm.gen_tokenizer
    picked = set()
    for _ in range(10):
        lab = coll(multi[:1])["labels"][0]
        picked.add(tuple(lab[lab != -100].tolist()))
    assert len(picked) > 1
    with pytest.raises(ValueError, match="train_answer"):
        _dm(tmp_path, minilm_dir, train_answer="last")


def test_registry() -> None:
    assert resolve_set("nq_train", "/d") == {
        **SETS["nq_train"],
        "path": "/d/retriever/qas/nq-train.csv",
        "name": "nq_train",
    }
    trec = resolve_set("curatedtrec_test", "/d")  # as published; regex answers by the format's default
    assert trec == {
        "path": "/d/curatedtrec/large2180-test.tsv",
        "format": "curatedtrec",
        "name": "curatedtrec_test",
    }
    assert resolve_set("curatedtrec_test_dpr", "/d")["regex"] is True
    assert resolve_set("x/my.jsonl") == {"path": "x/my.jsonl", "format": "auto", "name": "my"}
    assert resolve_corpus("psgs_w100", "/d")["path"] == "/d/wikipedia_split/psgs_w100.tsv"
    assert resolve_set("squad_open_test", "/d")["split"] == "test"
    with pytest.raises(ValueError, match="data_dir"):
        resolve_set("nq_dev")
    with pytest.raises(FileNotFoundError):
        asset_path("nope.txt")


@pytest.mark.parametrize("name", ["demo", "nq", "squad_open", "nq_open"])
def test_hydra_configs(tmp_path: Path, minilm_dir: str, name: str, cfg_factory) -> None:
    from hydra.utils import instantiate

    models = ("retriever.query_encoder", "retriever.doc_encoder", "model.generator")
    cfg = cfg_factory(
        f"data={name}", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
        *(f"{m}.name_or_path={minilm_dir}" for m in models),
    )  # fmt: skip
    dm = instantiate(cfg.data)
    assert isinstance(dm, QADataModule) and dm.tokenizer_names["generator"] == minilm_dir
    if name == "demo":
        dm.setup("fit")
        assert len(dm.train_items) == 1046 and len(dm.corpus) == 693
    else:
        assert all(s["path"].startswith(str(tmp_path / "data")) for s in dm.train_specs + dm.test_specs)


def test_question_sets_are_checked_before_the_corpus(tmp_path: Path, minilm_dir: str) -> None:
    from rag_lightning.data.readers import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "q1", "answers": ["a"]}\n{"question": "q2", "answers": []}\n', encoding="utf-8"
    )
    dm = _dm(tmp_path, minilm_dir, val_sets=[str(bad)])
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'answers': empty answer list"):
        dm.prepare_data()
    assert not (tmp_path / "cache").exists()  # the corpus was not converted
    trec = tmp_path / "t.tsv"
    trec.write_text("1\tfactoid\tWhen?\t18\\d\\d\n", encoding="utf-8")
    dm = _dm(tmp_path, minilm_dir, corpus=None, val_sets=[str(trec), {"path": str(trec), "regex": False}])
    dm.validate_sets()
    assert [s[0].regex for _, s in dm.val_sets] == [True, False]  # format default, explicit override
