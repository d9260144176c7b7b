"""The engine stage's error, kept importable from here for the modules beside it."""
from kvplan.errors import BuildError

__all__ = ["BuildError"]
