"""RagModule's training loss: the fused output-layer path equals the logits path (value and gradients)."""

from __future__ import annotations

import pytest
import torch

from rag_lightning.models.marginalize import label_positions, rag_loss
from rag_lightning.module import RagModule
from rag_lightning.readers import from_pretrained
from rag_lightning.readers.seq2seq import Generator


def _batch(gen: Generator):
    src, mask = gen.build_sources([[5, 6, 7], [9, 10]], [[7, 8, 9], [3], [4, 4, 12], [5, 6, 7, 8]], 2)
    labels = torch.tensor([[5, 20, 102, -100], [8, 102, -100, -100]])
    scores = torch.tensor([[0.3, -0.2], [1.0, 0.5]], requires_grad=True)
    return src, mask, labels, scores


def _loss_and_grads(variant, eps, fused, checkpointing=False, name="tiny:bart", copy=None):
    gen = from_pretrained(name, max_source_length=24, gradient_checkpointing=checkpointing, copy=copy)
    if name == "tiny:bart":
        torch.nn.init.normal_(gen.model.final_logits_bias)
    assert gen.output_layer() is not None  # else fused=True would silently take the logits path
    module = RagModule(None, gen, variant=variant, label_smoothing=eps, fused_loss=fused)
    src, mask, labels, scores = _batch(gen)
    lp = module.token_logprobs(src, mask, labels, label_positions(labels))
    loss = rag_loss(lp, scores, variant, eps).sum()
    loss.backward()
    grads = {n: p.grad for n, p in gen.named_parameters() if p.grad is not None}
    return loss.detach(), lp.seq_lp.detach(), scores.grad, grads


@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_module_loss_equals_logits_path(variant, eps):
    loss, seq_lp, gs, grads = _loss_and_grads(variant, eps, fused=True)
    ref_loss, ref_seq_lp, ref_gs, ref_grads = _loss_and_grads(variant, eps, fused=False)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq_lp, ref_seq_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs, ref_gs, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and "final_logits_bias" not in grads  # a buffer in BART
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["tiny:gpt2", "tiny:llama"])
@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_fused_module_loss_equals_logits_path_causal(name, variant):
    loss, seq_lp, gs, grads = _loss_and_grads(variant, 0.1, fused=True, name=name)
    ref_loss, ref_seq_lp, ref_gs, ref_grads = _loss_and_grads(variant, 0.1, fused=False, name=name)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq_lp, ref_seq_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs, ref_gs, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", ["tiny:gpt2", "tiny:llama"])
@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_copy_head_fused_targets_equal_full_mixture(name, variant):
    """With the pointer head the fused path scores the targets of the mixture (LM head fused, copy added);
    the logits path takes the full (V,) mixture: same loss, same gradients, the copy head's included."""
    torch.manual_seed(0)
    loss, seq_lp, gs, grads = _loss_and_grads(variant, 0.0, fused=True, name=name, copy=True)
    torch.manual_seed(0)
    ref_loss, ref_seq_lp, ref_gs, ref_grads = _loss_and_grads(variant, 0.0, fused=False, name=name, copy=True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq_lp, ref_seq_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs, ref_gs, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and {"pointer.query.weight", "pointer.gate.bias"} <= grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    torch.manual_seed(0)
    plain = _loss_and_grads(variant, 0.0, fused=True, name=name)[0]
    assert not torch.allclose(loss, plain)  # the copy head changes the loss


def test_copy_head_with_label_smoothing_scores_the_full_mixture():
    """Label smoothing needs the mean log-prob over the vocabulary of the mixture: the logits path, finite."""
    torch.manual_seed(0)
    loss, _, gs, grads = _loss_and_grads("token", 0.1, fused=True, name="tiny:llama", copy=True)
    assert torch.isfinite(loss) and torch.isfinite(gs).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_gradient_checkpointing_same_gradients():
    loss, _, gs, grads = _loss_and_grads("token", 0.0, fused=True, checkpointing=True)
    ref_loss, _, ref_gs, ref_grads = _loss_and_grads("token", 0.0, fused=True)
    torch.testing.assert_close(loss, ref_loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "fused, name, copy", [(True, "tiny:bart", None), (False, "tiny:bart", None), (True, "tiny:llama", True)]
)
def test_bf16_autocast_step_close_to_fp32(fused, name, copy):
    """trainer precision bf16-mixed: the step runs under CPU autocast; the loss stays float32 and close (also
    with the copy head, whose attention and mixture compute in float32)."""
    torch.manual_seed(0)
    gen = from_pretrained(name, max_source_length=24, copy=copy)
    module = RagModule(None, gen, variant="token", fused_loss=fused)
    src, mask, labels, scores = _batch(gen)
    ref = rag_loss(module.token_logprobs(src, mask, labels), scores, "token").sum()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rag_loss(module.token_logprobs(src, mask, labels), scores, "token").sum()
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.02 * ref.abs().item(), rtol=0)
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


def test_cpu_precision_resolver():
    from rag_lightning.resolvers import cpu_precision
    from rag_lightning.retrieval.embed import cpu_has_bf16

    assert cpu_precision() == ("bf16-mixed" if cpu_has_bf16() else "32-true")


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_decoding_settings_reach_the_decoder(variant, monkeypatch):
    import rag_lightning.models.decode as mod

    seen = {}

    def fake(model, src, mask, scores, **kw):
        seen.update(kw)
        return torch.full((scores.shape[0], 1), gen.eos_token_id)

    monkeypatch.setattr(mod, f"rag_{variant}_generate", fake)
    gen = from_pretrained("tiny:bart", max_source_length=24)
    decoding = {"num_beams": 3, "max_length": 9, "min_length": 2, "length_penalty": 0.5, "mode": "thorough"}
    module = RagModule(None, gen, variant=variant, decoding=decoding)
    module.sources = lambda batch, ids: _batch(gen)[:2]
    module.generate({}, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    want = {k: v for k, v in decoding.items() if variant == "sequence" or k != "mode"}
    assert {k: seen[k] for k in want} == want


def test_unknown_decoding_key_is_an_error():
    gen = from_pretrained("tiny:bart", max_source_length=24)
    with pytest.raises(ValueError, match="unknown keys \\['min_len'\\]"):
        RagModule(None, gen, decoding={"min_len": 2})
    with pytest.raises(ValueError, match="min_length <= max_length"):
        RagModule(None, gen, decoding={"min_length": 30, "max_length": 20})


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fused_adamw_unless_clipped_under_mixed_precision(precision, clip):
    """Lightning refuses to clip a fused optimizer under its mixed-precision plugin: unfused there only."""
    from functools import partial
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    gen = from_pretrained("tiny:bart", max_source_length=24)
    module = RagModule(None, gen, optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True))
    plugin = MixedPrecision("bf16-mixed", "cpu") if precision == "bf16-mixed" else Precision()
    module._trainer = SimpleNamespace(precision_plugin=plugin, gradient_clip_val=clip)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is (not (precision == "bf16-mixed" and clip > 0))
