"""FSDP2 data parallelism in Lightning: `ModelParallelStrategy` with every process on the data-parallel axis.

Lightning's `ModelParallelStrategy` leaves the sharding to `LightningModule.configure_model` (RagModule shards
the generator's decoder layers there, see `models/sharding.py`). By default it puts the processes of a node on
the tensor-parallel axis; for FSDP every process is a data-parallel rank (its own batches, a shard of the
generator), so the sampler and the mesh use data_parallel_size = world size, tensor_parallel_size = 1.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.world_size
        super().setup_environment()
