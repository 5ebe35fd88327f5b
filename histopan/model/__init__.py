"""The histopan network and model folders.

``histopan.model.config`` (no torch import) describes a model; ``network`` builds the smp network and
knows its head layout; ``checkpoint`` saves and loads model folders (safetensors + model.yaml).  The torch
parts are imported lazily, so ``from histopan.model import ModelConfig`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from histopan.model.config import (
    ArchitectureConfig,
    ClassSpec,
    ModelConfig,
    NormalizationConfig,
    NucleusTypeSpec,
    PostprocessConfig,
    read_model_config,
    write_model_config,
)

_LAZY = {
    "LoadedModel": "histopan.model.checkpoint",
    "load_model": "histopan.model.checkpoint",
    "save_model": "histopan.model.checkpoint",
    "available_models": "histopan.model.checkpoint",
    "build_network": "histopan.model.network",
    "split_outputs": "histopan.model.network",
    "to_probabilities": "histopan.model.network",
    "grow_heads": "histopan.model.network",
}

__all__ = [
    "ArchitectureConfig",
    "ClassSpec",
    "ModelConfig",
    "NormalizationConfig",
    "NucleusTypeSpec",
    "PostprocessConfig",
    "read_model_config",
    "write_model_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histopan.model' has no attribute {name!r}")
