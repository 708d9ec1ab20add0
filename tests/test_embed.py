"""embed_passages: original order, length-sorted batches, inference mode, training flag, autocast, stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rag_lightning.retrieval import embed_passages


class MeanEncoder(nn.Module):
    """Masked mean of token embeddings: (B, L) -> (B, d); records what it saw."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.dim = dim
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.append(
            dict(
                shape=tuple(input_ids.shape),
                training=self.training,
                inference=torch.is_inference_mode_enabled(),
            )
        )
        m = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        return (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d)


class View:
    """Corpus-like token view: __getitem__ takes a list of row ids."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows, self.requests = rows, []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, ids: list[int]) -> list[list[int]]:
        self.requests.append(list(ids))
        return [self.rows[i] for i in ids]


def _rows(n: int = 23, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(1, 50, (ln,), generator=g).tolist() for ln in lens]


def _one_by_one(enc: nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """Reference: each row alone, no padding, eval mode."""
    was = enc.training
    with torch.no_grad():
        out = torch.cat(
            [enc.eval()(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
        )
    enc.train(was)
    return out


@pytest.mark.parametrize("wrap", [list, View])
def test_original_order_and_values(wrap) -> None:
    torch.manual_seed(0)
    enc, rows = MeanEncoder(), _rows()
    stats: dict = {}
    out = embed_passages(enc, wrap(rows), batch_size=4, progress=False, stats=stats)
    ref = _one_by_one(enc, rows)
    assert out.shape == (23, 8) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert set(stats) >= {"seconds", "passages_per_s", "tokens", "padded_tokens"}
    assert stats["tokens"] == sum(map(len, rows))


def test_batches_are_length_sorted_and_windowed() -> None:
    enc, rows = MeanEncoder(), _rows(n=40)
    view = View(rows)
    stats: dict = {}
    embed_passages(enc, view, batch_size=4, progress=False, stats=stats, sort_window=5)  # windows of 20
    assert [len(r) for r in view.requests] == [20, 20]
    widths = [c["shape"][1] for c in enc.calls]
    assert widths[:5] == sorted(widths[:5]) and widths[5:] == sorted(widths[5:])
    unsorted_pad = sum(4 * max(map(len, rows[i : i + 4])) for i in range(0, 40, 4))
    assert stats["padded_tokens"] < unsorted_pad


def test_inference_mode_training_flag_and_autograd_use() -> None:
    enc = MeanEncoder().train()
    out = embed_passages(enc, _rows(n=5), batch_size=2, progress=False)
    assert enc.training  # restored
    assert all(c["inference"] and not c["training"] for c in enc.calls)
    w = torch.randn(8, requires_grad=True)
    (out @ w).sum().backward()  # the result is a normal tensor, usable with autograd
    assert w.grad is not None
    enc.eval()
    embed_passages(enc, _rows(n=5), progress=False)
    assert not enc.training


def test_cpu_autocast_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    enc = MeanEncoder()
    lin = nn.Linear(8, 8)

    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.lin = enc, lin

        def forward(self, ids, mask):
            return self.lin(self.enc(ids, mask))

    rows = _rows()
    fp32 = embed_passages(Proj(), rows, progress=False)
    bf16 = embed_passages(Proj(), rows, progress=False, amp_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


@pytest.mark.slow  # importing transformers can take several seconds
def test_tiny_bert_padding_invariant() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg)

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, d)
            m = mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1)  # (B, d)

    enc, rows = Bert(), _rows(n=12)
    out = embed_passages(enc, rows, batch_size=5, progress=False, amp_dtype="fp32")
    torch.testing.assert_close(out, _one_by_one(enc, rows), rtol=1e-4, atol=1e-5)


def test_empty_corpus() -> None:
    out = embed_passages(MeanEncoder(), [], progress=False)
    assert out.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_default() -> None:
    enc, rows = MeanEncoder(), _rows()
    out = embed_passages(enc, rows, device="cuda", progress=False)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert next(enc.parameters()).device.type == "cpu"  # moved back
    torch.testing.assert_close(out, _one_by_one(enc, rows), rtol=0.02, atol=0.02)


def test_precision_auto_follows_the_hardware(monkeypatch) -> None:
    from rag_lightning.retrieval import embed as E

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert E.amp_dtype_for(cuda) is torch.bfloat16
    monkeypatch.setattr(E, "cpu_has_bf16", lambda: True)
    assert E.amp_dtype_for(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(E, "cpu_has_bf16", lambda: False)
    assert E.amp_dtype_for(cpu, None) is None  # emulated bf16 is slower than fp32: no autocast
    assert E.amp_dtype_for(cpu, "bf16") is torch.bfloat16 and E.amp_dtype_for(cuda, "fp16") is torch.float16
    assert E.amp_dtype_for(cuda, "fp32") is None and E.amp_dtype_for(cpu, torch.float32) is None
    with pytest.raises(ValueError, match="precision"):
        E.amp_dtype_for(cpu, "int8")
    stats: dict = {}
    embed_passages(MeanEncoder(), _rows(n=3), progress=False, stats=stats)
    assert stats["dtype"] == "float32"  # no native bf16 (patched): fp32
    embed_passages(MeanEncoder(), _rows(n=3), progress=False, stats=stats, amp_dtype="bf16")
    assert stats["dtype"] == "bfloat16"
