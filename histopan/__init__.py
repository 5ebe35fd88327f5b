"""histopan: slide-level panoptic segmentation of H&E whole-slide images.

The Python API is imported lazily (``histopan.predict_tile``, ``histopan.load_model``), so
``import histopan`` stays light and does not import torch.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version as _version
from typing import Any

try:
    __version__ = _version("histopan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "predict_tile": "histopan.predict",
    "load_model": "histopan.model.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histopan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
