"""Continuous batching on a stock transformers model (see engine.py)."""

from services.language.batching.engine import BatchingEngine

__all__ = ["BatchingEngine"]
