from rag_lightning.callbacks.refresh import RefreshIndex, parse_schedule

__all__ = ["RefreshIndex", "parse_schedule"]
