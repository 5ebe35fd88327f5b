"""Probability maps of one tile -> semantic label image + nucleus instances (pure numpy / scipy / skimage).

Marker-controlled watershed in physical units:

1. nucleus mask: ``p(nucleus) > nucleus_threshold``;
2. markers: peaks of the centre map at least ``min_distance_um`` apart and above ``centre_threshold``,
   restricted to the mask; with ``centre_h`` > 0 a peak must also be an h-maximum: it rises at least
   ``centre_h`` above the lowest pass that leads to a higher peak, so one nucleus whose centre map has two
   nearby bumps gets one marker while two nuclei with a real dip between their centres keep two; a mask
   component without a peak gets one marker at its most interior pixel;
3. flooding surface: ``boundary_weight * p(boundary) + (1 - boundary_weight) * (1 - d)``, where ``d`` is
   the Euclidean distance to the mask edge normalised to 1 at the deepest point of each mask component;
4. objects smaller than ``min_area_um2`` removed, holes inside each object filled, then objects whose mean
   nucleus probability (the table's ``nucleus_prob``) is below ``min_nucleus_prob`` removed: faint blobs
   that the mask threshold let through are mostly not nuclei (or halves of one); then, with
   ``min_centre_peak`` > 0, objects whose highest centre-map value is below it: an object with no nucleus
   centre in it, which a centre map trained on an exhaustive count of nuclei (every nucleus has a point)
   marks as not a nucleus;
5. instance ids 1..n in raster order of the centroids (by row, then column): deterministic;
6. semantic map: the nucleus class where an instance exists, else the most probable stuff class.

Nothing here opens files; the thresholds come from the model's ``model.yaml`` (``postprocess:``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import cv2

from histopan import kernels
from histopan.checks import check_mpp
from histopan.classes import BACKGROUND
from histopan.errors import ModelError
from histopan.panoptic import absorb_small_regions, fuse, stuff_argmax
from histopan.stitching import IdScheme, TileRecord, own_objects
from histopan.tiling import Tile, TileGrid

__all__ = ["BACKGROUND", "NUCLEUS_COLUMNS", "PanopticLabels", "PostprocessConfig", "ProbabilityMaps",
           "TileLabels", "background_index", "drop_small_objects", "nucleus_table", "panoptic_labels",
           "postprocess_tile", "process_tile", "shape_features", "tissue_classes"]


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds of the watershed post-processing (tuned per model, stored in ``model.yaml``)."""

    nucleus_threshold: float = 0.5
    centre_threshold: float = 0.3
    min_distance_um: float = 2.0
    centre_h: float = 0.0
    boundary_weight: float = 0.5
    min_area_um2: float = 8.0
    fill_holes: bool = True
    min_stuff_area_um2: float = 100.0
    min_nucleus_prob: float = 0.0
    min_centre_peak: float = 0.0

    def __post_init__(self) -> None:
        for name in ("nucleus_threshold", "centre_threshold", "centre_h", "boundary_weight", "min_nucleus_prob",
                     "min_centre_peak"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"postprocess.{name} must be within 0..1, got {v}")
        if not (math.isfinite(self.min_distance_um) and self.min_distance_um > 0):
            raise ValueError(f"postprocess.min_distance_um must be > 0 microns, got {self.min_distance_um}")
        for name in ("min_area_um2", "min_stuff_area_um2"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"postprocess.{name} must be >= 0 square microns, got {v}")


@dataclass(frozen=True)
class ProbabilityMaps:
    """Network probabilities for one tile, channels first, all (H, W) at the same resolution.

    ``semantic`` (C, H, W) softmax over the model's classes; ``centre`` and ``boundary`` (H, W) sigmoid
    maps; ``types`` (K, H, W) softmax over nucleus types, or ``None`` without a type head.
    """

    semantic: np.ndarray
    centre: np.ndarray
    boundary: np.ndarray
    types: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.semantic.ndim != 3:
            raise ValueError(f"semantic maps must be (C, H, W), got shape {self.semantic.shape}")
        hw = self.semantic.shape[1:]
        for name in ("centre", "boundary"):
            if getattr(self, name).shape != hw:
                raise ValueError(f"{name} map has shape {getattr(self, name).shape}, expected {hw}")
        if self.types is not None and (self.types.ndim != 3 or self.types.shape[1:] != hw):
            raise ValueError(f"types maps must be (K, {hw[0]}, {hw[1]}), got shape {self.types.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.semantic.shape[1], self.semantic.shape[2]


#: columns of :attr:`TileLabels.nuclei`, one row per instance in id order.
NUCLEUS_COLUMNS = ("id", "centroid_y", "centroid_x", "area_px", "area_um2", "nucleus_prob", "type",
                   "type_prob")


@dataclass(frozen=True)
class TileLabels:
    """Post-processed labels of one tile.

    ``semantic`` (H, W) uint8 class index into the model's classes; ``instances`` (H, W) uint32 nucleus ids
    1..n (0 = none), where ``semantic`` is the nucleus class exactly where ``instances > 0``;
    ``nuclei`` a DataFrame with :data:`NUCLEUS_COLUMNS`: centroids in pixels of this tile, area in pixels and
    um^2, the mean nucleus probability, the majority nucleus type index (-1 without a type head) and the mean
    probability of that type over the nucleus (NaN without a type head).
    """

    semantic: np.ndarray
    instances: np.ndarray
    nuclei: pd.DataFrame
    mpp: float


def _thing_index(classes: Sequence[Any], n_channels: int) -> tuple[int, list[int]]:
    if len(classes) != n_channels:
        raise ModelError(f"the maps have {n_channels} semantic channels but {len(classes)} classes were given",
                         value=len(classes), fix="pass the classes of the model that produced the maps")
    things = [i for i, c in enumerate(classes) if c.kind == "thing"]
    if len(things) != 1:
        raise ModelError("exactly one class must have kind 'thing' (the nucleus class)", value=len(things),
                         fix="pass the classes of the model that produced the maps")
    stuff = [i for i, c in enumerate(classes) if c.kind == "stuff"]
    return things[0], stuff


def _peaks(centre: np.ndarray, mask: np.ndarray, components: np.ndarray, n_components: int,
           min_distance_px: int, threshold: float, h: float) -> np.ndarray:
    """Flat indices (raster order) of the centre-map peaks: mask pixels at or above ``threshold`` that are
    the maximum of the (masked) map within ``min_distance_px`` (Chebyshev), and, with ``h`` > 0, at least
    ``h`` high and in an h-maximum of their mask component (:func:`histopan.kernels.h_peaks`)."""
    masked = np.where(mask, centre, -np.inf).astype(np.float32)
    size = 2 * min_distance_px + 1
    # a square maximum filter, edges repeated (scipy's mode="nearest"); OpenCV's is separable and fast
    local_max = cv2.dilate(masked, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
    peak = mask & (masked >= threshold) & (masked == local_max)
    if h > 0:
        peak &= centre >= h
    flat = np.flatnonzero(peak)
    if h > 0 and flat.size:
        per_component = np.bincount(components.ravel()[flat], minlength=n_components + 1)
        crowded = per_component >= 2
        if crowded.any():
            values = np.ascontiguousarray(centre).ravel()
            keep = kernels.h_peaks(flat, values, components.ravel(), crowded, values.dtype.type(h),
                                   centre.shape[1])
            flat = flat[keep]
    return flat


def _markers(centre: np.ndarray, mask: np.ndarray, components: np.ndarray, n_components: int,
             deepest_at: np.ndarray, min_distance_px: int, threshold: float,
             h: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Marker image and the markers' flat indices: one marker per flat top of the centre-map peaks
    (:func:`_peaks`, at its first pixel in raster order, numbered in that order), plus one marker per mask
    component without a peak at its most interior pixel (``deepest_at``, flat index per component)."""
    peaks = _peaks(centre, mask, components, n_components, min_distance_px, threshold, h)
    markers = np.zeros(mask.shape, dtype=np.int32)
    flat = markers.ravel()
    at = peaks[:0]
    n_peaks = 0
    if peaks.size:
        number, first = kernels.plateau_markers(peaks, mask.shape[1], mask.shape[0])
        at = peaks[first]
        flat[at] = number[first]
        n_peaks = at.size
    # a plateau is 8-connected and may touch two components diagonally: only its marker's component has one
    has_peak = np.zeros(n_components + 1, dtype=bool)
    has_peak[components.ravel()[at]] = True
    missing = np.flatnonzero(~has_peak[1:]) + 1
    flat[deepest_at[missing]] = np.arange(n_peaks + 1, n_peaks + 1 + missing.size, dtype=np.int32)
    return markers, np.concatenate([at, deepest_at[missing]])


def _edge_distance(mask: np.ndarray) -> np.ndarray:
    """Flat float64 Euclidean distance (pixels) of every pixel to the nearest pixel outside ``mask``, the
    tile's edge not counting as outside (scipy's ``distance_transform_edt``, computed by OpenCV's exact mode:
    squared distances are whole numbers, so rounding them gives scipy's values).  A mask covering the whole
    tile has no such pixel; there scipy measures from the point one row above the first pixel, and so does
    this function, so that such a tile gives the same objects as before."""
    if mask.all():
        rows, cols = np.indices(mask.shape, dtype=np.float64)
        return np.sqrt((rows + 1) ** 2 + cols**2).ravel()
    d = cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE).astype(np.float64)
    return np.sqrt(np.rint(d * d)).ravel()


def _fill_holes(instances: np.ndarray) -> np.ndarray:
    """Fill background pockets (4-connected, not touching the tile's edge) enclosed by a single instance."""
    n_bg, background = cv2.connectedComponents((instances == 0).view(np.uint8), connectivity=4,
                                               ltype=cv2.CV_32S)
    if n_bg <= 1:
        return instances
    owner = kernels.hole_owner(background.ravel(), n_bg - 1, instances.ravel(), instances.shape[1])
    if not owner.any():
        return instances
    return np.where(background > 0, owner.astype(instances.dtype)[background], instances)


def _type_columns(flat: np.ndarray, n: int, types: np.ndarray | None,
                  area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per object 1..n: the majority nucleus type (most pixels whose most probable type it is; ties go to
    the lower index) and the mean probability of that type over the object; -1 and NaN without types."""
    if types is None or n == 0:
        return np.full(n, -1, dtype=np.int64), np.full(n, np.nan)
    k = types.shape[0]
    winner = np.argmax(types, axis=0).ravel()
    inside = flat > 0
    votes = np.bincount(flat[inside] * k + winner[inside], minlength=(n + 1) * k).reshape(n + 1, k)
    type_idx = np.argmax(votes[1:], axis=1)
    chosen = np.zeros(flat.size)
    rows = np.flatnonzero(inside)
    chosen[rows] = types.reshape(k, -1)[type_idx[flat[rows] - 1], rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        type_prob = np.bincount(flat, weights=chosen, minlength=n + 1)[1:] / area
    return type_idx.astype(np.int64), type_prob


def _table(ids: np.ndarray, area: np.ndarray, sy: np.ndarray, sx: np.ndarray, prob: np.ndarray,
           type_idx: np.ndarray, type_prob: np.ndarray, mpp: float) -> pd.DataFrame:
    """The :data:`NUCLEUS_COLUMNS` frame of the objects ``ids`` from per-object sums (index = id - 1)."""
    sel = ids - 1
    a = area[sel]
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({
            "id": ids.astype(np.uint32),
            "centroid_y": sy[sel] / a,
            "centroid_x": sx[sel] / a,
            "area_px": a.astype(np.int64),
            "area_um2": a * float(mpp) ** 2,
            "nucleus_prob": prob[sel],
            "type": type_idx[sel].astype(np.int64),
            "type_prob": type_prob[sel],
        }, columns=list(NUCLEUS_COLUMNS))


def nucleus_table(instances: np.ndarray, mpp: float, nucleus_prob: np.ndarray | None = None,
                  types: np.ndarray | None = None) -> pd.DataFrame:
    """Per-instance measurements (:data:`NUCLEUS_COLUMNS`) of a label image with ids 1..n.

    ``nucleus_prob`` (H, W) gives the ``nucleus_prob`` column (NaN without it); ``types`` (K, H, W)
    gives each nucleus's majority type (most pixels whose most probable type it is; ties go to the lower
    index) and the mean probability of that type over the nucleus.
    """
    n = int(instances.max()) if instances.size else 0
    flat = np.ascontiguousarray(instances).ravel().astype(np.int64)
    zeros = np.zeros(flat.size, dtype=np.float32)
    p = zeros if nucleus_prob is None else np.ascontiguousarray(nucleus_prob).ravel()
    area, sy, sx, sp, _ = kernels.label_stats(flat, n, p, zeros, max(instances.shape[-1], 1))
    area = area[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = sp[1:] / area if nucleus_prob is not None else np.full(n, np.nan)
    type_idx, type_prob = _type_columns(flat, n, types, area)
    present = np.flatnonzero(area) + 1
    return _table(present, area, sy[1:], sx[1:], prob, type_idx, type_prob, mpp)


def postprocess_tile(maps: ProbabilityMaps, mpp: float, cfg: PostprocessConfig,
                     classes: Sequence[Any]) -> TileLabels:
    """Probability maps of one tile at ``mpp`` microns per pixel -> :class:`TileLabels`.

    ``classes`` are the model's class specs (anything with a ``kind`` of ``"stuff"`` or ``"thing"``) in
    channel order.  See the module docstring for the steps; every size is converted from microns with
    ``mpp``, so the same tissue at 0.25 and 0.5 um/px gives the same objects.  The cost is O(N log N) in the
    tile's pixels whatever the tile holds (crowded nuclei, one giant component with thousands of peaks).
    """
    check_mpp(mpp, fix="pass the tile's resolution, e.g. mpp=0.5")
    nucleus, stuff = _thing_index(classes, maps.semantic.shape[0])
    p_nucleus = maps.semantic[nucleus]
    height, width = p_nucleus.shape
    mask = p_nucleus > cfg.nucleus_threshold
    mask8 = mask.view(np.uint8)
    n_labels, components = cv2.connectedComponents(mask8, connectivity=4, ltype=cv2.CV_32S)
    n_components = n_labels - 1

    instances = np.zeros(mask.shape, dtype=np.int32)
    if n_components:
        # distance to the mask's edge in pixels: the surface normalises it per component, so the unit cancels
        distance = _edge_distance(mask)
        comp_flat = components.ravel()
        depth, deepest_at = kernels.component_argmax(comp_flat, distance, n_components)
        depth = np.maximum(depth, 1e-9)
        min_distance_px = max(1, int(round(cfg.min_distance_um / mpp)))
        centre = maps.centre if maps.centre.flags.c_contiguous else np.ascontiguousarray(maps.centre)
        instances, marker_at = _markers(centre, mask, components, n_components, deepest_at, min_distance_px,
                                        cfg.centre_threshold, cfg.centre_h)
        flat = instances.ravel()
        # a component with one marker is that marker's object; only components with several are flooded
        per_component = np.bincount(comp_flat[marker_at], minlength=n_components + 1)
        owner = np.zeros(n_components + 1, dtype=np.int32)
        single = per_component[comp_flat[marker_at]] == 1
        owner[comp_flat[marker_at[single]]] = flat[marker_at[single]]
        shared = per_component >= 2
        if shared.any():
            work, surface = kernels.flood_inputs(flat, comp_flat, shared, np.ascontiguousarray(maps.boundary).ravel(),
                                                 distance, depth, float(cfg.boundary_weight))
            kernels.flood(work, surface, width)
            np.maximum(flat, work, out=flat)  # work is -1 outside the flooded components
        np.maximum(instances, owner[components], out=instances)

        n = int(instances.max())
        min_area_px = cfg.min_area_um2 / mpp**2
        area = np.bincount(instances.ravel(), minlength=n + 1)
        small = area < min_area_px
        small[0] = False
        if small.any():
            instances[small[instances]] = 0
        if cfg.fill_holes:
            instances = _fill_holes(instances)
    flat = instances.ravel()
    n = int(instances.max()) if instances.size else 0
    p_flat = np.ascontiguousarray(p_nucleus).ravel()
    c_flat = np.ascontiguousarray(maps.centre).ravel()
    area, sy, sx, sp, peak = kernels.label_stats(flat, n, p_flat, c_flat, width)
    drop = np.zeros(n + 1, dtype=bool)
    drop[area == 0] = True
    if cfg.min_nucleus_prob > 0:  # faint: mean nucleus probability below the threshold
        drop |= sp < cfg.min_nucleus_prob * area
    if cfg.min_centre_peak > 0:  # centreless: no centre-map value reaching the threshold
        drop |= peak < cfg.min_centre_peak
    drop[0] = True
    ids = np.flatnonzero(~drop)
    # ids 1..n in raster order of the centroids (row, then column)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy, cx = sy[ids] / area[ids], sx[ids] / area[ids]
    order = np.lexsort((cx, cy))
    ids = ids[order]
    lut = np.zeros(n + 1, dtype=np.uint32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    instances = lut[instances]

    new_area = np.zeros(ids.size + 1, dtype=np.int64)
    new_area[1:] = area[ids]
    gather = np.concatenate([[0], ids])
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = sp[ids] / area[ids]
    type_idx, type_prob = _type_columns(instances.ravel().astype(np.int64), ids.size, maps.types,
                                        new_area[1:])
    table = _table(np.arange(1, ids.size + 1), new_area[1:], sy[gather][1:], sx[gather][1:], prob, type_idx,
                   type_prob, mpp)

    semantic = kernels.semantic_labels(maps.semantic, np.asarray(stuff, dtype=np.int64), instances, nucleus)
    return TileLabels(semantic=semantic, instances=instances, nuclei=table, mpp=float(mpp))


def shape_features(instances: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Shape measurements of the objects ``ids`` of a label image, in pixel units
    (:func:`histopan.kernels.shape_measures`, one pass over the pixels):

    - ``area``: pixel count;
    - ``perimeter``: exposed pixel edges (4-neighbour boundary length) times pi/4, the Crofton-style
      correction that makes a digitised disc's perimeter match 2 pi r (axis-aligned straight edges come out
      about 21 % short; nuclei are round);
    - ``eccentricity``: from the second central moments, as :func:`skimage.measure.regionprops` defines it;
    - ``solidity``: pixel count over the area of the convex hull of the object's pixel squares (<= 1).
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = int(instances.max()) if instances.size else 0
    area_all, sums, edges, hull = kernels.shape_measures(np.ascontiguousarray(instances), n)
    area = area_all[ids].astype(np.float64)
    a = np.maximum(area, 1)
    sy, sx, syy, sxx, sxy = (sums[j, ids] for j in range(5))
    cy, cx = sy / a, sx / a
    mu_yy = syy / a - cy * cy
    mu_xx = sxx / a - cx * cx
    mu_xy = sxy / a - cx * cy
    common = np.sqrt(np.maximum(((mu_yy - mu_xx) / 2) ** 2 + mu_xy**2, 0))
    l1 = (mu_yy + mu_xx) / 2 + common
    l2 = np.maximum((mu_yy + mu_xx) / 2 - common, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
    perimeter = edges[ids] * (np.pi / 4)
    solidity = np.clip(area / np.maximum(np.where(hull[ids] > 0, hull[ids], area), 1e-9), 0, 1)
    return {"area": area, "perimeter": perimeter, "eccentricity": eccentricity, "solidity": solidity}


# ------------------------------------------------------------------------------ tissue rules, tile records
#
# panoptic_labels adds the tissue rules (the glass rule: background outside the tissue region; stuff regions
# below min_stuff_area_um2 absorbed by their neighbours) and an optional crop to postprocess_tile: the one path
# from maps to panoptic labels that `histopan segment` and predict_tile share.  process_tile turns one slide
# tile's maps into its stitching.TileRecord.


def drop_small_objects(instances: np.ndarray, min_area_um2: float, mpp: float) -> np.ndarray:
    """The label image without the objects smaller than ``min_area_um2`` (the post-processing's minimum
    nucleus area), e.g. after cropping a label image; returns ``instances`` itself when none is too small."""
    area = np.bincount(instances.ravel(), minlength=int(instances.max(initial=0)) + 1)
    too_small = area < min_area_um2 / mpp**2
    too_small[0] = False
    if not too_small.any():
        return instances
    return np.where(too_small[instances], 0, instances).astype(instances.dtype)


def background_index(classes: Sequence[Any]) -> int:
    """Index of the stuff class named :data:`BACKGROUND` among ``classes`` (the model's, in channel order)."""
    for i, c in enumerate(classes):
        if c.name == BACKGROUND and c.kind == "stuff":
            return i
    raise ModelError(f"the model has no stuff class named {BACKGROUND!r}, which the glass rule paints",
                     value=[c.name for c in classes], fix="pass the classes of a histopan model (its first class is "
                                                          "'background')")


def tissue_classes(semantic: np.ndarray, classes: Sequence[Any], min_stuff_area_um2: float, mpp: float,
                   tissue: np.ndarray | None = None) -> np.ndarray:
    """The stuff map of semantic probabilities ``(C, H, W)``, the one implementation of the tissue rules that
    ``histopan segment`` and ``predict_tile`` share:

    1. the most probable stuff class per pixel;
    2. the glass rule: with ``tissue`` (bool ``(H, W)``, the tissue region, see
       :func:`histopan.slide.tissue.tissue_region`), every pixel outside it is background;
    3. stuff regions smaller than ``min_stuff_area_um2`` take the class of the nearest larger region
       (:func:`~histopan.panoptic.absorb_small_regions`; regions touching the border are left as they are);
       a patch of glass smaller than that (a pin-hole in the region) would be absorbed like any small region,
       so the glass rule is applied again afterwards: no tissue class is ever painted outside the region.
    """
    _, stuff_ids = _thing_index(classes, semantic.shape[0])
    stuff = stuff_argmax(semantic, np.asarray(stuff_ids, dtype=np.intp))
    if tissue is None:
        return absorb_small_regions(stuff, min_stuff_area_um2, mpp)
    if tissue.shape != stuff.shape:
        raise ValueError(f"the tissue region {tissue.shape} and the maps {stuff.shape} differ in shape")
    glass = ~tissue
    background = background_index(classes)
    stuff[glass] = background
    stuff = absorb_small_regions(stuff, min_stuff_area_um2, mpp)
    stuff[glass] = background
    return stuff


@dataclass(frozen=True)
class PanopticLabels:
    """Panoptic labels of one window (or a crop of it): nucleus instances over the tissue classes.

    ``instances`` (H, W) uint32 nucleus ids (0 = none); ``stuff`` (H, W) uint8 stuff class under everything
    (small regions absorbed, :func:`tissue_classes`); ``nuclei`` the window's nucleus table
    (:data:`NUCLEUS_COLUMNS`, ids as in ``instances``, centroids in window pixels); ``thing`` the nucleus
    class index.
    """

    instances: np.ndarray
    stuff: np.ndarray
    nuclei: pd.DataFrame
    thing: int

    @property
    def semantic(self) -> np.ndarray:
        """The semantic map: the nucleus class where an instance is, the stuff class elsewhere."""
        return fuse(self.stuff, self.instances, self.thing)


def panoptic_labels(maps: ProbabilityMaps, mpp: float, cfg: PostprocessConfig, classes: Sequence[Any],
                    crop: tuple[slice, slice] | None = None, tissue: np.ndarray | None = None) -> PanopticLabels:
    """:func:`postprocess_tile` plus the tissue rules (:func:`tissue_classes`), the one path from maps to
    panoptic labels that ``histopan segment`` (per tile) and ``predict_tile`` share.

    ``crop`` (row and column slices) keeps only that part of the window, e.g. the part inside the slide: the
    nuclei are cut there and what remains of each must still have the minimum area (else slivers along the
    slide border would become nuclei), and the tissue rules run on the crop.  ``tissue`` (bool, the shape of
    the crop) is the tissue region of the glass rule; None: no glass rule.  Nuclei do not depend on it: a
    nucleus over glass is kept, over background stuff.
    """
    labels = postprocess_tile(maps, mpp, cfg, classes)
    instances = labels.instances
    semantic = maps.semantic
    if crop is not None:
        instances = instances[crop]
        semantic = semantic[:, crop[0], crop[1]]
        if instances.shape != labels.instances.shape:
            instances = drop_small_objects(instances, cfg.min_area_um2, mpp)
    stuff = tissue_classes(semantic, classes, cfg.min_stuff_area_um2, mpp, tissue)
    thing, _ = _thing_index(classes, maps.semantic.shape[0])
    return PanopticLabels(instances=instances, stuff=stuff, nuclei=labels.nuclei, thing=thing)


def process_tile(maps: ProbabilityMaps, tile: Tile, grid: TileGrid, model_config: Any, ids: IdScheme,
                 tissue: np.ndarray | None = None) -> TileRecord:
    """Probability maps of one tile's window -> its :class:`~histopan.stitching.TileRecord`: the nuclei it
    owns (:func:`~histopan.stitching.own_objects`), their measurements, and its stuff core.  ``tissue`` (bool,
    the tile's read box) is the tissue region of the glass rule, None for none."""
    labels = panoptic_labels(maps, grid.mpp, model_config.postprocess, model_config.classes,
                             crop=tile.read_in_window, tissue=tissue)
    instances, stuff = labels.instances, labels.stuff
    owned = own_objects(instances, tile.read.as_tuple(), tile.core.as_tuple(), grid.shape, tile.index, ids)
    core_stuff = stuff[tile.core.slices_in(tile.read)]
    if not len(owned):
        return TileRecord.without_nuclei(owned, core_stuff)
    local = owned.local_ids
    shape = shape_features(instances, local)
    rows = labels.nuclei.set_index("id").loc[local.astype(np.uint32)]  # ids of the window = of the read crop
    # majority stuff class under each nucleus (ties to the lower class index)
    lab = instances.ravel().astype(np.int64)
    n_classes = len(model_config.classes)
    fg = lab > 0
    votes = np.bincount(lab[fg] * n_classes + stuff.ravel()[fg], minlength=(int(lab.max()) + 1) * n_classes)
    votes = votes.reshape(-1, n_classes)
    return TileRecord(
        objects=owned, stuff=core_stuff,
        area_px=shape["area"].astype(np.int64),
        perimeter_px=shape["perimeter"],
        eccentricity=shape["eccentricity"],
        solidity=shape["solidity"],
        nucleus_prob=rows["nucleus_prob"].to_numpy(np.float64),
        type=rows["type"].to_numpy(np.int64),
        type_prob=rows["type_prob"].to_numpy(np.float64),
        stuff_class=votes[local].argmax(axis=1).astype(np.int64),
    )
