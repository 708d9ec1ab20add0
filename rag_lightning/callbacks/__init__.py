from rag_lightning.callbacks.refresh import RefreshIndex, parse_schedule
from rag_lightning.callbacks.samples import LogSamples

__all__ = ["LogSamples", "RefreshIndex", "parse_schedule"]
