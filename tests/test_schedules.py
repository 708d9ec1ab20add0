"""Per-group delayed linear warmup / decay."""

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from rag_lightning.schedules import linear_warmup, warmup_decay_factor


def _opt(start: int | None) -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    groups = [{"params": [a], "name": "generator"}, {"params": [b], "name": "retriever", "lr": 0.5}]
    if start is not None:
        groups[1]["start_step"] = start
    return torch.optim.SGD(groups, lr=1.0)


def _lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_without_start_step_equals_transformers():
    ours, ref = _opt(None), _opt(None)
    a = _lrs(ours, linear_warmup(ours, num_training_steps=30, num_warmup_steps=7), 30)
    b = _lrs(ref, get_linear_schedule_with_warmup(ref, num_warmup_steps=7, num_training_steps=30), 30)
    assert sum(a, []) == pytest.approx(sum(b, []))


def test_start_step_delays_one_group_only():
    opt = _opt(10)
    lrs = _lrs(opt, linear_warmup(opt, num_training_steps=30, num_warmup_steps=4), 30)
    gen, ret = [x[0] for x in lrs], [x[1] for x in lrs]
    assert gen[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert ret[:11] == [0.0] * 11 and ret[11] == pytest.approx(0.5 * 0.25) and ret[14] == pytest.approx(0.5)
    # both decay linearly to 0 at the last step
    assert warmup_decay_factor(30, 30, 4, 10) == 0 and ret[22] == pytest.approx(0.5 * 8 / 16)


def test_start_beyond_training_never_learns():
    """Not an error (a debug run shorter than the start step is legitimate; preflight.check_run and
    RagModule.configure_optimizers warn, naming model.retriever_start_step): that group's lr stays 0."""
    opt = _opt(30)
    lrs = _lrs(opt, linear_warmup(opt, num_training_steps=30, num_warmup_steps=4), 30)
    assert all(x[1] == 0.0 for x in lrs) and max(x[0] for x in lrs) == pytest.approx(1.0)


def test_rag_module_delays_only_the_retriever(cfg_factory):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    cfg = cfg_factory(
        "retriever=tiny", "model=tiny", "model.retriever_start_step=10", "scheduler.num_warmup_steps=4"
    )
    module = instantiate(cfg.model)
    module._trainer = SimpleNamespace(estimated_stepping_batches=30)
    out = module.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = _lrs(opt, sched, 12)
    names = ["generator", "generator_no_decay", "retriever", "retriever_no_decay"]
    assert [g["name"] for g in opt.param_groups] == names
    assert lrs[4][0] > 0 and lrs[4][1] > 0
    assert all(x[2] == x[3] == 0 for x in lrs[:11]) and lrs[11][2] > 0 and lrs[11][3] > 0
    module.scheduler_factory = None
    with pytest.raises(ValueError, match="retriever_start_step needs a scheduler"):
        module.configure_optimizers()


def test_no_weight_decay_on_biases_and_layer_norms(cfg_factory):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    cfg = cfg_factory("retriever=tiny", "model=tiny", "optimizer.weight_decay=0.1")
    module = instantiate(cfg.model)
    module._trainer = SimpleNamespace(estimated_stepping_batches=30)
    opt = module.configure_optimizers()["optimizer"]
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in [g["name"]]}
    assert decay == {"generator": 0.1, "generator_no_decay": 0.0, "retriever": 0.1, "retriever_no_decay": 0.0}
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    ln = [n for n in named if "LayerNorm.weight" in n or "layer_norm.weight" in n or "layernorm.weight" in n]
    biases = [n for n in named if n.endswith(".bias")]
    assert ln and biases
    assert all(by_id[id(named[n])] == 0.0 for n in ln + biases if id(named[n]) in by_id)
    assert all(by_id[id(p)] == 0.1 for n, p in named.items() if p.ndim == 2 and id(p) in by_id)
    assert len(by_id) == sum(p.requires_grad for p in module.parameters())
