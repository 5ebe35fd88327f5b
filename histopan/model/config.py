"""Typed, frozen description of a histopan model: the contents of a model folder's ``model.yaml``.

A model is a folder holding ``weights.safetensors`` and ``model.yaml``.  The YAML is read into
:class:`ModelConfig` with :func:`histopan.config.from_dict`, which checks key names and types; the range and
consistency checks live in the ``__post_init__`` methods below (a ``ValueError`` there becomes a
:class:`~histopan.errors.ConfigError` naming the file).

The network's output channels follow the class list (see :mod:`histopan.model.network`):
``[0:C)`` semantic logits over ``classes``, ``C`` the nucleus-centre logit, ``C+1`` the nucleus-boundary
logit, ``[C+2:C+2+K)`` nucleus-type logits when ``nucleus_types`` is non-empty.

Default architecture: a U-Net with a ``mobilenet_v2`` encoder and decoder channels
``(128, 64, 32, 32, 16)``: about 4.15 M parameters, 16.8 MB of fp32 weights, roughly 45 ms for a 256x256
forward pass on one CPU thread.  Measured alternatives (same decoder, 8 outputs): ``efficientnet-b0``
4.86 M / 19.6 MB / 52 ms, ``resnet18`` 12.5 M / 50 MB / 70 ms, ``resnet34`` 22.6 M / 90 MB / 107 ms;
``mobilenet_v2`` with decoder ``(256, 128, 64, 32, 16)`` 6.6 M / 26.7 MB / 58 ms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from histopan.config import from_dict, load_yaml, save_yaml, to_dict
from histopan.checks import check_mpp
from histopan.classes import ClassSpec, check_color
from histopan.errors import ConfigError
from histopan.postprocess import PostprocessConfig

__all__ = [
    "ArchitectureConfig",
    "ClassSpec",
    "NucleusTypeSpec",
    "NormalizationConfig",
    "ModelConfig",
    "PostprocessConfig",
    "DEFAULT_CLASSES",
    "SUPPORTED_ARCHS",
    "FORMAT_VERSION",
    "read_model_config",
    "write_model_config",
]

FORMAT_VERSION = 1

#: smp architectures whose ``decoder_channels`` is a per-stage list (the layout this package builds).
SUPPORTED_ARCHS = ("unet", "unetplusplus")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Which smp network to build.  ``encoder`` is any smp encoder name; weights never come from the hub."""

    arch: str = "unet"
    encoder: str = "mobilenet_v2"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (128, 64, 32, 32, 16)
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"architecture.arch {self.arch!r} is not supported; use one of {list(SUPPORTED_ARCHS)}")
        if not 3 <= self.encoder_depth <= 5:
            raise ValueError(f"architecture.encoder_depth must be 3..5, got {self.encoder_depth}")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"architecture.decoder_channels needs one entry per encoder stage ({self.encoder_depth}), "
                f"got {list(self.decoder_channels)}"
            )
        if any(c < 1 for c in self.decoder_channels):
            raise ValueError(f"architecture.decoder_channels must be positive, got {list(self.decoder_channels)}")
        if self.in_channels != 3:
            raise ValueError(f"architecture.in_channels must be 3 (RGB), got {self.in_channels}")


@dataclass(frozen=True)
class NucleusTypeSpec:
    """One nucleus type predicted by the optional type head."""

    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "color", tuple(self.color))
        if not self.name or not self.name.strip():
            raise ValueError("a nucleus type name may not be empty")
        check_color(self.color, f"nucleus type {self.name!r}")


@dataclass(frozen=True)
class NormalizationConfig:
    """Per-channel mean and std applied to RGB / 255 before the network."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("normalization.mean and normalization.std need three values (R, G, B)")
        if any(not (math.isfinite(s) and s > 0) for s in self.std):
            raise ValueError(f"normalization.std must be positive, got {list(self.std)}")
        if any(not math.isfinite(m) for m in self.mean):
            raise ValueError(f"normalization.mean must be finite, got {list(self.mean)}")


DEFAULT_CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("background", (255, 255, 255), "stuff"),
    ClassSpec("stroma", (240, 160, 200), "stuff"),
    ClassSpec("necrosis", (120, 120, 40), "stuff"),
    ClassSpec("tumour", (200, 40, 40), "stuff"),
    ClassSpec("nucleus", (40, 40, 220), "thing"),
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild, run and post-process a model (the ``model.yaml`` of a model folder).

    ``postprocess_tta`` (optional) holds thresholds tuned on test-time-augmented maps, which are smoother
    than plain ones; runs with TTA use them (:meth:`for_tta`), plain runs use ``postprocess``.
    """

    name: str = "default"
    format_version: int = FORMAT_VERSION
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    classes: tuple[ClassSpec, ...] = DEFAULT_CLASSES
    nucleus_types: tuple[NucleusTypeSpec, ...] = ()
    mpp: float = 0.5
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    tile: int = 512
    halo: int = 64
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    postprocess_tta: PostprocessConfig | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a class's id is its position: the value of its pixels in the semantic label map (an id written in
        # model.yaml is only a description and follows the order of the list)
        object.__setattr__(self, "classes", tuple(c if c.id == i else dataclasses.replace(c, id=i)
                                                  for i, c in enumerate(self.classes)))
        object.__setattr__(self, "nucleus_types", tuple(self.nucleus_types))
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported by this histopan (expects "
                f"{FORMAT_VERSION}); upgrade histopan or re-save the model"
            )
        if not self.name or not self.name.strip():
            raise ValueError("name may not be empty")
        if len(self.classes) < 2:
            raise ValueError("classes needs at least a background class and the nucleus class")
        if len(self.classes) > 255:
            raise ValueError(f"at most 255 classes are supported (uint8 labels), got {len(self.classes)}")
        if self.classes[0].name != "background" or self.classes[0].kind != "stuff":
            raise ValueError(
                f"the first class must be the stuff class 'background', got {self.classes[0].name!r} "
                f"({self.classes[0].kind})"
            )
        names = [c.name for c in self.classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"class names must be unique; repeated: {dupes}")
        things = [c.name for c in self.classes if c.kind == "thing"]
        if len(things) != 1:
            raise ValueError(f"exactly one class must have kind 'thing' (the nucleus class), got {things}")
        type_names = [t.name for t in self.nucleus_types]
        dupes = sorted({n for n in type_names if type_names.count(n) > 1})
        if dupes:
            raise ValueError(f"nucleus type names must be unique; repeated: {dupes}")
        check_mpp(self.mpp, error=ValueError)
        if self.tile < 32 or self.tile % 32:
            raise ValueError(f"tile must be a positive multiple of 32 pixels, got {self.tile}")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0 pixels, got {self.halo}")
        if self.training is None:
            object.__setattr__(self, "training", {})

    def for_tta(self, tta: bool) -> ModelConfig:
        """The config a run with ``tta`` post-processes with: ``postprocess_tta`` in place of ``postprocess``
        when TTA is on and the model has thresholds tuned for it; otherwise this config."""
        if tta and self.postprocess_tta is not None:
            return dataclasses.replace(self, postprocess=self.postprocess_tta)
        return self

    # -- derived layout -------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Number of semantic classes C (stuff classes plus the nucleus class)."""
        return len(self.classes)

    @property
    def n_types(self) -> int:
        """Number of nucleus types K (0 without a type head)."""
        return len(self.nucleus_types)

    @property
    def has_types(self) -> bool:
        return bool(self.nucleus_types)

    @property
    def n_outputs(self) -> int:
        """Output channels of the network: C semantic + centre + boundary + K types."""
        return self.n_classes + 2 + self.n_types

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def type_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.nucleus_types)

    @property
    def nucleus_index(self) -> int:
        """Index of the (single) thing class in ``classes``."""
        return next(i for i, c in enumerate(self.classes) if c.kind == "thing")

    @property
    def stuff_indices(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.classes) if c.kind == "stuff")

    def class_index(self, name: str) -> int:
        """Index of the class called ``name``; a :class:`ConfigError` naming the known classes otherwise."""
        if name not in self.class_names:
            raise ConfigError(f"unknown class name for model {self.name!r}", value=name,
                              fix=f"use one of {list(self.class_names)}")
        return self.class_names.index(name)


def read_model_config(path: str | PathLike[str]) -> ModelConfig:
    """Read and validate a ``model.yaml``; errors are :class:`~histopan.errors.ConfigError` naming ``path``."""
    return from_dict(ModelConfig, load_yaml(path), source=path)


def write_model_config(config: ModelConfig, path: str | PathLike[str]) -> None:
    """Write ``config`` as YAML (keys in declaration order) to ``path``."""
    save_yaml(to_dict(config), path)
