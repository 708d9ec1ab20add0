"""FSDP2 for large generators: shard the generator's decoder layers over the data-parallel ranks.

`shard_generator` applies `torch.distributed.fsdp.fully_shard` to every transformer block of the generator
(the classes its transformers model lists in `_no_split_modules`, e.g. `Qwen2DecoderLayer`, or the names
given) and then to the generator as a whole (embeddings, final norm and output layer, tied or not, in one
unit). Ranks other than 0 build the generator on the meta device (no memory); `load_full_state` then
broadcasts rank 0's weights shard by shard, so no rank but 0 ever holds a full copy, and rank 0 only in CPU
memory before sharding. `shard_retriever` makes each trainable retriever tower one FSDP unit (data-parallel
gradient averaging); a frozen document encoder and the index stay whole on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


def layer_classes(model: nn.Module, names: Sequence[str] | None = None) -> set[type[nn.Module]]:
    """Module classes to shard one by one: `names`, else the model's `_no_split_modules` (transformer blocks)."""
    wanted = set(names or getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        raise ValueError(
            f"{type(model).__name__} lists no `_no_split_modules`; name the decoder layer classes in "
            f"model.fsdp_layers"
        )
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(f"none of the layer classes {sorted(wanted)} occurs in {type(model).__name__}")
    return found


def shard_generator(
    generator: nn.Module, mesh: Any, layers: Sequence[str] | None = None, mp_policy: Any = None
) -> nn.Module:
    """fully_shard each decoder layer of `generator.model`, then `generator` itself (the root unit)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    classes = tuple(layer_classes(generator.model, layers))
    for module in generator.model.modules():
        if isinstance(module, classes):
            fully_shard(module, **kw)
    fully_shard(generator, **kw)
    # the fused loss runs the reader through read_states(), not forward(): FSDP2 must unshard for it too (and
    # for every method the reader lists in `fsdp_methods`, e.g. hidden_states for callers that want the states)
    for method in getattr(generator, "fsdp_methods", ("answer_states", "hidden_states")):
        register_fsdp_forward_method(generator, method)
    return generator


def load_full_state(module: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Materialize a sharded module built on the meta device and fill it from rank 0's full state dict
    (`full` is empty on the other ranks): each rank receives only its shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # to_empty gives every tensor new, uninitialized storage on rank 0 too; non-persistent buffers (e.g. rotary
    # `inv_freq`) are in no state dict: keep rank 0's values across it, then every rank takes them
    kept = [b.detach().to(device, copy=True) for b in module.buffers()] if dist.get_rank() == 0 else []
    module.to_empty(device=device)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(module, full, options=opts)
    for i, buf in enumerate(module.buffers()):  # not sharded: the same on every rank
        if kept:
            buf.copy_(kept[i])
        dist.broadcast(buf, src=0)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_tower(model: nn.Module, mesh: Any) -> nn.Module:
    """One FSDP2 unit over a retriever tower that stays unsharded from forward to backward: a shared tower
    (``retriever.shared_encoder``) runs its forward for both sides in one step, and both reuse one all-gather."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=mesh, reshard_after_forward=False)


def shard_retriever(retriever: nn.Module, mesh: Any) -> None:
    """Each trainable retriever tower one FSDP unit, so its gradients are averaged over the ranks: the query
    encoder, and the document encoder when it trains (``retriever.train_doc_encoder``; else it stays whole on
    every rank, frozen). A shared tower is one unit both sides call (`shard_tower`); a separate trainable
    document tower stays unsharded from forward to backward too, as the corpus is embedded inside `gathered`."""
    from torch.distributed.fsdp import fully_shard

    def trains(m: nn.Module) -> bool:
        return any(p.requires_grad for p in m.parameters())

    if retriever.shared_encoder:  # the unit is the tower both sides' Encoder wrappers call
        if trains(retriever.query_encoder):
            shard_tower(retriever.query_encoder.model, mesh)
        return
    if trains(retriever.query_encoder):
        fully_shard(retriever.query_encoder, mesh=mesh)
    if trains(retriever.doc_encoder):
        shard_tower(retriever.doc_encoder, mesh)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit in ``module`` unsharded for the duration: one all-gather per unit on entering (every
    rank enters), none per forward call, so the ranks may run different numbers of forward calls inside (each
    embeds its own rows of the corpus; decoding stops when this rank's questions are done). Each unit's
    reshard-after-forward setting is restored on leaving. ``module``'s outermost unit must be a root (the
    generator, a retriever tower). A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if (
        units
    ):  # the outermost unit is its tree's root (the generator, a tower): set up as on its first forward,
        units[0]._get_fsdp_state()._lazy_init()  # else a unit called first inside would claim to be the root
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        groups = [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]
        saved.append((state, state._auto_reshard_after_forward, groups))
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, (state, auto, groups) in zip(units, saved):
            unit.reshard()
            state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info
