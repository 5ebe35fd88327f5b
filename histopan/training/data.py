"""Training data: folders read once into memory at the model's mpp, and seeded random crops from them.

Two kinds of folder (see ``../shared/data/README.md``):

- nucleus sets: ``images/<name>.png`` (RGB), ``labels/<name>.tif`` (instance map, same size, 0 = none) and
  ``meta.json`` with ``mpp`` (or an ``mpp`` override in the training config);
- tile sets: ``<class folder>/<tile>.(png|jpg|tif)``, one tissue class per tile, at a stated mpp.

Images are resampled to the model's mpp once (image: bilinear with anti-aliasing; labels: nearest
neighbour, so ids are kept).  :class:`CropSampler` draws crop ``i`` of a run from
``numpy.random.default_rng([seed, i])``: a crop depends only on the seed and its index, which makes runs
reproducible and resumable.  Validation images (whole images, listed by name in the config) are kept apart,
together with their labels at the data's own resolution so scores can be computed there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image
from skimage.transform import resize

from histopan.checks import check_mpp
from histopan.errors import ConfigError, DataError
from histopan.model.config import ModelConfig
from histopan.training.augment import colour_jitter, flip_rotate, sample_scale, zoom_to
from histopan.training.config import MaskSetConfig, NucleusSetConfig, TileSetConfig, TrainConfig
from histopan.training.targets import Targets, class_bits, nucleus_targets, region_targets, tile_class_targets

#: the model's class 0 is always background (slide glass); its tiles hold no nuclei
BACKGROUND_INDEX = 0


def glass_mask(image: np.ndarray, min_value: float = 0.8, max_saturation: float = 0.1) -> np.ndarray:
    """Bare-glass pixels of a float RGB image in 0..1: bright in every channel and nearly grey.

    Stained nuclei are dark and purple, so such pixels can never be nuclei.
    """
    lo = image.min(axis=-1)
    hi = image.max(axis=-1)
    return (lo >= min_value) & (hi - lo <= max_saturation)


#: codes of a mask set's region map (:attr:`Sample.regions`)
REGION_NONE, REGION_GLASS, REGION_FOREGROUND, REGION_REST = 0, 1, 2, 3


def glass_regions(image: np.ndarray, mpp: float, min_um2: float) -> np.ndarray:
    """Bare glass and white lumina / air spaces of an RGB uint8 image: :func:`glass_mask` pixels, opened with a
    1 um disc (so white specks between cells do not count), in connected areas of at least ``min_um2``."""
    glass = glass_mask(np.asarray(image, np.float32) / 255.0).astype(np.uint8)
    r = max(1, int(round(1.0 / mpp)))
    glass = cv2.morphologyEx(glass, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(glass, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] * mpp * mpp >= min_um2
    keep[0] = False
    return keep[comp]

log = logging.getLogger(__name__)

__all__ = [
    "CropSampler",
    "Sample",
    "TrainingData",
    "glass_regions",
    "load_mask_set",
    "load_nucleus_set",
    "load_tile_set",
    "load_training_data",
    "meta_mpp",
    "read_rgb",
    "resample_image",
    "resample_labels",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image at the model's mpp.

    ``labels`` is the instance map (nucleus sets) or ``None`` (tile sets, whose ``stuff_class`` is the class
    index); ``source_mpp`` and ``native_labels`` (instance map at the data's own resolution, validation
    only) allow scoring at the original resolution.  Mask-set samples have ``regions`` instead, a uint8 map
    of region codes (``REGION_GLASS``, ``REGION_FOREGROUND``, ``REGION_REST``; 0 = unknown) at the model's mpp,
    and ``region_bits``, the stuff classes each of those codes allows (bit masks, see
    :func:`~histopan.training.targets.class_bits`).
    """

    name: str
    dataset: str
    image: np.ndarray
    labels: np.ndarray | None
    stuff_class: int | None
    source_mpp: float
    native_labels: np.ndarray | None = None
    native_shape: tuple[int, int] | None = None
    regions: np.ndarray | None = None
    region_bits: tuple[int, int, int] = (0, 0, 0)
    source: Path | None = None


@dataclass(frozen=True)
class TrainingData:
    """Training and validation samples of a config, already at the model's mpp."""

    train_nuclei: tuple[Sample, ...]
    train_tiles: tuple[Sample, ...]
    val_nuclei: tuple[Sample, ...]
    val_tiles: tuple[Sample, ...]
    train_masks: tuple[Sample, ...] = ()
    val_masks: tuple[Sample, ...] = ()


# -- reading -------------------------------------------------------------------------------------------
def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; a clear DataError if it cannot be read."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image: {exc}", path=path, fix="replace the file with a readable RGB image") from exc
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError("expected an RGB image", path=path, value=arr.shape, fix="save the tile as 8-bit RGB")
    if arr.dtype != np.uint8:
        raise DataError("expected 8-bit RGB", path=path, value=str(arr.dtype), fix="save the tile as 8-bit RGB")
    return np.ascontiguousarray(arr)


def _read_labels(path: Path) -> np.ndarray:
    try:
        lab = tifffile.imread(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read label image: {exc}", path=path,
                        fix="write the instance map as a single-channel integer TIFF") from exc
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise DataError("a label image must be a 2-d integer instance map", path=path,
                        value=f"{lab.shape} {lab.dtype}", fix="write the instance map as a uint16/uint32 TIFF")
    if lab.size and (lab.min() < 0 or lab.max() > np.iinfo(np.int32).max):
        raise DataError("a label image holds labels outside 0 .. 2**31 - 1 (negative, or too large)", path=path,
                        value=(int(lab.min()), int(lab.max())), fix="label background 0 and each nucleus 1, 2, 3, ...")
    return lab.astype(np.int32)


def meta_mpp(folder: Path, override: float | None) -> float:
    """The microns per pixel of the images in ``folder``: ``override`` (the config's ``mpp``) when given, else
    the ``mpp`` of ``folder/meta.json``; a missing, unreadable or invalid value is a DataError naming the file."""
    if override is not None:
        return float(override)
    meta = folder / "meta.json"
    if not meta.is_file():
        raise DataError("meta.json is missing, so the pixel size is unknown", path=meta,
                        fix="add meta.json with an 'mpp' value, or set 'mpp' for this set in the training config")
    try:
        mpp = json.loads(meta.read_text(encoding="utf-8")).get("mpp")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"meta.json is not a JSON object: {exc}", path=meta, fix="correct the JSON") from exc
    if mpp is None:
        raise DataError("meta.json states no mpp (microns per pixel)", path=meta,
                        fix="set 'mpp' for this set in the training config (e.g. estimated from nucleus sizes)")
    return check_mpp(mpp, what="the mpp of meta.json", path=meta, error=DataError,
                     fix="write a positive number of microns per pixel, e.g. \"mpp\": 0.5")


# -- resampling ----------------------------------------------------------------------------------------
def _target_shape(shape: tuple[int, ...], from_mpp: float, to_mpp: float) -> tuple[int, int]:
    f = from_mpp / to_mpp
    return max(1, int(round(shape[0] * f))), max(1, int(round(shape[1] * f)))


def resample_image(image: np.ndarray, from_mpp: float, to_mpp: float) -> np.ndarray:
    """RGB uint8 image from ``from_mpp`` to ``to_mpp`` (bilinear, anti-aliased when shrinking)."""
    if abs(from_mpp - to_mpp) < 1e-9 * to_mpp:
        return image
    shape = _target_shape(image.shape, from_mpp, to_mpp)
    out = resize(image, (*shape, image.shape[2]), order=1, preserve_range=True,
                 anti_aliasing=from_mpp < to_mpp)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resample_labels(labels: np.ndarray, from_mpp: float, to_mpp: float) -> np.ndarray:
    """Instance map from ``from_mpp`` to ``to_mpp`` by nearest neighbour (ids are kept, never blended)."""
    if abs(from_mpp - to_mpp) < 1e-9 * to_mpp:
        return labels
    shape = _target_shape(labels.shape, from_mpp, to_mpp)
    return resize(labels, shape, order=0, preserve_range=True, anti_aliasing=False).astype(labels.dtype)


# -- data sets -----------------------------------------------------------------------------------------
def _check_names(names: tuple[str, ...], known: set[str], folder: Path, key: str) -> None:
    missing = sorted(set(names) - known)
    if missing:
        raise ConfigError(f"'{key}' names images that are not in the folder", path=folder, value=missing[:5],
                          fix=f"use file names without suffix, e.g. {sorted(known)[:3]}")


def load_nucleus_set(cfg: NucleusSetConfig, model_mpp: float, min_size: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """Read a nucleus set at ``model_mpp``: (training samples, validation samples).

    Raises DataError for a missing folder, image without labels, label of another size, or a (resampled)
    training image smaller than ``min_size`` pixels.
    """
    folder = Path(cfg.path)
    images_dir, labels_dir = folder / "images", folder / "labels"
    if not images_dir.is_dir():
        raise DataError("no images/ folder in this nucleus data set", path=folder,
                        fix="use the layout images/<name>.png + labels/<name>.tif + meta.json")
    mpp = meta_mpp(folder, cfg.mpp)
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError("images/ holds no image files", path=images_dir, fix="add .png tiles")
    names = {p.stem for p in files}
    _check_names(cfg.val, names, folder, "val")
    _check_names(cfg.exclude, names, folder, "exclude")
    train, val = [], []
    for path in files:
        if path.stem in cfg.exclude:
            continue
        label_path = labels_dir / f"{path.stem}.tif"
        if not label_path.is_file():
            alt = labels_dir / f"{path.stem}.tiff"
            if not alt.is_file():
                raise DataError("image has no label file", path=label_path,
                                fix="add labels/<name>.tif (instance map) or list the image under 'exclude'")
            label_path = alt
        image = read_rgb(path)
        labels = _read_labels(label_path)
        if labels.shape != image.shape[:2]:
            raise DataError("label image and image differ in size", path=label_path,
                            value=f"labels {labels.shape} vs image {image.shape[:2]}",
                            fix="write the label map at the image's size")
        is_val = path.stem in cfg.val
        image_m = resample_image(image, mpp, model_mpp)
        labels_m = resample_labels(labels, mpp, model_mpp)
        if not is_val and min(image_m.shape[:2]) < min_size:
            raise DataError(
                f"image is smaller than the training crop at {model_mpp} um/px", path=path,
                value=f"{image_m.shape[1]}x{image_m.shape[0]} px < crop {min_size}",
                fix="lower 'crop' in the training config, or list the image under 'exclude'",
            )
        sample = Sample(name=path.stem, dataset=folder.name, image=image_m, labels=labels_m, stuff_class=None,
                        source_mpp=mpp, native_labels=labels if is_val else None,
                        native_shape=image.shape[:2])
        (val if is_val else train).append(sample)
    log.info("%s: %d training + %d validation images at %.3g um/px (from %.3g)", folder.name, len(train),
             len(val), model_mpp, mpp)
    return train, val


def load_tile_set(cfg: TileSetConfig, model: ModelConfig, min_size: int) -> tuple[list[Sample], list[Sample]]:
    """Read a tile-class set at the model's mpp: (training samples, validation samples).

    Every sub-folder must be listed in ``cfg.classes`` (a class name, or null to skip it).
    """
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError("tile-class folder not found", path=folder, fix="check 'tiles[].path' in the config")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unlisted = [p.name for p in subdirs if p.name not in cfg.classes]
    if unlisted:
        raise ConfigError("tile class folders are not mapped to a model class", path=folder, value=unlisted,
                          fix="add them under 'classes' (a stuff class name, or null to skip the folder)")
    missing = sorted(set(cfg.classes) - {p.name for p in subdirs})
    if missing:
        raise ConfigError("'classes' lists folders that do not exist", path=folder, value=missing,
                          fix=f"the folders are {[p.name for p in subdirs]}")
    train, val = [], []
    seen: set[str] = set()
    for sub in subdirs:
        name = cfg.classes[sub.name]
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        seen |= {p.stem for p in files}
        if name is None:
            continue
        index = model.class_index(name)
        for path in files:
            image = resample_image(read_rgb(path), cfg.mpp, model.mpp)
            is_val = path.stem in cfg.val
            if not is_val and min(image.shape[:2]) < min_size and not cfg.pad_to_crop:
                raise DataError(
                    f"tile is smaller than the training crop at {model.mpp} um/px", path=path,
                    value=f"{image.shape[1]}x{image.shape[0]} px < crop {min_size}",
                    fix="set 'pad_to_crop: true' for this tile set (padding trains nothing) or lower 'crop'",
                )
            sample = Sample(name=path.stem, dataset=folder.name, image=image, labels=None, stuff_class=index,
                            source_mpp=cfg.mpp)
            (val if is_val else train).append(sample)
    _check_names(cfg.val, seen, folder, "val")
    log.info("%s: %d training + %d validation tiles", folder.name, len(train), len(val))
    return train, val


def _mask_groups(cfg: MaskSetConfig, images_dir: Path) -> list[tuple[str, Path]]:
    """(group, image path) of every image of a mask set."""
    if cfg.group_by == "folder":
        subdirs = sorted(p for p in images_dir.iterdir() if p.is_dir())
        if not subdirs:
            raise DataError("group_by: folder, but images/ has no sub-folders", path=images_dir,
                            fix="set 'group_by: grade' (grades in meta.json) or put the images in group folders")
        return [(d.name, p) for d in subdirs for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    meta = cfg.path / "meta.json"
    try:
        grades = json.loads(meta.read_text(encoding="utf-8"))["grades"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the per-image grades: {exc}", path=meta,
                        fix="give meta.json a 'grades' object {name: {grade: ...}}, or use 'group_by: folder'") from exc
    out = []
    for p in sorted(images_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        entry = grades.get(p.stem)
        if not isinstance(entry, dict) or not isinstance(entry.get("grade"), str):
            raise DataError("image has no grade in meta.json", path=meta, value=p.stem,
                            fix="add grades.<name>.grade for every image, or remove the image")
        out.append((entry["grade"], p))
    return out


def _is_val(name: str, val: tuple[str, ...]) -> bool:
    return any(name == v or name.startswith(v + "-") or name.startswith(v + "_") for v in val)


def load_mask_set(cfg: MaskSetConfig, model: ModelConfig, min_size: int) -> tuple[list[Sample], list[Sample]]:
    """Read a mask set (:class:`~histopan.training.config.MaskSetConfig`) at the model's mpp:
    (training samples, validation samples), each with its region map (glass, masked region, rest)."""
    folder = Path(cfg.path)
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DataError("a mask set needs images/ and masks/ folders", path=folder,
                        fix="use the layout images/[<group>/]<name>.jpg + masks/[<group>/]<name>.png")
    mpp = meta_mpp(folder, cfg.mpp)
    items = _mask_groups(cfg, images_dir)
    groups = {g for g, _ in items}
    unlisted = sorted(groups - set(cfg.foreground))
    if unlisted:
        raise ConfigError("mask-set groups are not mapped to a class", path=folder, value=unlisted,
                          fix="add them under 'foreground' (a stuff class, a list of classes, or null to skip)")
    unmatched = [v for v in cfg.val if not any(_is_val(p.stem, (v,)) for _, p in items)]
    if unmatched:
        raise ConfigError("'val' names images or cases that are not in the mask set", path=folder,
                          value=unmatched[:5], fix="use image names or case prefixes of the set")
    rest_bits = class_bits([model.class_index(cfg.rest)])
    glass_bits = class_bits([BACKGROUND_INDEX])
    train, val = [], []
    for group, path in items:
        names = cfg.foreground_classes(group)
        if names is None:
            continue
        rel = path.relative_to(images_dir).with_suffix(".png")
        mask_path = masks_dir / rel
        if not mask_path.is_file():
            raise DataError("image has no mask", path=mask_path, fix="add the mask (PNG, 0 = rest, > 0 = region)")
        image = read_rgb(path)
        with Image.open(mask_path) as im:
            mask = np.asarray(im.convert("L")) > 0
        if mask.shape != image.shape[:2]:
            raise DataError("mask and image differ in size", path=mask_path,
                            value=f"mask {mask.shape} vs image {image.shape[:2]}", fix="write the mask at the image's size")
        image_m = resample_image(image, mpp, model.mpp)
        mask_m = resample_labels(mask.astype(np.uint8), mpp, model.mpp).astype(bool)
        regions = np.where(mask_m, REGION_FOREGROUND, REGION_REST).astype(np.uint8)
        regions[glass_regions(image_m, model.mpp, cfg.glass_um2)] = REGION_GLASS
        is_val = _is_val(path.stem, cfg.val)
        if not is_val and min(image_m.shape[:2]) < min_size:
            raise DataError(f"image is smaller than the training crop at {model.mpp} um/px", path=path,
                            value=f"{image_m.shape[1]}x{image_m.shape[0]} px < crop {min_size}",
                            fix="lower 'crop', or check the set's 'mpp'")
        fg_bits = class_bits([model.class_index(n) for n in names])
        sample = Sample(name=path.stem, dataset=folder.name, image=image_m, labels=None, stuff_class=None,
                        source_mpp=mpp, native_shape=image.shape[:2], regions=regions,
                        region_bits=(glass_bits, fg_bits, rest_bits), source=path)
        (val if is_val else train).append(sample)
    log.info("%s: %d training + %d validation images with masks at %.3g um/px (from %.3g)", folder.name,
             len(train), len(val), model.mpp, mpp)
    return train, val


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read every data set of ``config`` once, resampled to the model's mpp."""
    tn, vn, tt, vt = [], [], [], []
    for nset in config.nuclei:
        a, b = load_nucleus_set(nset, config.model.mpp, config.crop)
        tn.append(a)
        vn += b
    for tset in config.tiles:
        a, b = load_tile_set(tset, config.model, config.crop)
        tt.append(a)
        vt += b
    if not any(tn):
        raise ConfigError("no training images left after the validation split",
                          fix="keep some images of the nucleus sets out of 'val'")
    tm, vm = [], []
    for mset in config.masks:
        a, b = load_mask_set(mset, config.model, config.crop)
        tm.append(a)
        vm += b
    train_nuclei = tuple(s for group in tn for s in group)
    train_tiles = tuple(s for group in tt for s in group)
    train_masks = tuple(s for group in tm for s in group)
    return TrainingData(train_nuclei, train_tiles, tuple(vn), tuple(vt), train_masks, tuple(vm))


# -- crops ---------------------------------------------------------------------------------------------
class CropSampler:
    """Seeded random training crops with augmentation and targets.

    ``crop(i)`` is a pure function of ``(seed, i)``: it picks a data set kind (tile set with probability
    ``tile_fraction``), a data set by weight, an image uniformly, a zoom and a position, augments and
    computes the targets.  ``batch(step)`` stacks crops ``step * batch_size ...``.
    """

    def __init__(self, data: TrainingData, config: TrainConfig) -> None:
        self.config = config
        self.model = config.model
        self.size = config.crop
        self._nuclei = self._group(data.train_nuclei, [s.weight for s in config.nuclei],
                                   [Path(s.path).name for s in config.nuclei])
        self._tiles = self._group(data.train_tiles, [s.weight for s in config.tiles],
                                  [Path(s.path).name for s in config.tiles])
        self._masks = self._group(data.train_masks, [s.weight for s in config.masks],
                                  [Path(s.path).name for s in config.masks])
        self._sigma_um = config.loss.centre_sigma_um

    @staticmethod
    def _group(samples: tuple[Sample, ...], weights: list[float], names: list[str]
               ) -> list[tuple[float, list[Sample]]]:
        groups = []
        for w, name in zip(weights, names):
            members = [s for s in samples if s.dataset == name]
            if members and w > 0:
                groups.append((w, members))
        return groups

    def _pick(self, rng: np.random.Generator, groups: list[tuple[float, list[Sample]]]) -> Sample:
        w = np.array([g[0] for g in groups], dtype=np.float64)
        members = groups[int(rng.choice(len(groups), p=w / w.sum()))][1]
        return members[int(rng.integers(len(members)))]

    def crop(self, index: int) -> tuple[np.ndarray, Targets]:
        """Crop ``index``: a float32 (H, W, 3) image in 0..1 and its :class:`Targets`."""
        rng = np.random.default_rng([self.config.seed, index])
        kind = rng.random()
        if self._tiles and kind < self.config.tile_fraction:
            groups = self._tiles
        elif self._masks and kind < self.config.tile_fraction + self.config.mask_fraction:
            groups = self._masks
        else:
            groups = self._nuclei
        sample = self._pick(rng, groups)
        aug = self.config.augment
        zoom = sample_scale(rng, aug)
        region = int(round(self.size / zoom))
        image, labels = sample.image, sample.labels
        h, w = image.shape[:2]
        if labels is not None:  # nucleus images are at least one crop large (checked on load)
            region = min(region, h, w)
        y = int(rng.integers(0, max(0, h - region) + 1))
        x = int(rng.integers(0, max(0, w - region) + 1))
        img = image[y:y + region, x:x + region]
        if sample.regions is not None:
            labels = sample.regions
        lab = None if labels is None else labels[y:y + region, x:x + region]
        valid = np.ones(img.shape[:2], dtype=bool)
        if img.shape[0] < region or img.shape[1] < region:  # a small tile: pad, padding trains nothing
            ph, pw = region - img.shape[0], region - img.shape[1]
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
            valid = np.pad(valid, ((0, ph), (0, pw)))
            if lab is not None:
                lab = np.pad(lab, ((0, ph), (0, pw)))
        img, lab, valid = zoom_to(img, lab, valid, self.size)
        img, lab, valid = flip_rotate([img, lab, valid], rng, aug)
        mpp = self.model.mpp
        if sample.regions is not None:
            targets = region_targets(lab, valid, sample.region_bits, self.model.nucleus_index, REGION_GLASS)
        elif lab is not None:
            targets = nucleus_targets(lab, valid, mpp, self._sigma_um, self.model.nucleus_index,
                                      self.model.stuff_indices, self.config.loss.contact_um)
        else:
            # the crop is 0..255 here (uint8, or float after a zoom); glass_mask wants 0..1
            no_nucleus = (glass_mask(np.asarray(img, np.float32) / 255.0) if sample.stuff_class != BACKGROUND_INDEX
                          else np.ones_like(valid))
            targets = tile_class_targets(valid, sample.stuff_class, self.model.nucleus_index, no_nucleus)
        return colour_jitter(img, rng, aug, mpp), targets

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch ``step``: ``image`` (N, H, W, 3) float32 and the stacked target arrays."""
        n = self.config.batch_size
        crops = [self.crop(step * n + i) for i in range(n)]
        return {
            "image": np.stack([c[0] for c in crops]),
            "label_bits": np.stack([c[1].label_bits for c in crops]),
            "nucleus": np.stack([c[1].nucleus for c in crops]),
            "centre": np.stack([c[1].centre for c in crops]),
            "boundary": np.stack([c[1].boundary for c in crops]),
            "nucleus_valid": np.stack([c[1].nucleus_valid for c in crops]),
            "contact": np.stack([c[1].contact for c in crops]),
        }
