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
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from histopan.checks import check_mpp
from histopan.errors import ModelError

__all__ = ["NUCLEUS_COLUMNS", "PostprocessConfig", "ProbabilityMaps", "TileLabels", "nucleus_table",
           "postprocess_tile"]


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


def _markers(centre: np.ndarray, mask: np.ndarray, components: np.ndarray, n_components: int,
             distance: np.ndarray, min_distance_px: int, threshold: float, h: float = 0.0) -> np.ndarray:
    """Marker image: centre-map peaks inside the mask, plus one marker per mask component without a peak.

    A peak is a mask pixel above ``threshold`` that is the maximum of the (masked) centre map within
    ``min_distance_px`` (Chebyshev) and, with ``h`` > 0, lies in an h-maximum of its mask component's map
    (a dome at least ``h`` high, :func:`_h_peaks`); a flat top gives one marker.
    """
    masked = np.where(mask, centre, -np.inf).astype(np.float32)
    size = 2 * min_distance_px + 1
    peak = mask & (masked >= threshold) & (masked == ndi.maximum_filter(masked, size=size, mode="nearest"))
    if h > 0:
        peak = _h_peaks(peak, centre, components, h)
    markers = np.zeros(mask.shape, dtype=np.int32)
    plateaus, n_peaks = ndi.label(peak, structure=np.ones((3, 3), bool))
    if n_peaks:
        # one marker per flat top: its first pixel in raster order
        flat = plateaus.ravel()
        idx = np.flatnonzero(flat)
        first = idx[np.unique(flat[idx], return_index=True)[1]]
        markers.ravel()[first] = np.arange(1, n_peaks + 1)
    has_peak = np.zeros(n_components + 1, dtype=bool)
    has_peak[components[markers > 0]] = True
    missing = np.flatnonzero(~has_peak[1:]) + 1
    if len(missing):
        deepest = ndi.maximum_position(distance, labels=components, index=missing)
        start = n_peaks + 1
        for k, (r, c) in enumerate(deepest):
            markers[r, c] = start + k
    return markers


def _h_peaks(peak: np.ndarray, centre: np.ndarray, components: np.ndarray, h: float) -> np.ndarray:
    """The peaks that lie in an h-maximum of their mask component's centre map (the mask's edge counting as
    0): a peak of value v is kept when no higher pixel can be reached from it without going below v - h.

    A lone peak is its component's highest point and needs only v >= h.  In a component with several peaks
    each one is checked by labelling the component's pixels above v - h on the component's bounding box, so
    the cost follows the crowded nuclei, not the tile.
    """
    peak = peak & (centre >= h)
    labels = components[peak]
    counts = np.bincount(labels, minlength=int(components.max()) + 1)
    crowded = np.flatnonzero(counts >= 2)
    if not len(crowded):
        return peak
    keep = peak.copy()
    boxes = ndi.find_objects(components)
    eight = np.ones((3, 3), bool)
    for k in crowded:
        box = boxes[k - 1]
        inside = components[box] == k
        values = np.where(inside, centre[box], -np.inf)
        top = values.max()
        rows, cols = np.nonzero(peak[box] & inside)
        for r, c in zip(rows, cols):
            v = values[r, c]
            if v >= top:
                continue
            above, _ = ndi.label(values > v - h, structure=eight)
            if values[above == above[r, c]].max() > v:  # a higher pixel within reach: not a centre
                keep[box][r, c] = False
    return keep


def _fill_holes(instances: np.ndarray) -> np.ndarray:
    """Fill background pockets that are enclosed by a single instance (vectorised over all instances)."""
    fg = instances > 0
    holes = ndi.binary_fill_holes(fg) & ~fg
    if not holes.any():
        return instances
    hole_ids, n_holes = ndi.label(holes)
    padded = np.pad(instances, 1)
    pairs = []
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        at = (hole_ids > 0) & (shifted > 0)
        pairs.append(np.stack([hole_ids[at], shifted[at].astype(np.int64)], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    n_neighbours = np.bincount(pairs[:, 0], minlength=n_holes + 1)
    fill = np.zeros(n_holes + 1, dtype=instances.dtype)
    single = pairs[n_neighbours[pairs[:, 0]] == 1]
    fill[single[:, 0]] = single[:, 1]
    out = instances.copy()
    out[holes] = fill[hole_ids[holes]]
    return out


def _drop_faint(instances: np.ndarray, p_nucleus: np.ndarray, min_prob: float) -> None:
    """Remove, in place, the objects whose mean ``p_nucleus`` over their pixels is below ``min_prob``."""
    flat = instances.ravel()
    area = np.bincount(flat)
    faint = np.bincount(flat, weights=p_nucleus.ravel(), minlength=area.size) < min_prob * area
    faint[0] = False
    instances[faint[instances]] = 0


def _drop_centreless(instances: np.ndarray, centre: np.ndarray, min_peak: float) -> None:
    """Remove, in place, the objects whose highest ``centre`` value over their pixels is below ``min_peak``."""
    n = int(instances.max())
    drop = np.zeros(n + 1, dtype=bool)
    drop[1:] = ndi.maximum(centre, labels=instances, index=np.arange(1, n + 1)) < min_peak
    instances[drop[instances]] = 0


def _relabel_raster(instances: np.ndarray) -> np.ndarray:
    """Renumber labels 1..n in raster order of their centroids (row, then column); 0 stays 0."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if not len(ids):
        return np.zeros(instances.shape, dtype=np.uint32)
    centroids = np.asarray(ndi.center_of_mass(np.ones(instances.shape), instances, ids)).reshape(-1, 2)
    order = np.lexsort((centroids[:, 1], centroids[:, 0]))
    lut = np.zeros(int(instances.max()) + 1, dtype=np.uint32)
    lut[ids[order]] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lut[instances]


def nucleus_table(instances: np.ndarray, mpp: float, nucleus_prob: np.ndarray | None = None,
                  types: np.ndarray | None = None) -> pd.DataFrame:
    """Per-instance measurements (:data:`NUCLEUS_COLUMNS`) of a label image with ids 1..n.

    ``nucleus_prob`` (H, W) gives the ``nucleus_prob`` column (NaN without it); ``types`` (K, H, W)
    gives each nucleus's majority type (most pixels whose most probable type it is; ties go to the lower
    index) and the mean probability of that type over the nucleus.
    """
    n = int(instances.max()) if instances.size else 0
    flat = instances.ravel().astype(np.int64)
    area = np.bincount(flat, minlength=n + 1)[1:]
    present = np.flatnonzero(area) + 1
    rows, cols = np.indices(instances.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)[1:] / area
        cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)[1:] / area
        if nucleus_prob is not None:
            prob = np.bincount(flat, weights=nucleus_prob.ravel(), minlength=n + 1)[1:] / area
        else:
            prob = np.full(n, np.nan)
        if types is not None and n:
            k = types.shape[0]
            winner = np.argmax(types, axis=0).ravel()
            votes = np.zeros((n + 1, k), dtype=np.int64)
            np.add.at(votes, (flat, winner), 1)
            type_idx = np.argmax(votes[1:], axis=1)
            sums = np.stack([np.bincount(flat, weights=types[j].ravel(), minlength=n + 1)[1:]
                             for j in range(k)], axis=1)
            type_prob = sums[np.arange(n), type_idx] / area
        else:
            type_idx = np.full(n, -1, dtype=np.int64)
            type_prob = np.full(n, np.nan)
    sel = present - 1
    return pd.DataFrame({
        "id": present.astype(np.uint32),
        "centroid_y": cy[sel],
        "centroid_x": cx[sel],
        "area_px": area[sel].astype(np.int64),
        "area_um2": area[sel] * float(mpp) ** 2,
        "nucleus_prob": prob[sel],
        "type": type_idx[sel].astype(np.int64),
        "type_prob": type_prob[sel],
    }, columns=list(NUCLEUS_COLUMNS))


def postprocess_tile(maps: ProbabilityMaps, mpp: float, cfg: PostprocessConfig,
                     classes: Sequence[Any]) -> TileLabels:
    """Probability maps of one tile at ``mpp`` microns per pixel -> :class:`TileLabels`.

    ``classes`` are the model's class specs (anything with a ``kind`` of ``"stuff"`` or ``"thing"``) in
    channel order.  See the module docstring for the steps; every size is converted from microns with
    ``mpp``, so the same tissue at 0.25 and 0.5 um/px gives the same objects.
    """
    check_mpp(mpp, fix="pass the tile's resolution, e.g. mpp=0.5")
    nucleus, stuff = _thing_index(classes, maps.semantic.shape[0])
    p_nucleus = maps.semantic[nucleus]
    mask = p_nucleus > cfg.nucleus_threshold
    components, n_components = ndi.label(mask)

    instances = np.zeros(mask.shape, dtype=np.int32)
    if n_components:
        distance = ndi.distance_transform_edt(mask, sampling=mpp)
        deepest = ndi.maximum(distance, labels=components, index=np.arange(1, n_components + 1))
        depth = np.concatenate([[1.0], np.maximum(deepest, 1e-9)])[components]
        surface = (cfg.boundary_weight * maps.boundary.astype(np.float64)
                   + (1.0 - cfg.boundary_weight) * (1.0 - distance / depth))
        min_distance_px = max(1, int(round(cfg.min_distance_um / mpp)))
        markers = _markers(maps.centre, mask, components, n_components, distance, min_distance_px,
                           cfg.centre_threshold, cfg.centre_h)
        instances = watershed(surface, markers, mask=mask)

        min_area_px = cfg.min_area_um2 / mpp**2
        area = np.bincount(instances.ravel())
        small = area < min_area_px
        small[0] = False
        instances[small[instances]] = 0
        if cfg.fill_holes:
            instances = _fill_holes(instances)
        if cfg.min_nucleus_prob > 0:
            _drop_faint(instances, p_nucleus, cfg.min_nucleus_prob)
        if cfg.min_centre_peak > 0:
            _drop_centreless(instances, maps.centre, cfg.min_centre_peak)
    instances = _relabel_raster(instances)

    stuff_argmax = np.asarray(stuff, dtype=np.uint8)[np.argmax(maps.semantic[stuff], axis=0)]
    semantic = np.where(instances > 0, np.uint8(nucleus), stuff_argmax).astype(np.uint8)
    table = nucleus_table(instances, mpp, p_nucleus, maps.types)
    return TileLabels(semantic=semantic, instances=instances, nuclei=table, mpp=float(mpp))


def shape_features(instances: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised shape measurements of the objects ``ids`` of a label image, in pixel units.

    - ``area``: pixel count;
    - ``perimeter``: exposed pixel edges (4-neighbour boundary length) times pi/4, the Crofton-style
      correction that makes a digitised disc's perimeter match 2 pi r (axis-aligned straight edges come out
      about 21 % short; nuclei are round);
    - ``eccentricity``: from the second central moments, as :func:`skimage.measure.regionprops` defines it;
    - ``solidity``: pixel count over the area of the convex hull of the object's pixel squares (<= 1).
    """
    from scipy.spatial import ConvexHull, QhullError

    ids = np.asarray(ids, dtype=np.int64)
    n_lab = int(instances.max()) + 1 if instances.size else 1
    flat = instances.ravel().astype(np.int64)
    rows, cols = np.indices(instances.shape, dtype=np.float64)
    area = np.bincount(flat, minlength=n_lab).astype(np.float64)
    sy = np.bincount(flat, rows.ravel(), minlength=n_lab)
    sx = np.bincount(flat, cols.ravel(), minlength=n_lab)
    syy = np.bincount(flat, (rows * rows).ravel(), minlength=n_lab)
    sxx = np.bincount(flat, (cols * cols).ravel(), minlength=n_lab)
    sxy = np.bincount(flat, (rows * cols).ravel(), minlength=n_lab)
    a = np.maximum(area[ids], 1)
    cy, cx = sy[ids] / a, sx[ids] / a
    mu_yy = syy[ids] / a - cy * cy
    mu_xx = sxx[ids] / a - cx * cx
    mu_xy = sxy[ids] / a - cx * cy
    common = np.sqrt(np.maximum(((mu_yy - mu_xx) / 2) ** 2 + mu_xy**2, 0))
    l1 = (mu_yy + mu_xx) / 2 + common
    l2 = np.maximum((mu_yy + mu_xx) / 2 - common, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)

    padded = np.pad(instances, 1)
    edges = np.zeros(n_lab, np.int64)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        exposed = (instances != shifted) & (instances > 0)
        edges += np.bincount(instances[exposed].astype(np.int64), minlength=n_lab)
    perimeter = edges[ids] * (np.pi / 4)

    # convex hull of the corners of each object's boundary pixels
    boundary = (instances > 0) & (
        (instances != padded[:-2, 1:-1]) | (instances != padded[2:, 1:-1])
        | (instances != padded[1:-1, :-2]) | (instances != padded[1:-1, 2:]))
    by, bx = np.nonzero(boundary)
    blab = instances[by, bx].astype(np.int64)
    order = np.argsort(blab, kind="stable")
    by, bx, blab = by[order], bx[order], blab[order]
    starts = np.searchsorted(blab, ids, side="left")
    stops = np.searchsorted(blab, ids, side="right")
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float64)
    hull_area = np.empty(ids.size)
    for k, (s, e) in enumerate(zip(starts, stops)):
        pts = (np.stack([by[s:e], bx[s:e]], axis=1)[:, None, :] + corners[None]).reshape(-1, 2)
        try:
            hull_area[k] = ConvexHull(pts).volume  # 2-D "volume" is the area
        except (QhullError, ValueError):
            hull_area[k] = area[ids[k]]
    solidity = np.clip(area[ids] / np.maximum(hull_area, 1e-9), 0, 1)
    return {"area": area[ids], "perimeter": perimeter, "eccentricity": eccentricity, "solidity": solidity}
