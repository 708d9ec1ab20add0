"""The task axis: registry, provenance metrics, generation metrics against the libraries, classification
scoring against a brute-force marginal, no_repeat_ngram_size against a brute-force check, pair readers."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rag_lightning import readers
from rag_lightning.data.pairs import read_pairs
from rag_lightning.data.textio import DataError
from rag_lightning.models.decode import ban_repeated_ngrams, rag_sequence_generate, rag_token_generate
from rag_lightning.module import RagModule
from rag_lightning.tasks import TASKS, Task, build_task, register
from rag_lightning.tasks.classification import ClassificationTask
from rag_lightning.tasks.generation import GenerationTask, corpus_bleu, corpus_chrf, rouge_l
from rag_lightning.tasks.qa import QATask


# ------------------------------------------------------------------ registry
def test_registry_builds_tasks_by_name():
    assert isinstance(build_task(None), QATask) and isinstance(build_task("generation"), GenerationTask)
    task = build_task({"name": "classification", "labels": ["A", "B"]})
    assert isinstance(task, ClassificationTask) and task.verbalizers == ["A", "B"]
    assert {"qa", "generation", "classification"} <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register("qa")(type("Other", (Task,), {}))


def test_monitored_metric_and_summary_rows_per_task():
    qa = QATask()
    assert (qa.monitor, qa.monitor_mode) == ("em", "max")
    assert qa.summary_keys == (
        "loss",
        "em",
        "f1",
        "recall@1",
        "recall@5",
        "recall@20",
        "p_entropy",
        "top1_distinct",
    )  # fmt: skip  (the QA demo's summary rows, unchanged)
    assert GenerationTask().monitor == "rougeL" and ClassificationTask(["a", "b"]).monitor == "accuracy"
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        ClassificationTask(["a"])
    with pytest.raises(ValueError, match="no text for labels"):
        ClassificationTask(["a", "b"], verbalizers={"a": "yes"})


# ------------------------------------------------------------------ provenance
class _Corpus:
    def __init__(self, ids):
        self.ids = ids

    def id_to_row(self, ext):
        if ext not in self.ids:
            raise KeyError(ext)
        return self.ids.index(ext)


def test_gold_recall_and_r_precision_by_passage_id():
    corpus = _Corpus(["p0", "p1", "p2", "p3", "p4"])
    ids = torch.tensor([[3, 1, 0, 2], [0, 4, 2, 1], [1, 2, 3, 4]])  # (B, kmax) retrieved rows
    batch = {"gold_ids": [["p1", "p2"], ["p4", "missing"], []]}
    out = Task().retrieval_metrics(corpus, batch, ids, [1, 2, 4])
    assert out["gold_recall@1"][:2].tolist() == [0.0, 0.0] and out["gold_recall@2"][:2].tolist() == [1.0, 1.0]
    assert out["gold_recall@4"][:2].tolist() == [1.0, 1.0]
    # R = gold passages in the corpus: 2 (first retrieves p3, p1: 1 of 2), 1 (first retrieves p0: 0 of 1)
    assert out["rprec"][:2].tolist() == [0.5, 0.0]
    assert all(torch.isnan(v[2]) for v in out.values())  # no gold ids: not defined


# ------------------------------------------------------------------ generation metrics
def test_generation_metrics_on_hand_cases():
    # LCS("the cat sat", "the cat on the mat sat") = 3 tokens: P = 3/3, R = 3/6, F = 2/3
    assert rouge_l("the cat sat", ["the cat on the mat sat"]) == pytest.approx(2 / 3)
    assert rouge_l("the cat sat", ["a dog", "the cat sat"]) == pytest.approx(1.0)  # best reference
    # BLEU-1: clipped unigram precision 2/3 ("the" counted once), hyp as long as ref: no brevity penalty
    assert corpus_bleu(["the cat the"], [["the cat sat"]], max_order=1) == pytest.approx(2 / 3)
    assert corpus_bleu(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)
    # several references, a different number per example: the libraries' own corpus scores
    from sacrebleu.metrics import BLEU, CHRF

    preds, refs = (
        ["the cat sat on the mat", "a dog ran"],
        [["the cat sat on a mat", "a cat sat"], ["a dog runs"]],
    )
    streams = [["the cat sat on a mat", "a dog runs"], ["a cat sat", None]]
    assert corpus_bleu(preds, refs) == pytest.approx(BLEU().corpus_score(preds, streams).score / 100)
    assert corpus_chrf(preds, refs) == pytest.approx(CHRF().corpus_score(preds, streams).score / 100)
    task = GenerationTask()
    got = task.corpus_metrics(preds, refs)
    assert set(got) == {"bleu", "bleu1", "chrf"} and got["bleu1"] >= got["bleu"]


# ------------------------------------------------------------------ classification = brute-force marginal
def _brute_force(gen, src, mask, scores, labels_row, variant):
    """log p(y|x) per question by loops: one teacher-forced pass per (question, passage), then the marginal."""
    b, k = scores.shape
    doc_lp = torch.log_softmax(scores, -1)
    y = labels_row[labels_row != -100]
    out = []
    for i in range(b):
        tok = []  # (K, T) log p(y_t | x, z_k, y_<t)
        for j in range(k):
            r = i * k + j
            logits = gen(src[r : r + 1], mask[r : r + 1], y[None])  # (1, T, V)
            tok.append(torch.log_softmax(logits[0].float(), -1).gather(1, y[:, None])[:, 0])
        tok = torch.stack(tok)
        if variant == "token":
            out.append(sum(torch.logsumexp(doc_lp[i] + tok[:, t], 0) for t in range(len(y))))
        else:
            out.append(torch.logsumexp(doc_lp[i] + tok.sum(1), 0))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["tiny:bart", "tiny:gpt2"])
@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_classification_scores_equal_brute_force_marginal(name, variant):
    torch.manual_seed(0)
    gen = readers.from_pretrained(name, variant, max_source_length=24).eval()
    module = RagModule(None, gen, variant=variant, task={"name": "classification", "labels": ["x", "y", "z"]})
    module.eval()  # as in validation: no dropout
    src, mask = gen.build_sources([[5, 6, 7], [9, 10]], [[7, 8, 9], [3], [4, 4, 12], [5, 6, 7, 8]], 2)
    module.sources = lambda batch, ids: (src, mask)
    scores = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    eos = gen.eos_token_id
    choices = [torch.tensor([[5, 20, eos]]), torch.tensor([[8, eos, -100]]), torch.tensor([[31, 7, 9, eos]])]
    with torch.no_grad():
        got = module.choice_logprobs({}, scores, torch.zeros(2, 2, dtype=torch.long), choices)  # (B, C)
        want = torch.stack([_brute_force(gen, src, mask, scores, c[0], variant) for c in choices], 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    batch = {"choice_labels": choices, "answers": [["x"], ["z"]]}
    out = module.task.predict(module, batch, scores, torch.zeros(2, 2, dtype=torch.long))
    assert out["predictions"] == [module.task.labels[i] for i in want.argmax(1).tolist()]
    assert out["accuracy"].tolist() == [
        float(p == g[0]) for p, g in zip(out["predictions"], batch["answers"])
    ]


def test_macro_f1_and_confusion_matrix():
    task = ClassificationTask(["A", "B", "C"])
    preds, gold = ["A", "A", "B", "B"], [["A"], ["B"], ["B"], ["A"]]
    # per class F1: A (P 1/2, R 1/2) 0.5; B 0.5; C absent from both: left out of the mean
    assert task.corpus_metrics(preds, gold)["macro_f1"] == pytest.approx(0.5)
    assert task.confusion(preds, gold) == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("causal", [False, True])
def test_verbalizers_checked_against_the_generator_targets(minilm_tokenizer, causal, caplog):
    from rag_lightning.data.collate import QACollator
    from rag_lightning.preflight import ConfigError

    def check(verbalizers: dict[str, str], max_length: int = 4) -> None:
        task = ClassificationTask(["SUPPORTS", "REFUTES"], verbalizers)
        collator = QACollator(minilm_tokenizer, minilm_tokenizer, max_target_length=max_length, causal=causal)
        task.check_targets(collator.encode_targets, max_length)

    caplog.set_level("INFO")
    check({"SUPPORTS": "true", "REFUTES": "false"})  # one word-piece each, + [SEP] (and [CLS] for seq2seq)
    n = 2 if causal else 3
    assert f"SUPPORTS -> 'true': {n}" in caplog.text and f"REFUTES -> 'false': {n}" in caplog.text
    check({"SUPPORTS": "supported by evidence", "REFUTES": "false"}, max_length=8)  # several tokens: allowed
    with pytest.raises(
        ConfigError, match=r"SUPPORTS -> 'supported by evidence' is \d+ .*max_target_length=3"
    ):
        check({"SUPPORTS": "supported by evidence", "REFUTES": "false"}, max_length=3)
    with pytest.raises(ConfigError, match="identical generator targets"):  # the tokenizer lowercases
        check({"SUPPORTS": "True", "REFUTES": "true"})


def test_datamodule_setup_stops_on_a_cut_verbalizer(cfg_factory):
    from hydra.utils import instantiate

    from rag_lightning.preflight import ConfigError

    cfg = cfg_factory("+experiment=demo_verify", "model=tiny", "retriever=tiny", "data.max_target_length=2")
    with pytest.raises(ConfigError, match="data.max_target_length=2"):
        instantiate(cfg.data).setup("fit")


# ------------------------------------------------------------------ no_repeat_ngram_size
def _banned_by_hand(seq: list[int], size: int, vocab: int) -> set[int]:
    return {
        tok for tok in range(vocab)
        if len(seq) >= size and any(tuple(seq[i : i + size]) == (*seq[len(seq) - size + 1 :], tok)
                                    for i in range(len(seq) - size + 1))
    }  # fmt: skip


@pytest.mark.parametrize("size", [1, 2, 3])
def test_ban_repeated_ngrams_equals_brute_force(size):
    g = torch.Generator().manual_seed(size)
    vocab = 4
    for t in range(0, 8):
        seqs = torch.randint(0, vocab, (3, 2, t), generator=g)  # (A, N, t) small vocab: many repeats
        lp = torch.zeros(3, 2, vocab)
        ban_repeated_ngrams(lp, seqs, size)
        for a, n in itertools.product(range(3), range(2)):
            got = {v for v in range(vocab) if lp[a, n, v] == float("-inf")}
            assert got == _banned_by_hand(seqs[a, n].tolist(), size, vocab), (t, a, n)


def _ngrams(row: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(row[i : i + size]) for i in range(len(row) - size + 1)]


@pytest.mark.parametrize("name", ["tiny:bart", "tiny:gpt2"])
@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("beams", [1, 3])
def test_decoded_outputs_never_repeat_an_ngram(name, variant, beams):
    torch.manual_seed(0)
    gen = readers.from_pretrained(name, variant, max_source_length=24).eval()
    src, mask = gen.build_sources([[5, 6, 7], [9, 10]], [[7, 8, 9], [3], [4, 4, 12], [5, 6, 7, 8]], 2)
    scores = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    model = gen if gen.kind == "causal" else gen.model
    fn = rag_token_generate if variant == "token" else rag_sequence_generate
    kw = dict(
        num_beams=beams,
        max_length=24,
        decoder_start_token_id=gen.decoder_start_token_id,
        eos_token_id=-1,
        pad_token_id=gen.pad_token_id,
    )  # fmt: skip  (no EOS: always 24 tokens)
    free = fn(model, src, mask, scores, **kw)
    assert any(len(set(_ngrams(r, 2))) < len(_ngrams(r, 2)) for r in free.tolist())  # repeats without the ban
    out = fn(model, src, mask, scores, no_repeat_ngram_size=2, **kw)
    for row in out.tolist():
        assert len(set(_ngrams(row, 2))) == len(_ngrams(row, 2)), row


# ------------------------------------------------------------------ pair readers
def test_pairs_from_every_format(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"src": "q1", "refs": ["r1", "r2"], "gold_ids": ["p1"]}) + "\n"
    )
    got = read_pairs(tmp_path / "a.jsonl", fields={"input": "src", "target": "refs"})
    assert (got[0].input, got[0].targets, got[0].gold_ids) == ("q1", ["r1", "r2"], ["p1"])
    (tmp_path / "b.tsv").write_text('source\ttarget\nq1\tr1\nq2\t["r2", "r3"]\n')
    assert [e.targets for e in read_pairs(tmp_path / "b.tsv")] == [["r1"], ["r2", "r3"]]
    (tmp_path / "train.source").write_text("q1\nq2\n")
    (tmp_path / "train.target").write_text("r1\nr2\n")
    for path in (tmp_path / "train", tmp_path / "train.source"):
        assert [(e.input, e.targets, e.line) for e in read_pairs(path)] == [
            ("q1", ["r1"], 1),
            ("q2", ["r2"], 2),
        ]
    import datasets

    datasets.Dataset.from_dict({"input": ["q1"], "label": ["A"]}).save_to_disk(str(tmp_path / "hf"))
    (ex,) = read_pairs(tmp_path / "hf", need="label", labels=["A", "B"])
    assert (ex.input, ex.label, ex.targets) == ("q1", "A", ["A"])


@pytest.mark.parametrize(
    "text, need, where",
    [
        (
            '{"input": "q", "target": "ok"}\n{"input": "q", "target": "  "}\n',
            "target",
            ":2: field 'target': empty",
        ),
        ('{"input": "q", "target": []}\n', "target", ":1: field 'target': empty target list"),
        ('{"input": "q", "label": "C"}\n', "label", ":1: field 'label': label 'C' is not one of"),
        ('{"question": "q", "answers": ["a"]}\n', "label", ":1: field 'label': missing field"),
        ('{"input": "", "target": "t"}\n', "target", ":1: field 'input': empty input"),
        ('{"input": "q", "target": "t"\n', "target", ":1: field '<json>': broken JSON"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, text, need, where):
    path = tmp_path / "s.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + where.replace("(", r"\(")):
        read_pairs(path, need=need, labels=["A", "B"])


def test_source_target_errors_name_the_file(tmp_path):
    (tmp_path / "val.source").write_text("q1\nq2\n")
    (tmp_path / "val.target").write_text("r1\n\n")
    with pytest.raises(DataError, match=r"val\.target:2: field 'target': empty target"):
        read_pairs(tmp_path / "val")
    (tmp_path / "val.target").write_text("r1\n")
    with pytest.raises(DataError, match=r"val\.target:2: field 'target': val\.source has 2 lines, 1 here"):
        read_pairs(tmp_path / "val")


# ------------------------------------------------------------------ config
def test_task_group_sets_the_monitored_metric_and_preflight_checks_it(cfg_factory):
    from rag_lightning.preflight import ConfigError, preflight, task_problem

    cfg = cfg_factory("+experiment=demo_longform")
    assert cfg.optimized_metric == "val/rougeL" and cfg.task.monitor == "rougeL"
    early = cfg_factory("+experiment=demo_verify", "+callbacks=[early_stopping]").callbacks.early_stopping
    assert (early.monitor, early.mode) == ("val/accuracy", "max")
    assert cfg_factory().optimized_metric == "val/em"  # QA, as before
    assert cfg_factory("hparams_search=optuna").hydra.sweeper.direction == "maximize"
    assert task_problem(cfg_factory("+experiment=demo_verify")) is None
    with pytest.raises(ConfigError, match="task.labels must name at least 2"):
        preflight(cfg_factory("+experiment=demo_verify", "task.labels=[SUPPORTS]"))
    assert "not a metric of the generation task" in task_problem(
        cfg_factory("+experiment=demo_longform", "optimized_metric=val/em")
    )


def test_samples_table_columns_come_from_the_task(caplog):
    import logging
    from types import SimpleNamespace

    from rag_lightning.callbacks.samples import LogSamples

    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=3, loggers=[])
    task = GenerationTask()
    row = task.sample({"questions": ["in"], "answers": [["ref a", "ref b"]]}, 0, "pred", ["T1"])
    with caplog.at_level(logging.INFO, logger="rag_lightning.callbacks.samples"):
        LogSamples().on_validation_end(trainer, SimpleNamespace(samples=[row], task=task))
    assert "targets" in caplog.text and "ref a | ref b" in caplog.text and "question" not in caplog.text
