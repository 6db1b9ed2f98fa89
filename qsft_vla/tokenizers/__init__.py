"""Tokenizers: robot actions <-> per-dimension tokens (text tokenizers live beside it)."""

from qsft_vla.tokenizers.action import ActionTokenizer

__all__ = ["ActionTokenizer"]
