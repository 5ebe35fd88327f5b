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
from typing import ClassVar, Literal

from histopan.config import from_dict, load_yaml, save_yaml, to_dict
from histopan.checks import check_mpp
from histopan.errors import ConfigError
from histopan.model.config import ClassSpec, ModelConfig, NucleusTypeSpec

__all__ = [
    "AnnotatedSetConfig",
    "AnnotationGeometry",
    "AugmentConfig",
    "FinetuneConfig",
    "MaskSetConfig",
    "HeldOutSetsConfig",
    "SlideAnnotationConfig",
    "LossConfig",
    "NucleusSetConfig",
    "TileSetConfig",
    "TrainConfig",
    "TuneConfig",
    "read_finetune_config",
    "read_train_config",
    "write_finetune_config",
    "write_train_config",
]


def _check_mpp(mpp: float | None, where: object, optional: bool = False) -> None:
    if mpp is not None or not optional:
        check_mpp(mpp, what=f"mpp of {where}", error=ValueError)


def _check_weight(weight: float, where: object) -> None:
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight of {where} must be >= 0, got {weight}")


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
        _check_mpp(self.mpp, self.path, optional=True)
        _check_weight(self.weight, self.path)


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
        _check_mpp(self.mpp, self.path)
        _check_weight(self.weight, self.path)
        if not self.classes:
            raise ValueError(f"classes of {self.path} must map at least one folder to a class")


@dataclass(frozen=True)
class MaskSetConfig:
    """Images with pixel masks of one tissue region against the rest (e.g. gland epithelium vs stroma).

    Layout: ``images/[<group>/]<name>.(jpg|png|tif)`` and ``masks/[<group>/]<name>.png`` (same size;
    0 = the rest, > 0 = the region).  ``foreground`` maps each group to the class of the masked region, a list
    of classes when the data does not say which of them ("tumour or benign epithelium"), or ``null`` to skip
    the group; a group not listed is an error.  Groups are the sub-folders of ``images/`` (``group_by:
    folder``, e.g. EBHI-Seg's diagnoses) or the per-image grade in ``meta.json`` (``group_by: grade``:
    ``grades.<name>.grade``, as in GlaS).  ``rest`` is the class of the unmasked tissue.  Bare glass in any
    part, and white areas inside the masked region (gland lumina) of at least ``glass_um2`` square microns,
    are background and hold no nuclei; every other pixel allows its class or a nucleus in it.
    ``val`` lists held-out image names or case prefixes (``GT2012915`` holds out ``GT2012915-1-400-001``
    etc.), so that a split is by case, never by crop.
    """

    path: Path
    foreground: dict[str, str | list[str] | None]
    rest: str = "stroma"
    mpp: float | None = None
    group_by: Literal["folder", "grade"] = "folder"
    glass_um2: float = 40.0
    val: tuple[str, ...] = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "val", tuple(self.val))
        _check_mpp(self.mpp, self.path, optional=True)
        _check_weight(self.weight, self.path)
        if not self.foreground:
            raise ValueError(f"foreground of {self.path} must map at least one group to a class")
        if not (math.isfinite(self.glass_um2) and self.glass_um2 >= 0):
            raise ValueError(f"glass_um2 of {self.path} must be >= 0 square microns, got {self.glass_um2}")

    def foreground_classes(self, group: str) -> tuple[str, ...] | None:
        """The class names the masked region of ``group`` may be (None: skip the group)."""
        value = self.foreground[group]
        if value is None:
            return None
        return (value,) if isinstance(value, str) else tuple(value)


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
    ``boundary`` the binary cross-entropies of those maps, ``type`` the cross-entropy of the nucleus-type head
    where a type is known; ``centre_sigma_um`` is the Gaussian's sigma at each
    centroid; ``boundary_pos_weight`` up-weights the rare boundary pixels; ``contact_weight`` > 0 up-weights
    the pixels within ``contact_um`` of two different nuclei (where touching neighbours meet or nearly meet,
    the place they get merged) by ``1 + contact_weight`` in the cross-entropy and the centre and boundary
    losses.
    """

    semantic: float = 1.0
    stuff: float = 1.0
    dice: float = 1.0
    centre: float = 2.0
    boundary: float = 1.0
    type: float = 1.0
    centre_sigma_um: float = 1.5
    boundary_pos_weight: float = 3.0
    contact_weight: float = 0.0
    contact_um: float = 1.0

    def __post_init__(self) -> None:
        for name in ("semantic", "stuff", "dice", "centre", "boundary", "type"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.centre_sigma_um > 0:
            raise ValueError(f"loss.centre_sigma_um must be > 0 microns, got {self.centre_sigma_um}")
        if not self.boundary_pos_weight > 0:
            raise ValueError(f"loss.boundary_pos_weight must be > 0, got {self.boundary_pos_weight}")
        if not (math.isfinite(self.contact_weight) and self.contact_weight >= 0):
            raise ValueError(f"loss.contact_weight must be >= 0, got {self.contact_weight}")
        if not (math.isfinite(self.contact_um) and self.contact_um > 0):
            raise ValueError(f"loss.contact_um must be > 0 microns, got {self.contact_um}")


@dataclass(frozen=True)
class TuneConfig:
    """Grid of post-processing thresholds searched on the validation split after training.

    ``centre_h`` 0 means plain centre-map peaks (no h-maximum test), ``min_nucleus_prob`` 0 keeps every
    object whatever its mean nucleus probability and ``min_centre_peak`` 0 whatever its centre map; see
    :class:`~histopan.postprocess.PostprocessConfig`.
    """

    nucleus_threshold: tuple[float, ...] = (0.4, 0.5, 0.6)
    centre_threshold: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    boundary_weight: tuple[float, ...] = (0.3, 0.6)
    min_distance_um: tuple[float, ...] = (2.0, 3.0)
    centre_h: tuple[float, ...] = (0.0,)
    min_nucleus_prob: tuple[float, ...] = (0.0,)
    min_centre_peak: tuple[float, ...] = (0.0,)

    #: the grid's axes, in the order trials are listed
    AXES: ClassVar[tuple[str, ...]] = ("nucleus_threshold", "centre_threshold", "boundary_weight",
                                       "min_distance_um", "centre_h", "min_nucleus_prob", "min_centre_peak")

    def __post_init__(self) -> None:
        for name in self.AXES:
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"tune.{name} needs at least one value")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; saved as ``train.yaml`` in the run folder.

    ``init`` (a model name or folder) starts the network from that model's weights instead of a random
    initialisation: a warm start, e.g. to train a shipped model for longer.  Its architecture must equal
    ``model.architecture``; output channels are matched by class name (new classes start fresh).
    ``workers`` > 0 makes the training crops in that many background processes (a GPU is otherwise kept
    waiting by the CPU); crop ``i`` is the same whatever the number of workers, so the run is too.
    ``ema`` (a decay such as 0.999) keeps an exponential moving average of the weights and batch-norm
    statistics, updated after every step; validation, the best checkpoint and the exported model use the
    average instead of the raw weights, which smooths out the noise of small batches.
    ``threads``: CPU threads for the network on the CPU, and for the threshold search (``tune``; post-processing
    releases the GIL, so the trials run in parallel).
    ``masks`` are pixel-mask sets (:class:`MaskSetConfig`); ``tile_fraction`` and ``mask_fraction`` are the shares
    of crops drawn from the tile and mask sets, the rest come from the nucleus sets.  ``distill`` (a weight)
    holds the nucleus probability, centre and boundary maps to those of the ``distill_from`` model (default:
    the ``init`` model) wherever a crop does not label them (tiles, masks), so that teaching tissue classes does
    not move the nuclei.  ``tissue_score_weight`` adds that weight times the mask sets' mean region IoU to the
    validation nucleus PQ when the best epoch is picked.
    ``trainable``: ``all`` layers, ``decoder`` (the encoder frozen) or ``head`` (only the final convolution);
    with a frozen part every batch-norm layer keeps the ``init`` model's running statistics.  A frozen encoder
    keeps the features the nuclei were learnt on while a warm start teaches the decoder new classes.
    """

    model: ModelConfig
    nuclei: tuple[NucleusSetConfig, ...]
    tiles: tuple[TileSetConfig, ...] = ()
    masks: tuple[MaskSetConfig, ...] = ()
    crop: int = 256
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int = 100
    tile_fraction: float = 0.2
    mask_fraction: float = 0.0
    distill: float = 0.0
    distill_from: str | None = None
    tissue_score_weight: float = 0.0
    trainable: Literal["all", "decoder", "head"] = "all"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    threads: int = 2
    workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_minutes: float | None = None
    val_max_images: int | None = None
    init: str | None = None
    ema: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nuclei", tuple(self.nuclei))
        object.__setattr__(self, "tiles", tuple(self.tiles))
        object.__setattr__(self, "masks", tuple(self.masks))
        if not self.nuclei:
            raise ValueError("nuclei needs at least one nucleus data set")
        if self.crop < 32 or self.crop % 32:
            raise ValueError(f"crop must be a positive multiple of 32 pixels, got {self.crop}")
        for name in ("batch_size", "epochs", "steps_per_epoch", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: crops are made in the training process), got {self.workers}")
        if not 0 <= self.tile_fraction <= 1:
            raise ValueError(f"tile_fraction must be within 0..1, got {self.tile_fraction}")
        if self.tile_fraction > 0 and not self.tiles:
            raise ValueError("tile_fraction > 0 needs at least one tile set under 'tiles' (or set it to 0)")
        if not 0 <= self.mask_fraction <= 1 or self.tile_fraction + self.mask_fraction > 1:
            raise ValueError(f"mask_fraction must be within 0..1 and tile_fraction + mask_fraction at most 1, got "
                             f"{self.mask_fraction} and {self.tile_fraction}")
        if self.mask_fraction > 0 and not self.masks:
            raise ValueError("mask_fraction > 0 needs at least one mask set under 'masks' (or set it to 0)")
        for name in ("distill", "tissue_score_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.distill > 0 and self.init is None and self.distill_from is None:
            raise ValueError("distill keeps the outputs of the 'init' model (or of 'distill_from'): set one of "
                             "them or remove 'distill'")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"lr must be finite and > 0, weight_decay finite and >= 0, got {self.lr} and "
                             f"{self.weight_decay}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.trainable != "all" and self.init is None:
            raise ValueError(f"trainable: {self.trainable} freezes layers of the 'init' model: set 'init' (a warm "
                             "start) or train all layers")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise ValueError(f"val_max_images must be >= 1, got {self.val_max_images}")
        if self.init is not None and not str(self.init).strip():
            raise ValueError("init must name a model (a name such as 'default' or a model folder), got ''")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay within 0..1 (e.g. 0.999) or absent, got {self.ema}")
        stuff = {self.model.classes[i].name for i in self.model.stuff_indices}
        for tiles in self.tiles:
            for folder, name in tiles.classes.items():
                if name is not None and name not in stuff:
                    raise ValueError(
                        f"tile folder {folder!r} of {tiles.path} maps to unknown stuff class {name!r}; "
                        f"the model's stuff classes are {sorted(stuff)}"
                    )
        for masks in self.masks:
            names = [masks.rest] + [n for g in masks.foreground for n in (masks.foreground_classes(g) or ())]
            unknown = sorted({n for n in names if n not in stuff})
            if unknown:
                raise ValueError(f"mask set {masks.path} names unknown stuff classes {unknown}; the model's stuff "
                                 f"classes are {sorted(stuff)}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _train_config_data(path: Path, chain: tuple[Path, ...]) -> dict:
    """The mapping of one training YAML with its paths made absolute, merged over the config it ``extends``."""
    data = load_yaml(path)
    base = path.parent
    for key in ("nuclei", "tiles", "masks"):
        items = data.get(key)
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("path"), str):
                    item["path"] = str((base / Path(item["path"]).expanduser()).resolve())
    for key in ("init", "distill_from"):
        value = data.get(key)
        if isinstance(value, str) and ("/" in value or value.startswith(".")):
            data[key] = str((base / Path(value).expanduser()).resolve())
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ConfigError("'extends' must name another training config", path=path, value=parent,
                          fix="write e.g. 'extends: train.yaml' (relative to this file)")
    parent_path = (base / Path(parent).expanduser()).resolve()
    if parent_path in chain:
        raise ConfigError("training configs extend each other in a loop", path=path, value=parent,
                          fix="make the chain of 'extends' end at a config without one")
    merged = _train_config_data(parent_path, (*chain, parent_path))
    merged.update(data)
    return merged


def read_train_config(path: str | PathLike[str]) -> TrainConfig:
    """Read and validate a training config; relative data paths are taken relative to the YAML's folder.

    ``extends: OTHER.yaml`` (relative to this file) starts from that config: each top-level key given here
    replaces the other's whole value (a list such as ``nuclei`` is replaced, not merged).
    """
    p = Path(path).resolve()
    return from_dict(TrainConfig, _train_config_data(p, (p,)), source=Path(path))


def write_train_config(config: TrainConfig, path: str | PathLike[str]) -> None:
    """Save ``config`` as YAML (absolute paths), e.g. into a run folder."""
    save_yaml(to_dict(config), path)



# -- sparse fine-tuning (``histopan finetune CONFIG.yaml``) ---------------------------------------------
@dataclass(frozen=True)
class AnnotationGeometry:
    """How sparse annotations become pixel targets, sizes in microns (see :mod:`histopan.training.sparse`).

    ``ring_um``: the "not a nucleus" ring around each nucleus polygon; ``point_core_um``: radius of the disc
    that a nucleus point marks as nucleus; ``type_radius_um``: radius of the disc a typed point trains the type
    head on; ``line_width_um``: width of a line / brush stroke region; ``centre_sigma_um``: the centre Gaussian;
    ``point_extent_um``: with ``complete_points``, pixels farther than this from every point are "not a
    nucleus" (about the largest distance from a nucleus's point to its edge).
    """

    ring_um: float = 1.0
    point_core_um: float = 1.0
    type_radius_um: float = 2.0
    line_width_um: float = 4.0
    centre_sigma_um: float = 1.5
    point_extent_um: float = 7.0

    def __post_init__(self) -> None:
        for name in ("ring_um", "point_core_um", "type_radius_um", "line_width_um", "centre_sigma_um",
                     "point_extent_um"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"geometry.{name} must be > 0 microns, got {v}")


@dataclass(frozen=True)
class AnnotatedSetConfig:
    """A folder of images with one QuPath GeoJSON file each (``<geojson>/<image stem>.geojson``).

    ``mpp`` overrides the ``meta.json`` beside ``images`` (in its parent folder); ``classes`` maps annotation
    class names to a stuff class, the nucleus class or a nucleus type of the model (null: ignore that class;
    a name not listed maps to the model class or type of the same name).  ``val`` names images held back
    for early stopping; ``exclude`` images not used.  Images without a GeoJSON file are not used.
    ``complete_points: true`` says every nucleus in each image has a point (an exhaustive count, as in
    CRCHistoPhenotypes): the centre map is then trained on the whole image, 0 away from the points, instead of
    only around them, and pixels farther than ``geometry.point_extent_um`` from every point are "not a nucleus".
    """

    images: Path
    geojson: Path
    mpp: float | None = None
    classes: dict[str, str | None] = field(default_factory=dict)
    val: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    weight: float = 1.0
    complete_points: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "val", tuple(self.val))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _check_mpp(self.mpp, self.images, optional=True)
        _check_weight(self.weight, self.images)


@dataclass(frozen=True)
class SlideAnnotationConfig:
    """QuPath GeoJSON drawn on a whole slide (level-0 pixel coordinates).

    Regions around the annotations (plus ``margin_um``) are read from the slide at the model's mpp.
    ``mpp`` overrides the slide's metadata; ``identity`` (from ``histopan info --json``), when given, must
    match the slide, which catches an annotation file paired with the wrong slide; ``val: true`` holds the
    whole slide back for early stopping.
    """

    slide: Path
    geojson: Path
    mpp: float | None = None
    identity: str | None = None
    classes: dict[str, str | None] = field(default_factory=dict)
    val: bool = False
    margin_um: float = 16.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_mpp(self.mpp, self.slide, optional=True)
        if not (math.isfinite(self.margin_um) and self.margin_um >= 0):
            raise ValueError(f"margin_um of {self.slide} must be >= 0, got {self.margin_um}")
        _check_weight(self.weight, self.slide)


@dataclass(frozen=True)
class HeldOutSetsConfig:
    """Data scored before and after fine-tuning (never trained on), reported in the model card.

    ``points``: image folders with point GeoJSON (detection F1, per-type F1); ``nuclei``: dense instance
    folders (nucleus PQ, every image scored); ``tiles``: tile-class folders (tile accuracy, every tile).
    """

    points: tuple[AnnotatedSetConfig, ...] = ()
    nuclei: tuple[NucleusSetConfig, ...] = ()
    tiles: tuple[TileSetConfig, ...] = ()
    radius_um: float = 3.0

    def __post_init__(self) -> None:
        for name in ("points", "nuclei", "tiles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not (math.isfinite(self.radius_um) and self.radius_um > 0):
            raise ValueError(f"test.radius_um must be > 0 microns, got {self.radius_um}")


#: augmentation for the small-data regime: wider scale, stain and blur jitter than training from scratch
STRONG_AUGMENT = AugmentConfig(scale=0.2, hed=0.06, brightness=0.15, contrast=0.2, blur_prob=0.3,
                               blur_sigma_um=0.6)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything one fine-tuning run needs; saved as ``finetune.yaml`` in the run folder.

    ``base`` is a model name or folder.  ``add_classes`` are new stuff classes and ``nucleus_types`` the
    type head's types (types the base already has keep their weights; new ones grow the head).
    ``trainable``: ``all`` layers, ``decoder`` (frozen encoder) or ``head`` (only the final convolution).
    Images named in a set's ``val`` (or, when no set names any, ``val_fraction`` of the annotated images,
    chosen with ``seed``) are held back: ``early_stopping`` on them picks the best epoch and stops the run
    after ``patience`` epochs without improvement: ``loss`` (the masked loss, lower is better),
    ``point_f1`` (point detection F1), ``type_accuracy`` or ``type_f1`` (accuracy / support-weighted F1 of
    the types of matched nuclei), ``point_type_f1`` (support-weighted F1 of the types at every typed point,
    detected or not) or ``tile_accuracy`` (held-back tile-class tiles).  ``tile_fraction`` is
    the share of crops drawn from tile-class folders (default: in proportion to the number of images).
    ``type_balance`` (0..1) weights the type loss by inverse type frequency to that power (0: every
    annotated nucleus alike, 1: every type alike), for rare types.  ``tune`` is the threshold grid
    ``histopan tune MODEL --config THIS.yaml --points`` searches for the best detection F1 on the held-back
    point annotations.  With ``fit_thresholds`` the
    fine-tuning run does that search itself after training, on the best weights, and exports the model with
    the fitted thresholds (its after figures are then measured with them).  ``ema`` (a decay such as 0.99)
    scores, keeps and exports an exponential moving average of the weights instead of the raw weights, which
    evens out the step-to-step noise of small sparse batches.  ``threads``: CPU threads for the network on the
    CPU, and for the threshold search (``fit_thresholds``, ``histopan tune``).
    """

    name: str
    base: str = "default"
    description: str = ""
    add_classes: tuple[ClassSpec, ...] = ()
    nucleus_types: tuple[NucleusTypeSpec, ...] = ()
    annotations: tuple[AnnotatedSetConfig, ...] = ()
    slides: tuple[SlideAnnotationConfig, ...] = ()
    tiles: tuple[TileSetConfig, ...] = ()
    test: HeldOutSetsConfig = field(default_factory=HeldOutSetsConfig)
    val_fraction: float = 0.15
    trainable: Literal["all", "decoder", "head"] = "all"
    crop: int = 256
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int = 100
    tile_fraction: float | None = None
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    patience: int = 3
    early_stopping: Literal["loss", "point_f1", "type_accuracy", "type_f1", "point_type_f1",
                            "tile_accuracy"] = "loss"
    distill: float = 0.0
    type_balance: float = 0.0
    seed: int = 0
    threads: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_minutes: float | None = None
    augment: AugmentConfig = STRONG_AUGMENT
    loss: LossConfig = field(default_factory=LossConfig)
    geometry: AnnotationGeometry = field(default_factory=AnnotationGeometry)
    tune: TuneConfig = field(default_factory=TuneConfig)
    fit_thresholds: bool = False
    ema: float | None = None

    def __post_init__(self) -> None:
        for name in ("add_classes", "nucleus_types", "annotations", "slides", "tiles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.name or not self.name.strip() or "/" in self.name:
            raise ValueError(f"name must be a non-empty model name without '/', got {self.name!r}")
        if not (self.annotations or self.slides or self.tiles):
            raise ValueError("nothing to train on: give 'annotations' (image folders with GeoJSON), 'slides' "
                             "(slides with GeoJSON) or 'tiles' (tile-class folders)")
        if any(c.kind != "stuff" for c in self.add_classes):
            raise ValueError("add_classes may only add stuff classes (the nucleus class exists already)")
        if self.crop < 32 or self.crop % 32:
            raise ValueError(f"crop must be a positive multiple of 32 pixels, got {self.crop}")
        for name in ("batch_size", "epochs", "steps_per_epoch", "threads", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be within 0..1 (exclusive), got {self.val_fraction}")
        if self.tile_fraction is not None and not 0 <= self.tile_fraction <= 1:
            raise ValueError(f"tile_fraction must be within 0..1, got {self.tile_fraction}")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"lr must be finite and > 0, weight_decay finite and >= 0, got {self.lr} and "
                             f"{self.weight_decay}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if not (math.isfinite(self.type_balance) and 0 <= self.type_balance <= 1):
            raise ValueError(f"type_balance must be within 0..1 (0: no weighting, 1: every type alike), "
                             f"got {self.type_balance}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay within 0..1 (e.g. 0.99) or absent, got {self.ema}")
        if not (math.isfinite(self.distill) and self.distill >= 0):
            raise ValueError(f"distill must be >= 0, got {self.distill}")
        if self.loss.contact_weight:
            raise ValueError(f"loss.contact_weight ({self.loss.contact_weight}) applies to 'histopan train' on "
                             "fully outlined nuclei; sparse annotations do not say which nuclei touch: remove it")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _resolve_paths(data: dict, base: Path) -> None:
    """Make the data paths of a fine-tuning config absolute (relative to the YAML's folder), in place."""
    def fix(item: dict, keys: tuple[str, ...]) -> None:
        for key in keys:
            if isinstance(item.get(key), str):
                item[key] = str((base / Path(item[key]).expanduser()).resolve())

    for key, keys in (("annotations", ("images", "geojson")), ("slides", ("slide", "geojson")),
                      ("tiles", ("path",))):
        for item in data.get(key) or []:
            if isinstance(item, dict):
                fix(item, keys)
    test = data.get("test")
    if isinstance(test, dict):
        for key, keys in (("points", ("images", "geojson")), ("nuclei", ("path",)), ("tiles", ("path",))):
            for item in test.get(key) or []:
                if isinstance(item, dict):
                    fix(item, keys)
    if isinstance(data.get("base"), str) and ("/" in data["base"] or data["base"].startswith(".")):
        data["base"] = str((base / Path(data["base"]).expanduser()).resolve())


def read_finetune_config(path: str | PathLike[str]) -> FinetuneConfig:
    """Read and validate a fine-tuning config; relative paths are relative to the YAML's folder."""
    p = Path(path)
    data = load_yaml(p)
    _resolve_paths(data, p.resolve().parent)
    return from_dict(FinetuneConfig, data, source=p)


def write_finetune_config(config: FinetuneConfig, path: str | PathLike[str]) -> None:
    save_yaml(to_dict(config), path)
