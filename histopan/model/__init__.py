"""The histopan network and model folders.

``histopan.model.config`` (no torch import) describes a model; ``folder`` finds a model folder and checks it
against its weights' recorded facts (no torch, no post-processing imports); ``network`` builds the smp network
and knows its head layout; ``checkpoint`` saves and loads model folders (safetensors + model.yaml).  Every
part is imported lazily, so ``from histopan.model import ModelConfig`` stays light and
``histopan.model.folder`` lighter still.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    **{name: "histopan.model.config" for name in (
        "ArchitectureConfig", "ClassSpec", "ModelConfig", "NormalizationConfig", "NucleusTypeSpec",
        "PostprocessConfig", "read_model_config", "write_model_config")},
    "LoadedModel": "histopan.model.checkpoint",
    "load_model": "histopan.model.checkpoint",
    "save_model": "histopan.model.checkpoint",
    "available_models": "histopan.model.checkpoint",
    "build_network": "histopan.model.network",
    "split_outputs": "histopan.model.network",
    "to_probabilities": "histopan.model.network",
    "grow_heads": "histopan.model.network",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histopan.model' has no attribute {name!r}")
