"""Engram Studio: give a language model a sparse, inspectable memory of its user."""

__version__ = "0.1.0"
