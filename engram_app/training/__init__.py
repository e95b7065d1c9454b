"""Memory training: packs and versions, jobs in SQLite, the worker process, evaluation."""

from engram_app.training.queue import JobQueue, TrainOptions
from engram_app.training.packs import PRESETS, PackStore

__all__ = ["PRESETS", "JobQueue", "PackStore", "TrainOptions"]
