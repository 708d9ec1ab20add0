"""NonFiniteGuard: a NaN / Inf loss or gradient skips the step (no update, on every rank), is counted, and N in a
row stop the run with the step named; the checkpoints left behind are finite."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rag_lightning.callbacks import NonFiniteGuard, NonFiniteTrainingError
from rag_lightning.models.encoders import Encoder
from rag_lightning.models.retriever import Retriever
from rag_lightning.retrieval.sharded import ShardedIndex


class Toy(L.LightningModule):
    """y = w x; the loss is NaN on the global steps in ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.bad = bad
        self.snapshots: dict[int, dict] = {}

    def training_step(self, batch, batch_idx):
        loss = self.lin(batch[0]).pow(2).mean()
        if self.global_step in self.bad:
            loss = loss * float("nan")
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        opt = self.optimizers().optimizer
        state = {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.state.items()
        }
        self.snapshots[self.global_step] = {
            "params": {k: v.detach().clone() for k, v in self.state_dict().items()},
            "opt": state,
        }

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(tmp_path: Path, bad: set[int], steps: int, max_consecutive: int = 3) -> tuple[Toy, NonFiniteGuard]:
    model, guard = Toy(bad), NonFiniteGuard(max_consecutive=max_consecutive)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    return model, guard


def test_skipped_step_updates_nothing_and_is_counted(tmp_path) -> None:
    model, guard = _fit(tmp_path, bad={2, 3}, steps=6)
    snaps = model.snapshots
    for step in (2, 3):  # the state before step 3 (and 4) equals the state before step 2: no update at all
        nxt = snaps[step + 1]
        for k, v in snaps[2]["params"].items():
            assert torch.equal(v, nxt["params"][k]), k
        for pid, s in snaps[2]["opt"].items():
            for n, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(nxt["opt"][pid][n])), (
                    n
                )  # AdamW moments, step
    assert not torch.equal(snaps[4]["params"]["lin.weight"], snaps[5]["params"]["lin.weight"])  # trains again
    assert guard.skipped == 2 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_n_in_a_row_stop_the_run_naming_the_step(tmp_path) -> None:
    with pytest.raises(NonFiniteTrainingError, match=r"step 4: 3 optimizer steps in a row \(since step 2\)"):
        _fit(tmp_path, bad={2, 3, 4, 5}, steps=8)


def test_no_checkpoint_from_nonfinite_weights(tmp_path) -> None:
    model, guard = Toy(set()), NonFiniteGuard()
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t), global_step=9)
    guard.on_save_checkpoint(trainer, model, {})  # finite: nothing happens
    with torch.no_grad():
        model.lin.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteTrainingError, match="step 9: the weights hold NaN / Inf"):
        guard.on_save_checkpoint(trainer, model, {})


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lin = nn.Linear(3, 1)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
        lin(torch.ones(2, 3)).sum().backward()
        if rank == 1:  # only this rank sees a NaN gradient
            lin.weight.grad[0, 0] = float("nan")
        strategy = SimpleNamespace(reduce=lambda t, reduce_op: (dist.all_reduce(t), t)[1])
        trainer = SimpleNamespace(strategy=strategy, global_step=7)
        module = SimpleNamespace(log=lambda *a, **k: None)
        guard = NonFiniteGuard()
        guard.on_before_optimizer_step(trainer, module, opt)
        before = lin.weight.detach().clone()
        opt.step()
        unchanged = torch.equal(before, lin.weight) and all(p.grad is None for p in lin.parameters())
        Path(out, f"rank{rank}").write_text(f"{guard.skipped} {unchanged}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_every_rank_skips_when_one_rank_sees_nan(tmp_path) -> None:
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2, join=True)
    assert [Path(tmp_path, f"rank{r}").read_text() for r in range(2)] == ["1 True", "1 True"]


def test_retriever_fails_clearly_on_nonfinite_query_embeddings() -> None:
    r = Retriever(Encoder.from_pretrained("tiny:bert", pooling="mean"), n_docs=2).eval()
    r.index = ShardedIndex.from_embeddings(torch.randn(5, r.query_encoder(torch.ones(1, 3, dtype=torch.long),
                                           torch.ones(1, 3, dtype=torch.long)).shape[1]), mode="replicated")  # fmt: skip
    with torch.no_grad():
        next(r.query_encoder.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite query embeddings"):
        r(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), k=2)


@pytest.mark.slow
def test_diverging_rag_run_leaves_finite_checkpoints(tmp_path) -> None:
    """The issue's repro: optimizer.lr=1e6 on the tiny models. Before: NaN weights in last.ckpt, then an
    IndexError from the index; now: the steps are skipped, the run stops naming the step, every checkpoint is
    finite."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import run_cfg

    from rag_lightning.train import train

    cfg = run_cfg(tmp_path, ["optimizer.lr=1e6", "trainer.max_steps=12", "trainer.val_check_interval=2",
                             "trainer.limit_val_batches=1", "test=false", "+callbacks.model_checkpoint.every_n_train_steps=1",
                             "callbacks.nonfinite_guard.max_consecutive=3"])  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=r"step \d+: 3 optimizer steps in a row"):
        train(cfg)
    ckpts = sorted((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in [p.name for p in ckpts]
    for path in ckpts:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
