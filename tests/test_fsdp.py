"""FSDP2 (trainer=fsdp): two CPU processes (gloo) train a LoRA'd tiny Llama whose decoder layers are sharded;
ranks > 0 build it on the meta device and receive rank 0's weights shard by shard."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate

from rag_lightning.models.sharding import layer_classes
from rag_lightning.readers import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
LORA = "+model.generator.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: null}"


def _save_tiny_llama(path: Path) -> None:
    from rag_lightning.models.tiny import tiny_causal_lm
    from rag_lightning.readers.causal import CausalGenerator

    CausalGenerator(*tiny_causal_lm("llama")).save_pretrained(path)


def _train(tmp_path: Path, *overrides: str, steps: int = 4, val: int = 0) -> subprocess.CompletedProcess:
    """`python train.py` on 2 CPU processes (gloo), 16 examples, `steps` optimizer steps; ``val``: validate
    once at the end on the first ``val`` questions (batches of 2), else never."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", *overrides, "optimizer.lr=1e-3", "data.max_train_examples=16",
        "data.batch_size=2", f"trainer.max_steps={steps}", *(
            [f"trainer.val_check_interval={steps}", f"data.max_eval_examples={val}", "data.eval_batch_size=2"]
            if val else ["trainer.limit_val_batches=0"]
        ), "optimized_metric=null",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "validate_before_fit=false",
        "test=false", f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache",
        f"paths.root_dir={ROOT}", f"hydra.run.dir={tmp_path}/run",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_layer_classes_are_the_decoder_blocks():
    from rag_lightning.models.tiny import tiny_causal_lm

    model, _ = tiny_causal_lm("llama")
    assert {c.__name__ for c in layer_classes(model)} == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="none of the layer classes"):
        layer_classes(model, ["NoSuchLayer"])


def _saved_generators(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (directory, kind): BART, Llama, a BERT warm-started as bert2bert, and that bert2bert saved."""
    from transformers import BertConfig, BertModel

    from rag_lightning.models.tiny import tiny_generator, tiny_tokenizer

    out = {"bart": (root / "bart", "seq2seq"), "llama": (root / "llama", "causal")}
    model, tok = tiny_generator()
    model.save_pretrained(out["bart"][0])
    tok.save_pretrained(out["bart"][0])
    _save_tiny_llama(out["llama"][0])
    tok = tiny_tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    out["bert2bert"] = (root / "bert", "bert2bert")
    from_pretrained(str(root / "bert"), kind="bert2bert").save_pretrained(root / "enc-dec")
    out["encoder-decoder"] = (root / "enc-dec", "seq2seq")
    return out


def test_meta_built_generators_match_the_loaded_ones(tmp_path):
    """FSDP ranks > 0 build the generator on the meta device (empty_init) and receive rank 0's weights: every
    kind must build the same parameters (names, shapes, dtypes) and, filled with them, the same outputs."""

    for name, (path, kind) in _saved_generators(tmp_path).items():
        real = from_pretrained(str(path), kind=kind, max_source_length=24).eval()
        meta = from_pretrained(str(path), kind=kind, max_source_length=24, empty_init=True).eval()
        assert all(p.is_meta for p in meta.parameters()), name
        want = real.state_dict()
        got = {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()}
        assert got == {k: (v.shape, v.dtype) for k, v in want.items()}, name
        meta.to_empty(device="cpu")
        meta.load_state_dict(want)
        for buf, ref in zip(meta.buffers(), real.buffers()):  # as load_full_state broadcasts them
            buf.copy_(ref)
        q = [real.tokenizer("who wrote it", add_special_tokens=False).input_ids] * 2
        p = [real.tokenizer(t, add_special_tokens=False).input_ids for t in ("a book by anna", "the sea")]
        src, mask = real.build_sources(q, p, n_docs=1)
        labels = torch.tensor([[5, 6, real.eos_token_id], [7, real.eos_token_id, -100]])
        with torch.no_grad():
            torch.testing.assert_close(meta(src, mask, labels), real(src, mask, labels), msg=name)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("copy", [False, True])
def test_two_process_fsdp_lora(tmp_path, cfg_factory, copy):
    """copy=True: the pointer head (root unit, trained next to the adapters) is gathered into the checkpoint."""
    gen_dir = tmp_path / "tiny_llama"
    _save_tiny_llama(gen_dir)
    model = ["retriever=tiny", "model=tiny", f"model.generator.name_or_path={gen_dir}", LORA]
    if copy:
        model.append("+model.generator.copy=true")
    proc = _train(tmp_path, "trainer=fsdp", *model, "+model.generator._partial_=true",
                  "model.generator.gradient_checkpointing=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    sd = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # only what trains: the LoRA adapters (full tensors gathered from the shards), the query encoder, the copy head
    trains = ("retriever.query_encoder.", "generator.pointer.")
    assert all("lora_" in k or k.startswith(trains) for k in sd)
    assert copy == ("generator.pointer.query.weight" in sd)
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    full_log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "non-finite" not in full_log, full_log[-4000:]  # no step skipped (e.g. garbage rotary buffers)
    log = full_log[-4000:]
    # initialized to 0: the adapters trained (the log's tail says why not, e.g. skipped non-finite steps)
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), (
        os.path.realpath(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        log,
    )

    cfg = cfg_factory(*model)  # not under hydra.main: paths.root_dir=tmp_path
    fresh = instantiate(cfg.model)  # one process, unsharded: the checkpoint loads strictly
    fresh.load_state_dict(sd)
    got = dict(fresh.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in sd.items() if "lora_" in k or "pointer" in k)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("trainer", ["fsdp", "ddp_sim"])
def test_two_process_shared_tower(tmp_path, cfg_factory, trainer):
    """retriever.shared_encoder: one tower for both sides, trained by both (train_doc_encoder follows), the
    corpus re-embedded with it at fit start and by a refresh after step 2; under FSDP it is one unit whose
    forward both sides run."""
    model = ["retriever=tiny", "model=tiny", "retriever.shared_encoder=true", "retriever.doc_encoder=null"]
    proc = _train(tmp_path, f"trainer={trainer}", *model, "callbacks.refresh_index.every_n_steps=2", steps=3)
    assert proc.returncode == 0, proc.stderr[-6000:]
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "index: built v1" in log  # the refresh re-embedded the corpus with the trained tower
    sd = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("retriever.doc_encoder") for k in sd)  # one copy of the tower
    cfg = cfg_factory(*model)
    fresh = instantiate(cfg.model)  # one process, unsharded: the checkpoint loads strictly
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(sd)
    tower = [k for k in sd if k.startswith("retriever.query_encoder.")]
    assert tower and all(k in init for k in tower)
    assert any(not torch.equal(sd[k], init[k]) for k in tower)  # it trained


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_fsdp_fid(tmp_path, cfg_factory):
    """Fusion-in-Decoder (tiny T5) under FSDP: 2 steps on 2 processes, a validation (loss and decoding) over 8
    questions split between them; the checkpoint loads strictly into one unsharded process, whose validation
    loss over the same 8 questions equals the sharded one."""
    import lightning as L

    model = ["retriever=tiny", "model=tiny", "model.variant=fid", "model.generator.name_or_path=tiny:t5"]
    proc = _train(tmp_path, "trainer=fsdp", *model, "+model.generator._partial_=true", steps=2, val=8)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    sharded = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    sd = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("generator.model.decoder.") for k in sd)  # the reader trains, gathered whole

    cfg = cfg_factory(*model, "data.max_eval_examples=8", "data.eval_batch_size=2")
    fresh = instantiate(cfg.model)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(sd)
    assert any(not torch.equal(v, init[k]) for k, v in sd.items() if k.startswith("generator."))  # trained
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)  # fmt: skip
    one = trainer.validate(fresh, datamodule=instantiate(cfg.data), verbose=False)[0]["val/loss"]
    assert len(sharded) == 1 and sharded[0] == pytest.approx(one, rel=1e-5)


def _gathered_worker(rank: int, world: int, init: str) -> None:
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh

    from rag_lightning.models.sharding import gathered, shard_generator

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        ref = from_pretrained("tiny:bart", variant="fid").eval()
        gen = shard_generator(
            from_pretrained("tiny:bart", variant="fid").eval(), init_device_mesh("cpu", (world,))
        )
        torch.manual_seed(rank)
        src = torch.randint(5, 60, (2 * (rank + 1), 9))  # (B*K, S): another batch on each rank
        dec = src[:, :4]
        with torch.no_grad():
            want = ref.model(input_ids=src, decoder_input_ids=dec).logits
            with gathered(gen):  # rank r runs r + 1 forward calls: no collective inside
                for _ in range(rank + 1):
                    got = gen.model(input_ids=src, decoder_input_ids=dec).logits
            torch.testing.assert_close(got, want)
            labels = torch.randint(5, 60, (rank + 1, 3))
            # sharded again, each unit's reshard-after-forward as before: the reader's own pass (every rank)
            torch.testing.assert_close(
                gen(src, torch.ones_like(src), labels), ref(src, torch.ones_like(src), labels)
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_gathered_lets_ranks_run_different_numbers_of_forward_calls(tmp_path):
    """Decoding under FSDP (RagModule.generate): each rank stops when its own questions are done, so inside
    `gathered` a sharded generator runs any number of forward calls per rank, with the unsharded outputs."""
    mp.spawn(_gathered_worker, args=(2, f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=True)


def _load_full_state_worker(rank: int, world: int, init: str, gen_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from rag_lightning.models.sharding import load_full_state, shard_generator

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ref = from_pretrained(gen_dir, kind="causal", max_source_length=24).eval()
        gen = from_pretrained(gen_dir, kind="causal", max_source_length=24, empty_init=rank > 0).eval()
        full = gen.state_dict() if rank == 0 else {}  # as RagModule.configure_model: before sharding
        shard_generator(gen, init_device_mesh("cpu", (world,)))
        # freed blocks of each buffer's size hold NaN: storage that to_empty hands out uninitialized shows it
        junk = [torch.full_like(b, float("nan")) for b in ref.buffers() for _ in range(32)]
        del junk
        load_full_state(gen, full, torch.device("cpu"))
        for (name, got), want in zip(gen.named_buffers(), ref.buffers()):
            torch.testing.assert_close(got, want, msg=f"rank {rank}: buffer {name}")
        src, mask = ref.build_sources([[5, 6, 7]], [[8, 9], [10, 11, 12]], n_docs=2)
        labels = torch.tensor([[5, 6, ref.eos_token_id]] * 2)  # (rows, T)
        with torch.no_grad():
            torch.testing.assert_close(gen(src, mask, labels), ref(src, mask, labels))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_load_full_state_keeps_rank_zeros_buffers(tmp_path):
    """Ranks > 0 build the generator on meta and take rank 0's buffers; rank 0's own went through to_empty too
    (uninitialized storage): the rotary `inv_freq` (a non-persistent buffer) must be the built one on every
    rank, or the loss is garbage (NaN: every optimizer step skipped, the LoRA adapters never trained)."""
    _save_tiny_llama(tmp_path / "llama")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_load_full_state_worker, args=(2, init, str(tmp_path / "llama")), nprocs=2, join=True)


def _retriever_grads_worker(rank: int, world: int, init: str, shared: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from rag_lightning.models.encoders import Encoder
    from rag_lightning.models.retriever import Retriever
    from rag_lightning.models.sharding import is_sharded, shard_retriever

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same towers on every rank
        tower = Encoder.from_pretrained("tiny:bert", pooling="cls")
        doc = None if shared else Encoder.from_pretrained("tiny:bert", pooling="cls")
        ret = Retriever(tower, doc, train_doc_encoder=True, shared_encoder=shared)
        shard_retriever(ret, init_device_mesh("cpu", (world,)))
        assert is_sharded(ret.query_encoder.model if shared else ret.query_encoder)
        assert shared or is_sharded(ret.doc_encoder)  # a separate trainable tower is a unit too
        torch.manual_seed(1 + rank)  # another batch on each rank
        ids = torch.randint(5, 60, (3, 7))  # (B, L)
        mask = torch.ones_like(ids)
        (ret.query_encoder(ids, mask) * ret.doc_encoder(ids.flip(0), mask)).sum().backward()
        for name, p in ret.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous())
            torch.testing.assert_close(parts[0], parts[1], msg=f"rank {rank}: grad of {name} not averaged")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("shared", [False, True])
def test_trainable_retriever_towers_average_their_gradients(tmp_path, shared):
    """Under FSDP each rank sees other questions: a trainable document tower (separate or shared with the
    query side) must get the gradient averaged over the ranks, or the replicas drift apart step by step."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_retriever_grads_worker, args=(2, init, shared), nprocs=2, join=True)
