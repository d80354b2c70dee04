"""CLAM engine: deep clustering of CT scans and cluster activation maps, without Slicer."""

from importlib import import_module
from typing import Any

from .errors import BundleError, CLAMError, InputError

__all__ = ["BundleError", "CLAMError", "CLAMModel", "ImageExplanation", "InputError", "load_bundle"]
__version__ = "0.1.0"

_LAZY = {"CLAMModel": "estimator", "ImageExplanation": "estimator", "load_bundle": "estimator"}


def __getattr__(name: str) -> Any:
    """Import the heavy parts (torch) only when they are first used."""
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
