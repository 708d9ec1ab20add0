"""Retriever objectives wired into RagModule: one generator pass, gradients where each objective sends them,
every `model.retriever_loss` trains with tiny models, and the collapse guard shows in the validation logs."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import open_dict
from test_train import run_cfg

from rag_lightning.train import train


def _module(tmp_path, overrides=()):
    cfg = run_cfg(tmp_path, ["data.max_train_examples=4", *overrides])
    L.seed_everything(0)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model = hydra.utils.instantiate(cfg.model)
    model.corpus = dm.corpus
    model.retriever.ensure_index(model.corpus, progress=False)
    batch = next(iter(dm._loader(dm.train_items, train=False)))
    return cfg, dm, model, batch


def _grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [p.grad.flatten() for p in module.parameters() if p.grad is not None] or [torch.zeros(1)]
    )


def _step(model, batch, dropout=True):
    model.zero_grad(set_to_none=True)
    model.train()
    if not dropout:  # compare gradients across settings (a frozen generator runs without dropout)
        model.eval()
    model.training_step(batch, 0).backward()
    return model.retriever.query_encoder, model.generator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _module(tmp_path_factory.mktemp("obj"))


@pytest.mark.parametrize("loss", ["marginal", "emdr2", "pdist", "lsr", "contrastive"])
@pytest.mark.parametrize("gen", ["token", "none"])
def test_gradients_go_where_each_objective_sends_them(setup, loss, gen):
    _, _, model, batch = setup
    model.retriever_weights, model.generator_loss = {loss: 1.0}, gen
    model.generator.requires_grad_(gen != "none")
    calls = []
    hook = model.generator.model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        qenc, generator = _step(model, batch)
    finally:
        hook.remove()
        model.generator.requires_grad_(True)
    assert len(calls) == 1  # the objectives reuse the generator pass of the loss
    assert _grads(qenc).abs().sum() > 0  # every objective trains the query encoder
    if gen == "none":
        assert all(p.grad is None for p in generator.parameters())  # frozen generator: targets only
    else:
        assert _grads(generator).abs().sum() > 0


@pytest.mark.parametrize("loss", ["emdr2", "pdist", "lsr", "contrastive"])
def test_generator_loss_does_not_reach_the_retriever_without_marginal(setup, loss):
    """With retriever_loss=X (no `marginal`) the retriever's gradient is X's alone, whatever the generator
    loss; and X sends nothing into the generator (its gradient is the generator loss's alone)."""
    _, _, model, batch = setup
    model.retriever_weights, model.generator_loss = {loss: 1.0}, "token"
    qenc, gen = _step(model, batch, dropout=False)
    both_q, both_g = _grads(qenc).clone(), _grads(gen).clone()
    model.generator_loss = "none"  # the objective alone (generator pass without gradient)
    qenc, _ = _step(model, batch, dropout=False)
    torch.testing.assert_close(_grads(qenc), both_q)
    model.retriever_weights, model.generator_loss = {"marginal": 0.0}, "token"  # the generator loss alone
    qenc, gen = _step(model, batch, dropout=False)
    torch.testing.assert_close(_grads(gen), both_g)
    assert all(p.grad is None for p in qenc.parameters())  # weight 0: scores detached


def test_marginal_weight_scales_the_retriever_gradient(setup):
    _, _, model, batch = setup
    model.generator_loss = "token"
    out = []
    for w in (1.0, 0.25):
        model.retriever_weights = {"marginal": w}
        qenc, gen = _step(model, batch, dropout=False)
        out.append((_grads(qenc).clone(), _grads(gen).clone()))
    torch.testing.assert_close(out[1][0], 0.25 * out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])  # the generator's gradient does not change


def test_contrastive_uses_gold_passages(setup):
    _, _, model, batch = setup
    model.retriever.eval()
    with torch.no_grad():
        _, ids, q, d = model.retriever(batch["q_input_ids"], batch["q_attention_mask"], 2, model.corpus, True)
        gold = [model.corpus.id_to_row(g[0]) for g in batch["gold_ids"]]
        loss = model.contrastive(batch, ids, q, d)
        # reference: candidates = distinct retrieved passages + gold passages, DPR's -log softmax of the gold
        cand = sorted(set(ids.flatten().tolist()) | set(gold))
        vecs = model.retriever.doc_encoder(*_pad(model, cand))
        s = q @ vecs.T  # temperature 1
        want = torch.stack([-torch.log_softmax(s[i], -1)[cand.index(g)] for i, g in enumerate(gold)]).mean()
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)


def _pad(model, rows):
    from rag_lightning.retrieval.embed import pad_batch

    ids, mask = pad_batch(model.corpus.doc_tokens(rows), model.retriever.doc_encoder.tokenizer.pad_token_id)
    return ids, mask


def test_config_errors(tmp_path):
    cfg = run_cfg(tmp_path, [])
    for key, value, match in [
        ("retriever_loss", "bogus", "unknown objective"),
        ("retriever_loss", {"emdr2": -1.0}, "must be >= 0"),
        ("generator_loss", "both", "generator_loss"),
        ("objective_args", {"nope": {}}, "unknown objective"),
    ]:
        c = cfg.copy()
        with open_dict(c):
            c.model[key] = value
        with pytest.raises(InstantiationException, match=match):
            hydra.utils.instantiate(c.model)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.retriever_loss=emdr2", "model.objective_args.emdr2.temperature=0.5"],
        ["model.retriever_loss=pdist", "retriever.similarity=cosine", "retriever.temperature=0.05"],
        ["model.retriever_loss=lsr", "model.generator_loss=none"],
        ["model.retriever_loss={emdr2:1.0,contrastive:0.1}", "retriever.learn_temperature=true"],
        ["model.retriever_loss=contrastive", "model.generator_loss=sequence", "model.variant=sequence"],
    ],
)
def test_each_objective_trains(tmp_path, overrides):
    cfg = run_cfg(tmp_path, ["debug=fdr", "test=false", *overrides])
    metric = train(cfg)
    assert metric is not None and 0.0 <= metric <= 1.0


def test_collapse_is_visible_in_validation_logs(tmp_path):
    """Every question mapped to one query vector (what a collapsed query encoder does): distinct top-1 drops to
    1 and the entropy of p(z|x) towards 0, in the logged validation metrics."""
    cfg, dm, model, _ = _module(tmp_path, ["data.max_eval_examples=8"])
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    healthy = trainer.validate(model, datamodule=dm, verbose=False)[0]
    with torch.no_grad():
        v = model.retriever.query_encoder(*_q(model, ["anything"]))[0]  # one vector for every question

    def collapse(module, inputs, output):
        return (v * 1e4).expand_as(output)

    hook = model.retriever.query_encoder.register_forward_hook(collapse)
    try:
        collapsed = trainer.validate(model, datamodule=dm, verbose=False)[0]
    finally:
        hook.remove()
    assert healthy["val/top1_distinct"] > 1 and collapsed["val/top1_distinct"] == 1
    assert collapsed["val/p_entropy"] < 0.1 * healthy["val/p_entropy"]


def test_val_loss_is_the_plain_nll(tmp_path):
    """With label smoothing in the training loss, val/loss is still the answer's NLL per question (eps = 0),
    computed here from the same retrieval without the module's loss helpers; the smoothed loss differs."""
    from rag_lightning.models.marginalize import label_positions, rag_loss

    cfg, dm, model, _ = _module(tmp_path, ["model.label_smoothing=0.1", "data.max_eval_examples=8"])
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    model.eval()
    nll, smoothed = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            scores, ids = model.retrieve(batch, model.retriever.n_docs)  # (B, K)
            src, mask = model.sources(batch, ids)  # (B*K, S)
            labels = batch["labels"]
            lp = model.token_logprobs(src, mask, labels, label_positions(labels), smooth=True)
            nll.append(rag_loss(lp, scores, "token", 0.0))  # (B,)
            smoothed.append(rag_loss(lp, scores, "token", 0.1))
    nll, smoothed = torch.cat(nll).mean().item(), torch.cat(smoothed).mean().item()
    assert sum(len(b["questions"]) for b in dm.val_dataloader()) == 8
    assert abs(logged - nll) < 1e-5 * nll
    assert abs(smoothed - nll) > 1e-4 * nll  # so smoothing leaking into val/loss would fail the line above


def _q(model, texts):
    t = model.retriever.query_encoder.tokenizer(texts, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def test_eval_retrieval_script_agrees_with_the_module(setup):
    """rag-eval-retrieval's recall@k and entropy equal what validation logs for the same retriever."""
    from rag_lightning.commands import eval_retrieval as mod

    _, dm, model, _ = setup
    model.eval()
    items = dm.train_items
    got = mod.eval_set(model.retriever, dm.corpus, dm._loader(items, train=False), [1, 2], 2)
    outs = [model.evaluate(b) for b in dm._loader(items, train=False)]
    for key in ("recall@1", "recall@2", "p_entropy"):
        want = torch.cat([o[key].float() for o in outs]).mean().item()
        assert abs(got[key] - want) < 1e-5, key
    assert got["top1_distinct"] == len({i for o in outs for i in o["ids"][:, 0].tolist()})
    assert got["n"] == len(items) and 0 <= got["gold@1"] <= got["gold@2"] <= 1
