"""``predict_tile``: one RGB image region in, semantic labels + nucleus instances + a nucleus table out.

The image is resampled (anti-aliased) to the model's working resolution, run through the network
(:class:`~histopan.inference.TileInferencer`, windows of the model's tile + halo for large images),
post-processed with the tissue rules (:func:`~histopan.postprocess.panoptic_labels`, the same path as
``histopan segment``'s tiles; the glass rule's tissue region detected on the image itself) and the labels are
mapped back to the input's pixel grid by nearest neighbour, so every output is at the input's resolution.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from os import PathLike

import numpy as np
import pandas as pd
import torch
from skimage.transform import resize

from histopan.checks import check_mpp
from histopan.engine import cached_model
from histopan.errors import HistopanError
from histopan.inference import MIN_TILE_PX, TileInferencer
from histopan.model.checkpoint import LoadedModel
from histopan.model.config import ClassSpec, NucleusTypeSpec
from histopan.postprocess import nucleus_table, panoptic_labels

log = logging.getLogger(__name__)

__all__ = ["MAX_SIDE_PX", "NUCLEI_COLUMNS", "TileResult", "predict_tile"]

#: largest image side, in pixels at the model's mpp, that predict_tile handles in memory.
MAX_SIDE_PX = 4096
#: columns of :attr:`TileResult.nuclei`.
NUCLEI_COLUMNS = ("id", "centroid_x", "centroid_y", "area_um2", "area_px", "nucleus_prob", "type", "type_prob")
#: resampling factors this close to 1 are skipped.
_SAME_SCALE = 1e-3


@dataclass(frozen=True)
class TileResult:
    """Labels for one image, at the input's resolution.

    ``semantic`` (H, W) uint8 index into ``classes``; ``instances`` (H, W) uint32 nucleus ids (0 = none),
    where ``semantic`` is the nucleus class exactly where ``instances > 0``; ``nuclei`` a DataFrame with
    :data:`NUCLEI_COLUMNS`, one row per id in ``instances`` (centroids in input pixels, x = column,
    y = row; ``type`` the type name and ``type_prob`` its probability, ``None`` when the model has no
    type head); ``mpp`` the input's microns per pixel; ``model`` the model's name.
    """

    semantic: np.ndarray
    instances: np.ndarray
    classes: tuple[ClassSpec, ...]
    nuclei: pd.DataFrame
    mpp: float
    model: str
    nucleus_types: tuple[NucleusTypeSpec, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(c.color for c in self.classes)


def _as_rgb_uint8(image: object) -> np.ndarray:
    """uint8 (H, W, 3); grayscale is replicated to RGB and RGBA composited over white."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise HistopanError("image must be uint8 RGB", value=str(arr.dtype),
                            fix="convert it with skimage.util.img_as_ubyte (floats in 0..1) or read it as 8-bit")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise HistopanError("image must be shaped (H, W, 3) RGB (grayscale (H, W) and RGBA (H, W, 4) are "
                            "converted)", value=tuple(arr.shape), fix="pass an RGB array, channels last")
    if arr.shape[2] == 1:
        log.warning("grayscale image: replicating it to RGB; the model was trained on colour H&E")
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """For each of ``n_out`` output pixels, the nearest of ``n_in`` source pixels (centres aligned)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def predict_tile(image: np.ndarray, mpp: float, model: str | PathLike[str] | LoadedModel = "default",
                 device: str | torch.device | None = None, tta: bool = False, tissue: bool = True) -> TileResult:
    """Panoptic labels of one RGB uint8 image whose pixels are ``mpp`` microns wide.

    ``model`` is a model name, a model folder or a :class:`~histopan.model.checkpoint.LoadedModel`
    (names and folders are loaded once and cached); ``device`` as in
    :func:`~histopan.inference.resolve_device` (default: CUDA when available); ``tta`` averages the network
    over flips and 90-degree rotations (eight times the inference time).  The image must cover at
    least 32 px at the model's resolution and at most 4096 px per side (use the slide pipeline for more).
    The labels are those ``histopan segment`` makes of the same region, through the same tissue rules
    (:func:`~histopan.postprocess.tissue_classes`): with ``tissue`` (the default) the tissue detector runs
    on the image itself, as ``segment`` runs it on a slide, and outside its region (the mask, the glass it
    encloses and a margin, :func:`~histopan.slide.tissue.tissue_region`) the tissue classes are background
    (the glass rule; ``tissue=False`` leaves every pixel to the model, like ``segment --min-tissue 0``);
    then tissue regions smaller than the model's ``min_stuff_area_um2`` are absorbed by their neighbours,
    except where they touch the border.  Nuclei do not depend on the glass rule.
    Labels are mapped back by sampling the model-grid labels at the input pixel centres, so ``semantic`` and
    ``instances`` agree; a nucleus that no input pixel centre falls on (possible when the input is coarser
    than the model's resolution) is dropped.
    """
    mpp = check_mpp(mpp, fix="pass the image's resolution, e.g. mpp=0.5 for a 20x scan")
    rgb = _as_rgb_uint8(image)
    loaded = cached_model(model).for_tta(tta)
    cfg = loaded.config
    in_h, in_w = rgb.shape[:2]
    scale = mpp / cfg.mpp
    h, w = int(round(in_h * scale)), int(round(in_w * scale))
    if min(h, w) < MIN_TILE_PX:
        raise HistopanError(
            f"image too small: {in_w} x {in_h} px at {mpp} um/px is {w} x {h} px at the model's {cfg.mpp} um/px, "
            f"below the minimum of {MIN_TILE_PX} px per side",
            value=(in_h, in_w), fix=f"pass a region at least {math.ceil(MIN_TILE_PX * cfg.mpp)} um on each side",
        )
    if max(h, w) > MAX_SIDE_PX:
        raise HistopanError(
            f"image too large for predict_tile: {w} x {h} px at the model's {cfg.mpp} um/px (max {MAX_SIDE_PX})",
            value=(in_h, in_w), fix="split the image into tiles or run the slide pipeline on the whole slide",
        )
    resampled = abs(scale - 1.0) > _SAME_SCALE
    if resampled:
        work = resize(rgb, (h, w), order=1, anti_aliasing=scale < 1, preserve_range=True)
        work = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    else:
        work, h, w = rgb, in_h, in_w

    maps = TileInferencer(loaded, device=device, tta=tta).predict_image(work)
    region = _tissue_region(rgb, mpp, (h, w)) if tissue else None
    labels = panoptic_labels(maps, cfg.mpp, cfg.postprocess, cfg.classes, tissue=region)

    if resampled:
        rows, cols = _nearest_index(in_h, h), _nearest_index(in_w, w)
        semantic = labels.semantic[np.ix_(rows, cols)]
        model_ids = labels.instances[np.ix_(rows, cols)]
        table = nucleus_table(model_ids, mpp)
        order = np.lexsort((table["centroid_x"].to_numpy(), table["centroid_y"].to_numpy()))
        table = table.iloc[order].reset_index(drop=True)
        lut = np.zeros(int(labels.instances.max()) + 1, dtype=np.uint32)
        lut[table["id"].to_numpy()] = np.arange(1, len(table) + 1, dtype=np.uint32)
        instances = lut[model_ids]
        source = labels.nuclei.set_index("id").loc[table["id"].to_numpy()]
        dropped = len(labels.nuclei) - len(table)
        if dropped:
            log.debug("%d nuclei smaller than an input pixel dropped when mapping back", dropped)
        table = table.assign(
            id=np.arange(1, len(table) + 1, dtype=np.uint32),
            nucleus_prob=source["nucleus_prob"].to_numpy(),
            type=source["type"].to_numpy(),
            type_prob=source["type_prob"].to_numpy(),
        )
    else:
        semantic, instances, table = labels.semantic, labels.instances, labels.nuclei

    nuclei = _public_table(table, cfg.type_names)
    return TileResult(semantic=semantic, instances=instances, classes=cfg.classes, nuclei=nuclei, mpp=mpp,
                      model=cfg.name, nucleus_types=cfg.nucleus_types)


def _tissue_region(rgb: np.ndarray, mpp: float, shape: tuple[int, int]) -> np.ndarray:
    """The glass rule's tissue region of the image ``rgb`` (at ``mpp``) on the model's ``shape`` grid: the
    tissue detector run on the image as on a one-level slide, sampled at the grid's pixel centres (in input
    pixels, the image being the slide's level 0)."""
    from histopan.slide.base import ArrayReader
    from histopan.slide.tissue import tissue_mask, tissue_region

    (in_h, in_w), (h, w) = rgb.shape[:2], shape
    region = tissue_region(tissue_mask(ArrayReader(rgb, mpp)))
    return region.sample((np.arange(h) + 0.5) * (in_h / h), (np.arange(w) + 0.5) * (in_w / w))


def _public_table(table: pd.DataFrame, type_names: tuple[str, ...]) -> pd.DataFrame:
    n = len(table)
    if type_names:
        types = pd.Series([type_names[int(t)] for t in table["type"]], dtype=object)
        type_prob = pd.Series(table["type_prob"].to_numpy(dtype=np.float64))
    else:
        types = pd.Series([None] * n, dtype=object)
        type_prob = pd.Series([None] * n, dtype=object)
    return pd.DataFrame({
        "id": table["id"].to_numpy(dtype=np.uint32),
        "centroid_x": table["centroid_x"].to_numpy(dtype=np.float64),
        "centroid_y": table["centroid_y"].to_numpy(dtype=np.float64),
        "area_um2": table["area_um2"].to_numpy(dtype=np.float64),
        "area_px": table["area_px"].to_numpy(dtype=np.int64),
        "nucleus_prob": table["nucleus_prob"].to_numpy(dtype=np.float64),
        "type": types,
        "type_prob": type_prob,
    }, columns=list(NUCLEI_COLUMNS))
