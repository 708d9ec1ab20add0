from rag_lightning.callbacks.checkpoint import ModelCheckpoint
from rag_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from rag_lightning.callbacks.progress import ProgressBar
from rag_lightning.callbacks.refresh import RefreshIndex, parse_schedule
from rag_lightning.callbacks.samples import LogSamples

__all__ = [
    "LogSamples",
    "ModelCheckpoint",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "ProgressBar",
    "RefreshIndex",
    "parse_schedule",
]
