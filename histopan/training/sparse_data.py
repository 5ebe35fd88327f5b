"""Fine-tuning data: annotated images, slide regions and tile-class tiles as sparse targets, and seeded crops.

Every source becomes :class:`SparseSample` objects at the model's mpp, each with its
:class:`~histopan.training.sparse.SparseTargets` computed once on the whole image.  Crops are cut from the
image and all target layers together (geometry augmentation on every layer, colour jitter on the image), so
a crop ``i`` is a pure function of ``(seed, i)`` as in :class:`~histopan.training.data.CropSampler`.

Sources (see :class:`~histopan.training.config.FinetuneConfig`):

- ``annotations``: ``images/<name>.png`` + ``<geojson>/<name>.geojson`` (QuPath export of the image);
- ``slides``: a slide + its GeoJSON: groups of nearby annotations become regions read at the model's mpp;
- ``tiles``: tile-class folders (one tissue class per tile).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.transform import resize

from histopan.errors import AnnotationError, ConfigError, DataError
from histopan.model.config import ModelConfig
from histopan.training.augment import colour_jitter, flip_rotate, sample_scale
from histopan.training.config import AnnotatedSetConfig, FinetuneConfig, SlideAnnotationConfig
from histopan.training.data import (BACKGROUND_INDEX, IMAGE_SUFFIXES, meta_mpp, glass_mask, load_tile_set,
                                    read_rgb, resample_image)
from histopan.training.sparse import (SparseTargets, annotation_counts, check_extent, rasterize_annotations,
                                      resolve_classes, tile_targets)

log = logging.getLogger(__name__)

__all__ = ["FinetuneData", "SparseCropSampler", "SparseSample", "load_annotated_set", "load_finetune_data",
           "load_slide_annotations", "read_points", "type_name_points"]

#: the longest side of one region read from a slide, in pixels at the model's mpp
MAX_REGION_PX = 2048
#: the smallest tile side accepted from a tile-class folder (smaller than the crop is padded, see crop())
MIN_TILE_PX = 32


@dataclass(frozen=True)
class SparseSample:
    """One image at the model's mpp with its sparse targets.

    ``points`` (n, 2) x, y in pixels of ``image`` and ``point_types`` (type names or None) are the nucleus
    points of the annotations (for point-detection scores); ``stuff_class`` is set for tile-class tiles.
    """

    name: str
    dataset: str
    image: np.ndarray
    targets: SparseTargets
    stuff_class: int | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_types: tuple[str | None, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneData:
    train: tuple[SparseSample, ...]
    val: tuple[SparseSample, ...]
    train_tiles: tuple[SparseSample, ...]
    val_tiles: tuple[SparseSample, ...]

    def summary(self) -> dict[str, int]:
        def total(samples, key):
            return sum(s.counts.get(key, 0) for s in samples)

        return {"train_images": len(self.train), "val_images": len(self.val), "train_tiles": len(self.train_tiles),
                "val_tiles": len(self.val_tiles),
                "train_points": total(self.train, "points"), "train_polygons": total(self.train, "polygons"),
                "train_regions": total(self.train, "regions"), "val_points": total(self.val, "points"),
                "val_polygons": total(self.val, "polygons"), "val_regions": total(self.val, "regions")}


def _model_names(model: ModelConfig) -> dict:
    return {"class_names": model.class_names, "stuff_names": [model.classes[i].name for i in model.stuff_indices],
            "nucleus_name": model.classes[model.nucleus_index].name, "type_names": model.type_names}


def read_points(annotations: Sequence, scale: float, mapping) -> tuple[np.ndarray, tuple[str | None, ...]]:
    """Nucleus points (x, y times ``scale``) and their type names (None: untyped) of mapped annotations."""
    import shapely

    xy, names = [], []
    for a in annotations:
        if a.geometry.geom_type not in ("Point", "MultiPoint"):
            continue
        if a.class_name is not None and mapping.targets.get(a.class_name) is None:
            continue
        target = mapping.target(a.class_name)
        for p in shapely.get_parts(a.geometry):
            xy.append((p.x * scale, p.y * scale))
            names.append(a.class_name if target is not None and target.index is not None else None)
    return np.asarray(xy, np.float64).reshape(-1, 2), tuple(names)


def type_name_points(points: tuple[str | None, ...], mapping, type_names: Sequence[str]) -> tuple[str | None, ...]:
    """Annotation class names -> the model's type names."""
    out = []
    for n in points:
        t = mapping.target(n) if n is not None else None
        out.append(type_names[t.index] if t is not None and t.index is not None else None)
    return tuple(out)


def _sample_from_annotations(name: str, dataset: str, image: np.ndarray, annotations: Sequence, scale: float,
                             mapping, model: ModelConfig, config: FinetuneConfig, source: Path,
                             offset: tuple[float, float] = (0.0, 0.0), complete_points: bool = False
                             ) -> SparseSample:
    targets = rasterize_annotations(
        annotations, image.shape[:2], scale, model.mpp, mapping, model.nucleus_index, model.stuff_indices,
        config.geometry, offset=offset, source=source, background_index=BACKGROUND_INDEX, image=image,
        complete_points=complete_points)
    xy, cls = read_points(annotations, scale, mapping)
    xy = xy - np.asarray(offset)[None, :]
    return SparseSample(name=name, dataset=dataset, image=image, targets=targets, points=xy,
                        point_types=type_name_points(cls, mapping, model.type_names),
                        counts=annotation_counts(annotations, mapping))


def load_annotated_set(cfg: AnnotatedSetConfig, model: ModelConfig, config: FinetuneConfig
                       ) -> tuple[list[SparseSample], list[SparseSample]]:
    """An image folder with one GeoJSON per image: (samples to train, samples named in ``val``)."""
    from histopan.export.geojson import read_geojson

    images_dir, geo_dir = Path(cfg.images), Path(cfg.geojson)
    if not images_dir.is_dir():
        raise DataError("image folder not found", path=images_dir, fix="check 'annotations[].images' in the config")
    if not geo_dir.is_dir():
        raise DataError("GeoJSON folder not found", path=geo_dir,
                        fix="check 'annotations[].geojson' (a folder of <image name>.geojson files)")
    mpp = meta_mpp(images_dir.parent, cfg.mpp)
    files = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    geo = {p.name.split(".geojson")[0]: p for p in sorted(geo_dir.iterdir())
           if p.name.endswith((".geojson", ".geojson.gz", ".json"))}
    orphans = sorted(set(geo) - set(files))
    if orphans:
        raise AnnotationError("GeoJSON files without an image of the same name", path=geo_dir, value=orphans[:5],
                              fix=f"name each file after its image (e.g. {sorted(files)[:2]}) or remove it")
    for key in ("val", "exclude"):
        missing = sorted(set(getattr(cfg, key)) - set(files))
        if missing:
            raise ConfigError(f"'{key}' names images that are not in the folder", path=images_dir,
                              value=missing[:5], fix=f"use file names without suffix, e.g. {sorted(files)[:3]}")
    train, val = [], []
    scale = mpp / model.mpp
    names = _model_names(model)
    for stem, gpath in geo.items():
        if stem in cfg.exclude:
            continue
        annotations = read_geojson(gpath)
        if not annotations:
            log.warning("%s holds no annotations; the image is not used", gpath)
            continue
        raw = read_rgb(files[stem])
        check_extent(annotations, raw.shape[1], raw.shape[0], gpath, f"its image {files[stem].name}")
        seen = sorted({a.class_name for a in annotations if a.class_name is not None})
        mapping = resolve_classes(cfg.classes, seen=seen, source=gpath, **names)
        image = resample_image(raw, mpp, model.mpp)
        sample = _sample_from_annotations(stem, images_dir.parent.name, image, annotations, scale, mapping, model,
                                          config, gpath, complete_points=cfg.complete_points)
        if sample.targets.labelled_pixels == 0:
            log.warning("%s: no annotation maps to a model class (all ignored); the image is not used", gpath)
            continue
        (val if stem in cfg.val else train).append(sample)
    unannotated = len(set(files) - set(geo) - set(cfg.exclude))
    log.info("%s: %d training + %d held-back annotated images at %.3g um/px (from %.3g); %d images without "
             "GeoJSON not used", images_dir, len(train), len(val), model.mpp, mpp, unannotated)
    return train, val


def _regions(bounds: np.ndarray, margin: float) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) covering every annotation's bounds plus ``margin``; overlapping boxes merged."""
    boxes = [[b[0] - margin, b[1] - margin, b[2] + margin, b[3] + margin] for b in bounds]
    merged = True
    while merged:
        merged = False
        out: list[list[float]] = []
        for b in boxes:
            for o in out:
                if b[0] <= o[2] and o[0] <= b[2] and b[1] <= o[3] and o[1] <= b[3]:
                    o[0], o[1], o[2], o[3] = min(o[0], b[0]), min(o[1], b[1]), max(o[2], b[2]), max(o[3], b[3])
                    merged = True
                    break
            else:
                out.append(list(b))
        boxes = out
    return [tuple(b) for b in sorted(boxes)]


def load_slide_annotations(cfg: SlideAnnotationConfig, model: ModelConfig, config: FinetuneConfig
                           ) -> list[SparseSample]:
    """Regions of a slide around its annotations, read at the model's mpp, with their sparse targets."""
    import shapely

    from histopan.export.geojson import read_geojson
    from histopan.slide import open_slide

    annotations = read_geojson(cfg.geojson)
    if not annotations:
        raise AnnotationError("the annotation file holds no objects", path=cfg.geojson,
                              fix="export the annotations of this slide from QuPath again")
    with open_slide(cfg.slide, mpp=cfg.mpp) as slide:
        if cfg.identity is not None and cfg.identity != slide.identity:
            raise AnnotationError(
                f"the slide's identity is {slide.identity}, not the {cfg.identity} the config names for "
                f"{Path(cfg.geojson).name}", path=cfg.slide,
                fix="pair the GeoJSON with the slide it was drawn on (histopan info --json SLIDE shows the identity)")
        width, height = slide.dimensions
        check_extent(annotations, width, height, cfg.geojson, f"the slide {Path(cfg.slide).name}")
        seen = sorted({a.class_name for a in annotations if a.class_name is not None})
        mapping = resolve_classes(cfg.classes, seen=seen, source=cfg.geojson, **_model_names(model))
        level0_mpp = slide.require_mpp()
        scale = level0_mpp / model.mpp  # level-0 px -> model px
        margin = cfg.margin_um / level0_mpp
        max_side = MAX_REGION_PX / scale
        bounds = np.array([a.geometry.bounds for a in annotations])
        samples = []
        tree = shapely.STRtree([a.geometry for a in annotations])
        for x0, y0, x1, y1 in _regions(bounds, margin):
            x0, y0 = max(0.0, np.floor(x0)), max(0.0, np.floor(y0))
            x1, y1 = min(float(width), np.ceil(x1)), min(float(height), np.ceil(y1))
            for ty in np.arange(y0, y1, max_side):
                for tx in np.arange(x0, x1, max_side):
                    w, h = min(max_side, x1 - tx), min(max_side, y1 - ty)
                    box = shapely.box(tx, ty, tx + w, ty + h)
                    members = [annotations[i] for i in tree.query(box, predicate="intersects")]
                    if not members:
                        continue
                    image = slide.read_region(tx, ty, w, h, mpp=model.mpp)
                    name = f"{Path(cfg.slide).stem}@{int(tx)},{int(ty)}"
                    s = _sample_from_annotations(name, Path(cfg.slide).name, image, members, scale, mapping, model,
                                                 config, Path(cfg.geojson), offset=(tx * scale, ty * scale))
                    if s.targets.labelled_pixels:
                        samples.append(s)
    log.info("%s: %d regions around %d annotations", cfg.slide, len(samples), len(annotations))
    return samples


def _tile_samples(samples, model: ModelConfig) -> list[SparseSample]:
    out = []
    for s in samples:
        valid = np.ones(s.image.shape[:2], bool)
        img = s.image.astype(np.float32) / 255.0
        no_nucleus = glass_mask(img) if s.stuff_class != BACKGROUND_INDEX else np.ones_like(valid)
        t = tile_targets(s.image.shape[:2], valid, s.stuff_class, model.nucleus_index, no_nucleus)
        out.append(SparseSample(name=s.name, dataset=s.dataset, image=s.image, targets=t, stuff_class=s.stuff_class))
    return out


def load_finetune_data(config: FinetuneConfig, model: ModelConfig) -> FinetuneData:
    """Every source of ``config`` as sparse samples at ``model``'s mpp, with the held-back split."""
    train: list[SparseSample] = []
    val: list[SparseSample] = []
    explicit = any(s.val for s in config.annotations) or any(s.val for s in config.slides)
    for aset in config.annotations:
        a, b = load_annotated_set(aset, model, config)
        train += a
        val += b
    for sset in config.slides:
        (val if sset.val else train).extend(load_slide_annotations(sset, model, config))
    if not explicit and len(train) >= 2:
        rng = np.random.default_rng(config.seed)
        k = max(1, int(round(config.val_fraction * len(train))))
        held = set(rng.choice(len(train), size=k, replace=False).tolist())
        val = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
    tt, vt = [], []
    for tset in config.tiles:
        a, b = load_tile_set(tset, model, MIN_TILE_PX)
        tt += _tile_samples(a, model)
        vt += _tile_samples(b, model)
    if (config.annotations or config.slides) and not train and val:
        raise ConfigError("every annotated image or slide is held back ('val'): none is left to train on",
                          value=[s.name for s in val][:5], fix="hold back fewer images, or annotate more")
    if (config.annotations or config.slides) and not train:
        raise AnnotationError("the annotation set is empty: no image or slide region has a usable annotation",
                              value=[str(s.geojson) for s in (*config.annotations, *config.slides)],
                              fix="annotate some nuclei (points or outlines) or regions, and map their classes")
    if not train and not tt:
        raise ConfigError("nothing to train on after the held-back split", fix="add annotated images or tiles")
    if config.tiles and not tt:
        raise ConfigError("the tile-class folders hold no training tiles", fix="check 'tiles' in the config")
    data = FinetuneData(tuple(train), tuple(val), tuple(tt), tuple(vt))
    log.info("fine-tuning data: %s", data.summary())
    return data


# -- crops ---------------------------------------------------------------------------------------------
def _nearest(n_out: int, n_in: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


class SparseCropSampler:
    """Seeded random crops of sparse samples with augmentation (see the module docstring)."""

    def __init__(self, data: FinetuneData, config: FinetuneConfig) -> None:
        self.config = config
        self.images = list(data.train)
        self.tiles = list(data.train_tiles)
        if config.tile_fraction is not None:
            self.tile_fraction = config.tile_fraction if self.tiles else 0.0
        else:
            n = len(self.images) + len(self.tiles)
            self.tile_fraction = len(self.tiles) / n if n else 0.0
        if not self.images:
            self.tile_fraction = 1.0
        image_weights = {Path(a.images).parent.name: a.weight for a in config.annotations}
        image_weights.update({Path(a.slide).name: a.weight for a in config.slides})
        self._p = self._probabilities(self.images, image_weights)
        self._p_tiles = self._probabilities(self.tiles, {Path(t.path).name: t.weight for t in config.tiles})

    @staticmethod
    def _probabilities(samples: list[SparseSample], weights: dict[str, float]) -> np.ndarray | None:
        """Per-sample probabilities: a data set by its weight, then its samples alike (as in CropSampler)."""
        if not samples:
            return None
        sizes: dict[str, int] = {}
        for s in samples:
            sizes[s.dataset] = sizes.get(s.dataset, 0) + 1
        p = np.array([weights.get(s.dataset, 1.0) / sizes[s.dataset] for s in samples], np.float64)
        if p.sum() <= 0:
            raise ConfigError("every data set has weight 0", value=weights, fix="give some set a weight > 0")
        return p / p.sum()

    def crop(self, index: int, mpp: float) -> tuple[np.ndarray, SparseTargets]:
        """Crop ``index``: float32 (H, W, 3) image in 0..1 and its targets."""
        rng = np.random.default_rng([self.config.seed, index])
        use_tile = rng.random() < self.tile_fraction
        if use_tile:
            sample = self.tiles[int(rng.choice(len(self.tiles), p=self._p_tiles))]
        else:
            sample = self.images[int(rng.choice(len(self.images), p=self._p))]
        size = self.config.crop
        zoom = sample_scale(rng, self.config.augment)
        region = int(round(size / zoom))
        h, w = sample.image.shape[:2]
        y = int(rng.integers(0, max(0, h - region) + 1))
        x = int(rng.integers(0, max(0, w - region) + 1))
        img = sample.image[y:y + region, x:x + region]
        layers = [a[y:y + region, x:x + region] for a in sample.targets.layers()]
        ph, pw = region - img.shape[0], region - img.shape[1]
        if ph or pw:  # smaller than the crop: pad; padding trains nothing
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(img.shape[:2]) > 1 else "edge")
            layers = [np.pad(a, ((0, ph), (0, pw)), constant_values=-1 if a.dtype == np.int16 else 0)
                      for a in layers]
        if region != size:
            img = resize(img, (size, size, 3), order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)
            rows, cols = _nearest(size, region), _nearest(size, region)
            layers = [a[np.ix_(rows, cols)] for a in layers]
        out = flip_rotate([img, *layers], rng, self.config.augment)
        img, layers = out[0], out[1:]
        return colour_jitter(img, rng, self.config.augment, mpp), SparseTargets.from_layers(layers)

    def batch(self, step: int, mpp: float) -> dict[str, np.ndarray]:
        n = self.config.batch_size
        crops = [self.crop(step * n + i, mpp) for i in range(n)]
        return stack_batch([c[0] for c in crops], [c[1] for c in crops])


def stack_batch(images: Sequence[np.ndarray], targets: Sequence[SparseTargets]) -> dict[str, np.ndarray]:
    """A training batch (the keys :func:`histopan.training.losses.total_loss` reads) from crops."""
    return {
        "image": np.stack(images).astype(np.float32),
        "label_bits": np.stack([t.label_bits for t in targets]),
        "nucleus": np.stack([t.nucleus for t in targets]),
        "nucleus_valid": np.stack([t.nucleus_valid for t in targets]),
        "centre": np.stack([t.centre for t in targets]),
        "centre_valid": np.stack([t.centre_valid for t in targets]),
        "boundary": np.stack([t.boundary for t in targets]),
        "boundary_valid": np.stack([t.boundary_valid for t in targets]),
        "types": np.stack([t.types.astype(np.int64) for t in targets]),
    }
