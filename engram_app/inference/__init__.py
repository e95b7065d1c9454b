"""Running the model: generation (and, with later features, traces and comparisons)."""

from engram_app.inference.runtime import GeneratedToken, GenerationOptions, Message, Runtime

__all__ = ["GeneratedToken", "GenerationOptions", "Message", "Runtime"]
