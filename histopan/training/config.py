"""Typed, frozen training configuration (the YAML given to ``histopan train CONFIG.yaml``).

A config names the model to train (a full :class:`~histopan.model.config.ModelConfig`: architecture,
classes, working mpp, normalisation, default post-processing), the data sets, the augmentation, the loss
weights, the optimiser schedule and the threshold grid tuned on the validation split.  It is loaded with
:func:`histopan.config.from_dict` (unknown keys and wrong types are a :class:`~histopan.errors.ConfigError`
naming the file and key) and saved as ``train.yaml`` into every run folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Literal

from histopan.config import from_dict, load_yaml, save_yaml, to_dict
from histopan.model.config import ModelConfig

__all__ = [
    "AugmentConfig",
    "LossConfig",
    "NucleusSetConfig",
    "TileSetConfig",
    "TrainConfig",
    "TuneConfig",
    "read_train_config",
    "write_train_config",
]


@dataclass(frozen=True)
class NucleusSetConfig:
    """A folder of ``images/<name>.png`` + ``labels/<name>.tif`` (nucleus instances) + ``meta.json``.

    ``mpp`` overrides ``meta.json`` (needed when the source does not state it); ``val`` lists the image
    names (file stems) held out for validation -- whole images, never crops of a training image; ``exclude``
    names images not used at all; ``weight`` is the relative sampling weight of this set.
    """

    path: Path
    mpp: float | None = None
    val: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "val", tuple(self.val))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp of {self.path} must be a positive number of microns per pixel, got {self.mpp}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight of {self.path} must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class TileSetConfig:
    """A folder of class folders, each holding image tiles that show one tissue class (weak stuff labels).

    ``classes`` maps each sub-folder name to a stuff class of the model, or to ``null`` to skip that folder;
    a folder not listed is an error (so nothing is silently dropped).  ``mpp`` is the tiles' resolution.
    ``val`` lists tile file stems held out for validation.  ``pad_to_crop`` lets tiles smaller than the
    training crop be padded with unlabelled pixels (which train nothing) instead of raising an error.
    """

    path: Path
    mpp: float
    classes: dict[str, str | None]
    val: tuple[str, ...] = ()
    weight: float = 1.0
    pad_to_crop: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "val", tuple(self.val))
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp of {self.path} must be a positive number of microns per pixel, got {self.mpp}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight of {self.path} must be >= 0, got {self.weight}")
        if not self.classes:
            raise ValueError(f"classes of {self.path} must map at least one folder to a class")


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentations, applied identically to the image and its labels (see :mod:`.augment`).

    ``scale`` is the half-width of the relative zoom range (0.1: x0.9 .. x1.1); ``hed`` the standard deviation
    of the multiplicative (``1 + N(0, hed)``) and additive (``N(0, hed / 2)``) jitter of each
    haematoxylin / eosin / DAB channel; ``brightness`` and ``contrast`` half-widths of uniform jitter;
    ``blur_prob`` the chance of a Gaussian blur with sigma uniform in ``(0, blur_sigma_um]`` microns.
    """

    flips: bool = True
    rot90: bool = True
    scale: float = 0.15
    hed: float = 0.04
    brightness: float = 0.1
    contrast: float = 0.15
    blur_prob: float = 0.2
    blur_sigma_um: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.scale < 0.5:
            raise ValueError(f"augment.scale must be within 0..0.5, got {self.scale}")
        for name in ("hed", "brightness", "contrast", "blur_sigma_um"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.blur_prob <= 1:
            raise ValueError(f"augment.blur_prob must be within 0..1, got {self.blur_prob}")


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and target geometry (sizes in microns, converted with the model's mpp).

    ``semantic`` weights the partial-label cross-entropy, ``stuff`` the tile-class cross-entropy given "not
    a nucleus" (see :func:`~histopan.training.losses.stuff_given_tissue_ce`), ``dice`` a soft Dice on p(nucleus), ``centre`` and
    ``boundary`` the binary cross-entropies of those maps; ``centre_sigma_um`` is the Gaussian's sigma at each
    centroid; ``boundary_pos_weight`` up-weights the rare boundary pixels.
    """

    semantic: float = 1.0
    stuff: float = 1.0
    dice: float = 1.0
    centre: float = 2.0
    boundary: float = 1.0
    centre_sigma_um: float = 1.5
    boundary_pos_weight: float = 3.0

    def __post_init__(self) -> None:
        for name in ("semantic", "stuff", "dice", "centre", "boundary"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.centre_sigma_um > 0:
            raise ValueError(f"loss.centre_sigma_um must be > 0 microns, got {self.centre_sigma_um}")
        if not self.boundary_pos_weight > 0:
            raise ValueError(f"loss.boundary_pos_weight must be > 0, got {self.boundary_pos_weight}")


@dataclass(frozen=True)
class TuneConfig:
    """Grid of post-processing thresholds searched on the validation split after training."""

    nucleus_threshold: tuple[float, ...] = (0.4, 0.5, 0.6)
    centre_threshold: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    boundary_weight: tuple[float, ...] = (0.3, 0.6)
    min_distance_um: tuple[float, ...] = (2.0, 3.0)

    def __post_init__(self) -> None:
        for name in ("nucleus_threshold", "centre_threshold", "boundary_weight", "min_distance_um"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"tune.{name} needs at least one value")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; saved as ``train.yaml`` in the run folder."""

    model: ModelConfig
    nuclei: tuple[NucleusSetConfig, ...]
    tiles: tuple[TileSetConfig, ...] = ()
    crop: int = 256
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int = 100
    tile_fraction: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    threads: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_minutes: float | None = None
    val_max_images: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nuclei", tuple(self.nuclei))
        object.__setattr__(self, "tiles", tuple(self.tiles))
        if not self.nuclei:
            raise ValueError("nuclei needs at least one nucleus data set")
        if self.crop < 32 or self.crop % 32:
            raise ValueError(f"crop must be a positive multiple of 32 pixels, got {self.crop}")
        for name in ("batch_size", "epochs", "steps_per_epoch", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.tile_fraction <= 1:
            raise ValueError(f"tile_fraction must be within 0..1, got {self.tile_fraction}")
        if self.tile_fraction > 0 and not self.tiles:
            raise ValueError("tile_fraction > 0 needs at least one tile set under 'tiles' (or set it to 0)")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise ValueError(f"val_max_images must be >= 1, got {self.val_max_images}")
        stuff = {self.model.classes[i].name for i in self.model.stuff_indices}
        for tiles in self.tiles:
            for folder, name in tiles.classes.items():
                if name is not None and name not in stuff:
                    raise ValueError(
                        f"tile folder {folder!r} of {tiles.path} maps to unknown stuff class {name!r}; "
                        f"the model's stuff classes are {sorted(stuff)}"
                    )

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def read_train_config(path: str | PathLike[str]) -> TrainConfig:
    """Read and validate a training config; relative data paths are taken relative to the YAML's folder."""
    p = Path(path)
    data = load_yaml(p)
    base = p.resolve().parent
    for key in ("nuclei", "tiles"):
        items = data.get(key)
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("path"), str):
                    item["path"] = str((base / Path(item["path"]).expanduser()).resolve())
    config = from_dict(TrainConfig, data, source=p)
    return config


def write_train_config(config: TrainConfig, path: str | PathLike[str]) -> None:
    """Save ``config`` as YAML (absolute paths), e.g. into a run folder."""
    save_yaml(to_dict(config), path)

