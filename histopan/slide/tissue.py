"""Tissue detection on a low-resolution view of the slide, and tissue fraction per tile.

:func:`tissue_mask` reads the slide at about 8 micrometres per pixel (from the coarsest suitable pyramid level,
in bounded-memory blocks), finds stained tissue by Otsu's threshold on HSV saturation (clamped to a sane
range, so an all-tissue or all-background view still gives a sensible answer) together with a minimum
optical density, ignores black borders and green/blue pen ink, and cleans the result with a morphological
closing, hole filling (holes: glass enclosed by tissue, not glass at the view's edge) and small-object removal
whose sizes are given in micrometres (or, for a slide without a pixel size, as fractions of the view; in a small
view, such as a tile given to ``predict_tile``, an object is never too small when it covers more than
``small_view_fraction`` of the view).  :func:`tissue_fraction` and :func:`select_tiles` then score tiles given as
level-0 boxes.

:func:`tissue_region` turns a mask into the region where a run may paint tissue classes (the *glass rule*:
every pixel outside it is background), and :func:`select_region_tiles` picks the tiles a run processes so that
no piece of that region is cut by a skipped tile.  The mask is coarse (8 um cells) and its detection favours
stained tissue, so the region is more generous than the mask: glass enclosed by tissue up to
``region_max_hole_um2`` (fat, loose stroma, lumens) is kept, and so is everything within ``margin_um`` of the
mask, measured from a distance field interpolated between the cells, so the region's edge is smooth and the
same wherever a window samples it (:meth:`TissueRegion.sample`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import filters, morphology, segmentation

from histopan.checks import check_mpp
from histopan.errors import ConfigError
from histopan.slide.base import SlideReader

log = logging.getLogger(__name__)

#: without a known pixel size the view's long side is about this many pixels
FALLBACK_LONG_SIDE = 1024
#: the view is never coarser than this many pixels along the slide's short side
MIN_SHORT_SIDE = 32
#: reads are split so the source block of one read is at most this many level pixels per side
_MAX_SOURCE_SIDE = 2048
#: a whole-slide view is read from a pyramid level of at most this many pixels (about 10 s of reading);
#: a larger level (a huge slide without a pyramid) is sampled instead (:func:`sample_thumbnail`)
MAX_SCAN_SOURCE_PX = 2**28
#: the long side of a sampled view, in pixels (one small read per pixel)
SAMPLED_LONG_SIDE = 256
#: level pixels per side of the square averaged into one sampled view pixel
SAMPLE_PATCH = 4
#: a sampled scan logs its progress this often (seconds)
PROGRESS_SECONDS = 5.0


@dataclass(frozen=True)
class TissueParams:
    """Detection settings; areas in square micrometres, lengths in micrometres.

    ``*_fraction`` values replace the micrometre sizes when the slide has no pixel size: they are fractions of
    the view's area (objects/holes) or of its long side (closing radius).  ``margin_um`` and
    ``region_max_hole_um2`` shape the region of the glass rule (:func:`tissue_region`), not the mask.
    """

    sat_threshold_range: tuple[float, float] = (0.05, 0.2)
    min_optical_density: float = 0.05
    black_max: int = 50
    pen_green_margin: int = 10
    close_radius_um: float = 16.0
    min_object_um2: float = 10_000.0
    max_hole_um2: float = 50_000.0
    close_radius_fraction: float = 0.002
    min_object_fraction: float = 1e-4
    max_hole_fraction: float = 1e-3
    small_view_fraction: float = 0.01
    margin_um: float = 8.0
    region_max_hole_um2: float = 1_000_000.0

    def __post_init__(self) -> None:
        for name in ("margin_um", "region_max_hole_um2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ConfigError(f"tissue {name} must be a finite number >= 0", value=value,
                                  fix=f"use e.g. {name}={getattr(TissueParams, name)}")


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask on a regular grid over the whole slide.

    ``mask[i, j]`` covers level-0 pixels ``[j * downsample_xy[0], (j + 1) * downsample_xy[0])`` by
    ``[i * downsample_xy[1], ...)``.  ``downsample`` is the mean level-0 pixels per mask pixel, ``mpp`` the mask's
    micrometres per pixel (None when the slide's is unknown), ``thumbnail`` the RGB view it was computed from.
    """

    mask: np.ndarray
    downsample: float
    downsample_xy: tuple[float, float]
    slide_dimensions: tuple[int, int]
    mpp: float | None = None
    thumbnail: np.ndarray | None = None
    saturation_threshold: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def outline(self) -> np.ndarray:
        """Boolean image of the tissue boundary pixels (inner boundary), same shape as ``mask``."""
        return segmentation.find_boundaries(self.mask, mode="inner")

    def overlay(self, colour: tuple[int, int, int] = (0, 255, 0), thickness: int = 1,
                image: np.ndarray | None = None) -> np.ndarray:
        """``image`` (default: the mask's own thumbnail; white if absent) with the tissue outline in ``colour``.

        ``image`` may be larger than the mask (e.g. a 1024-px slide thumbnail): the mask is scaled to it.
        """
        base = image if image is not None else self.thumbnail
        if base is None:
            base = np.full((*self.shape, 3), 255, np.uint8)
        out = base.copy()
        mask = self.mask
        if mask.shape != out.shape[:2]:
            rows = np.minimum((np.arange(out.shape[0]) * mask.shape[0]) // out.shape[0], mask.shape[0] - 1)
            cols = np.minimum((np.arange(out.shape[1]) * mask.shape[1]) // out.shape[1], mask.shape[1] - 1)
            mask = mask[rows[:, None], cols[None, :]]
        edge = segmentation.find_boundaries(mask, mode="inner")
        if thickness > 1:
            edge = morphology.dilation(edge, morphology.disk(thickness - 1))
        out[edge] = colour
        return out

    def bounding_box(self) -> tuple[float, float, float, float] | None:
        """Level-0 (x, y, w, h) of the box around all tissue, or None when there is none."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0:
            return None
        dx, dy = self.downsample_xy
        return (cols[0] * dx, rows[0] * dy, (cols[-1] + 1 - cols[0]) * dx, (rows[-1] + 1 - rows[0]) * dy)


def _view_downsample(reader: SlideReader, mpp: float) -> tuple[float, float | None]:
    """Target level-0 pixels per view pixel, and the view's mpp (None without slide mpp)."""
    width, height = reader.dimensions
    base = reader.mpp
    if base is not None:
        ds = mpp / base
    else:
        ds = max(width, height) / FALLBACK_LONG_SIDE
        log.info("%s: no pixel size known; detecting tissue at 1/%.1f of full resolution with pixel-based "
                 "settings (pass --mpp for settings in micrometres)", reader.path, ds)
    ds = min(ds, max(1.0, min(width, height) / MIN_SHORT_SIDE))
    ds = max(ds, 1.0)
    return ds, None if base is None else ds * base


def read_thumbnail(reader: SlideReader, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB view of the whole slide at about ``downsample`` level-0 pixels per pixel, read in blocks.

    Returns the image and the exact (x, y) level-0 pixels per view pixel (the view covers the slide exactly).
    The work is bounded: when the pyramid level the view would be read from has more than
    :data:`MAX_SCAN_SOURCE_PX` pixels (a huge slide without a pyramid), the view is sampled instead
    (:func:`sample_thumbnail`), coarser than asked.
    """
    width, height = reader.dimensions
    mw, mh = max(1, round(width / downsample)), max(1, round(height / downsample))
    dx, dy = width / mw, height / mh
    level = reader.best_level(min(dx, dy))
    lw, lh = reader.level_dimensions[level]
    if lw * lh > MAX_SCAN_SOURCE_PX:
        return sample_thumbnail(reader, level, max(mw, mh))
    level_ds = reader.level_downsamples[level]
    block = max(16, int(_MAX_SOURCE_SIDE * level_ds / max(dx, dy)))
    out = np.empty((mh, mw, 3), np.uint8)
    for r0 in range(0, mh, block):
        r1 = min(mh, r0 + block)
        for c0 in range(0, mw, block):
            c1 = min(mw, c0 + block)
            x0, y0 = c0 * dx, r0 * dy
            w = width - x0 if c1 == mw else (c1 - c0) * dx
            h = height - y0 if r1 == mh else (r1 - r0) * dy
            out[r0:r1, c0:c1] = reader.read_region(x0, y0, w, h, out_size=(c1 - c0, r1 - r0))
    return out, (dx, dy)


def sample_thumbnail(reader: SlideReader, level: int, long_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A sampled RGB view of the whole slide, for when reading pyramid level ``level`` whole is too much work.

    The view's long side is ``long_side`` pixels, at most :data:`SAMPLED_LONG_SIDE`; each view pixel is the
    mean of a :data:`SAMPLE_PATCH`-pixel square of ``level`` at the centre of its cell, so the work is at most
    ``SAMPLED_LONG_SIDE ** 2`` small reads whatever the slide's size.  Progress is logged every few seconds.
    Returns the view and the exact (x, y) level-0 pixels per view pixel, as :func:`read_thumbnail` does.
    """
    width, height = reader.dimensions
    lw, lh = reader.level_dimensions[level]
    ds = reader.level_downsamples[level]
    scale = min(long_side, SAMPLED_LONG_SIDE) / max(width, height)
    sw, sh = max(1, round(width * scale)), max(1, round(height * scale))
    dx, dy = width / sw, height / sh
    pw, ph = min(SAMPLE_PATCH, lw), min(SAMPLE_PATCH, lh)
    xs = [min(max(int((c + 0.5) * dx / ds) - pw // 2, 0), lw - pw) for c in range(sw)]
    ys = [min(max(int((r + 0.5) * dy / ds) - ph // 2, 0), lh - ph) for r in range(sh)]
    log.info("%s: level %d has %d x %d pixels (%.1f gigapixels) and no coarser pyramid level; scanning for tissue "
             "on a %d x %d sample of it instead of reading it all", reader.path, level, lw, lh, lw * lh / 1e9, sw, sh)
    out = np.empty((sh, sw, 3), np.uint8)
    started = last = time.monotonic()
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            x0, y0 = x * ds, y * ds  # level-0 box of the patch, clipped (level sizes are rounded)
            patch = reader.read_region(x0, y0, min(pw * ds, width - x0), min(ph * ds, height - y0),
                                       out_size=(pw, ph))
            out[r, c] = np.rint(patch.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            log.info("%s: tissue scan %d %% (%d of %d rows, %.0f s)", reader.path, 100 * (r + 1) // sh, r + 1, sh,
                     now - started)
    return out, (dx, dy)


def detect_tissue(rgb: np.ndarray, mpp: float | None = None,
                  params: TissueParams = TissueParams()) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB uint8 image at ``mpp`` micrometres per pixel (None: pixel-based sizes).

    Returns the boolean mask and the saturation threshold used.
    """
    img = rgb.astype(np.float32)
    mx = img.max(axis=2)
    mn = img.min(axis=2)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    od = -np.log10((img + 1.0) / 256.0).mean(axis=2)
    black = mx < params.black_max
    r, g = img[..., 0], img[..., 1]
    # H&E (haematoxylin purple, eosin pink) has red above green; green and blue marker ink does not.
    pen = g > r + params.pen_green_margin
    usable = ~black
    lo, hi = params.sat_threshold_range
    values = sat[usable]
    if values.size and values.max() > values.min():
        thr = float(filters.threshold_otsu(values))
    else:
        thr = hi
    thr = float(min(max(thr, lo), hi))
    raw = (sat > thr) & (od > params.min_optical_density) & usable & ~pen
    area = raw.size
    if mpp is not None:
        px_area = mpp * mpp
        radius = max(0, round(params.close_radius_um / mpp))
        min_obj = params.min_object_um2 / px_area
        max_hole = params.max_hole_um2 / px_area
    else:
        radius = max(1, round(params.close_radius_fraction * max(raw.shape)))
        min_obj = params.min_object_fraction * area
        max_hole = params.max_hole_fraction * area
    out = raw
    if radius:
        out = morphology.closing(np.pad(out, radius, mode="constant"), morphology.disk(radius))
        out = out[radius:-radius, radius:-radius]
    # a small view (a tile given to predict_tile) keeps its tissue: objects are never "small" when larger
    # than a fraction of the view
    min_obj = min(min_obj, params.small_view_fraction * area)
    out = out | _small_holes(out, max_hole)
    out = morphology.remove_small_objects(out, max_size=int(min_obj))
    out &= ~black
    return out, thr


def _small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """The holes of ``mask`` of at most ``max_area`` pixels: background that no 4-connected path leads to the
    edge of the view from (glass at the edge, however small, is glass: the view may be a region cut out of a
    slide, or an image given to ``predict_tile``)."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    return holes & ~morphology.remove_small_objects(holes, max_size=int(max_area))


def tissue_mask(reader: SlideReader, mpp: float = 8.0, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of the whole slide at about ``mpp`` micrometres per pixel.

    Without a slide pixel size the view's long side is about :data:`FALLBACK_LONG_SIDE` pixels and sizes are
    pixel-based.  The view is read from the coarsest pyramid level at or finer than the target.
    """
    mpp = check_mpp(mpp, path=reader.path, what="tissue mask mpp")
    ds, _ = _view_downsample(reader, mpp)
    rgb, (dx, dy) = read_thumbnail(reader, ds)
    view_mpp = None if reader.mpp is None else reader.mpp * (dx + dy) / 2.0
    mask, thr = detect_tissue(rgb, view_mpp, params)
    result = TissueMask(mask=mask, downsample=(dx + dy) / 2.0, downsample_xy=(dx, dy),
                        slide_dimensions=reader.dimensions, mpp=view_mpp, thumbnail=rgb,
                        saturation_threshold=thr)
    log.debug("%s: tissue mask %s at %.2f level-0 px/px, saturation threshold %.3f, tissue %.1f %%",
              reader.path, mask.shape, result.downsample, thr, 100 * result.fraction)
    return result


def tissue_fraction(mask: TissueMask, boxes_level0: np.ndarray) -> np.ndarray:
    """Fraction of each level-0 box (N, 4: x, y, w, h) covered by tissue, area-exact on the mask grid.

    Parts of a box outside the slide count as background.  Returns float64 (N,) in [0, 1].
    """
    boxes = np.asarray(boxes_level0, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0)
    m = mask.mask.astype(np.float64)
    mh, mw = m.shape
    sat = np.zeros((mh + 1, mw + 1))
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    dx, dy = mask.downsample_xy
    x0 = np.clip(boxes[:, 0] / dx, 0, mw)
    x1 = np.clip((boxes[:, 0] + boxes[:, 2]) / dx, 0, mw)
    y0 = np.clip(boxes[:, 1] / dy, 0, mh)
    y1 = np.clip((boxes[:, 1] + boxes[:, 3]) / dy, 0, mh)

    def integral(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        # The integral of a piecewise-constant image is bilinear within each cell of its summed-area table.
        iu = np.minimum(np.floor(u).astype(np.intp), mw - 1)
        iv = np.minimum(np.floor(v).astype(np.intp), mh - 1)
        fu, fv = u - iu, v - iv
        return (sat[iv, iu] * (1 - fu) * (1 - fv) + sat[iv, iu + 1] * fu * (1 - fv)
                + sat[iv + 1, iu] * (1 - fu) * fv + sat[iv + 1, iu + 1] * fu * fv)

    covered = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    area = (boxes[:, 2] / dx) * (boxes[:, 3] / dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(area > 0, covered / area, 0.0)
    return np.clip(np.round(frac, 12), 0.0, 1.0)  # rounding removes summed-area float noise (~1e-16)


def select_tiles(mask: TissueMask, boxes: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    """Indices (ascending) of the level-0 boxes whose tissue fraction is at least ``min_fraction``."""
    if not (0.0 <= min_fraction <= 1.0) or math.isnan(min_fraction):
        raise ConfigError("the minimum tissue fraction of a tile must be in [0, 1]", value=min_fraction,
                          fix="use e.g. 0.05 (5 % tissue)")
    return np.flatnonzero(tissue_fraction(mask, boxes) >= min_fraction)


# ------------------------------------------------------------------------------------- the glass rule's region

#: the cell codes of a :class:`TissueRegion`: glass, tissue (the detector's mask), glass enclosed by tissue
GLASS, TISSUE, ENCLOSED = 0, 1, 2
#: :meth:`TissueRegion.sample` works through this many rows of points at a time
_SAMPLE_ROWS = 512


@dataclass(frozen=True, eq=False)
class TissueRegion:
    """Where tissue classes may be painted: the tissue mask's cells (``codes`` TISSUE), the glass they enclose
    (ENCLOSED) and every point within ``margin_um`` of those; everything else is glass, where the glass rule
    makes every pixel background.

    ``codes`` is (h, w) uint8 on the mask's grid, ``downsample_xy`` level-0 pixels per cell (x, y) and
    ``base_mpp`` micrometres per level-0 pixel.  ``codes`` may be a lazily read array (a store's zarr array):
    :meth:`sample` reads only the cells near the points it is asked about.
    """

    codes: Any
    downsample_xy: tuple[float, float]
    base_mpp: float
    margin_um: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.codes.shape)  # type: ignore[return-value]

    @property
    def cell_um(self) -> tuple[float, float]:
        """(y, x) size of a cell in micrometres."""
        return self.downsample_xy[1] * self.base_mpp, self.downsample_xy[0] * self.base_mpp

    def area_mm2(self, *codes: int) -> float:
        """Area of the cells with the given codes (all of the region's cells by default), in mm^2."""
        wanted = codes or (TISSUE, ENCLOSED)
        values = np.asarray(self.codes[:])
        sy, sx = self.cell_um
        return float(np.isin(values, wanted).sum()) * sy * sx * 1e-6

    def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Whether each level-0 point ``(ys[i], xs[j])`` lies in the region: bool ``(len(ys), len(xs))``.

        The distance (um) from the centres of the region's cells is interpolated bilinearly between cell
        centres; a point is inside where it is at most ``margin_um`` plus half a cell (with no margin the
        edge runs along the mask's own cell edges).  Distances are capped a cell beyond that limit, so the
        answer at a point depends only on the cells near it: windows that overlap agree pixel for pixel.
        """
        ys = np.asarray(ys, np.float64)
        xs = np.asarray(xs, np.float64)
        out = np.zeros((ys.size, xs.size), bool)
        if out.size == 0:
            return out
        sy, sx = self.cell_um
        limit = self.margin_um + (sy + sx) / 4
        cap = limit + max(sy, sx)
        pad = int(math.ceil(cap / min(sy, sx))) + 1
        (fy, iy0, iy1, r0, r1) = _axis_cells(ys / self.downsample_xy[1] - 0.5, self.shape[0], pad)
        (fx, ix0, ix1, c0, c1) = _axis_cells(xs / self.downsample_xy[0] - 0.5, self.shape[1], pad)
        inside = np.asarray(self.codes[r0:r1, c0:c1]) != GLASS
        if not inside.any():
            return out
        distance = np.minimum(ndimage.distance_transform_edt(~inside, sampling=(sy, sx)), cap).astype(np.float32)
        wy = (fy - iy0).astype(np.float32)[:, None]
        wx = (fx - ix0).astype(np.float32)
        for k in range(0, ys.size, _SAMPLE_ROWS):  # in blocks of rows: bounded memory for large images
            b = slice(k, k + _SAMPLE_ROWS)
            rows = (1 - wy[b]) * distance[iy0[b] - r0] + wy[b] * distance[iy1[b] - r0]
            out[b] = (1 - wx) * rows[:, ix0 - c0] + wx * rows[:, ix1 - c0] <= limit
        return out

    def reaches(self, boxes_level0: np.ndarray) -> np.ndarray:
        """Whether the region may reach into each level-0 box (N, 4: x, y, w, h): bool (N,).  A superset,
        computed on the cells (those of the region, grown by the margin and one cell more), never missing a box
        that :meth:`sample` finds a region pixel in."""
        cells = np.asarray(self.codes[:]) != GLASS
        grow = int(math.ceil(self.margin_um / min(self.cell_um))) + 1
        cells = ndimage.binary_dilation(cells, structure=np.ones((3, 3), bool), iterations=grow)
        dx, dy = self.downsample_xy
        grid = TissueMask(mask=cells, downsample=(dx + dy) / 2, downsample_xy=(dx, dy),
                          slide_dimensions=(round(cells.shape[1] * dx), round(cells.shape[0] * dy)))
        return tissue_fraction(grid, boxes_level0) > 0

    def sample_box(self, x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray:
        """:meth:`sample` at the pixel centres of the box ``(x, y, w, h)`` of a grid of ``downsample`` level-0
        pixels per pixel (a run's target pixels): bool ``(h, w)``."""
        return self.sample((np.arange(y, y + h) + 0.5) * downsample, (np.arange(x, x + w) + 0.5) * downsample)


def _axis_cells(u: np.ndarray, n: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Bilinear interpolation along one axis of ``n`` cells at cell coordinates ``u`` (cell centres at whole
    numbers, clamped at the edges): the clamped coordinates, the two cells each point lies between, and the
    cells ``[lo, hi)`` to read (``pad`` more on each side)."""
    f = np.clip(u, 0, n - 1)
    i0 = np.floor(f).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return f, i0, i1, max(int(i0.min()) - pad, 0), min(int(i1.max()) + 1 + pad, n)


def tissue_region(mask: TissueMask, params: TissueParams = TissueParams()) -> TissueRegion:
    """The region of the glass rule of ``mask`` (see :class:`TissueRegion`): its holes up to
    ``params.region_max_hole_um2`` filled, grown by ``params.margin_um``.  The slide must have a pixel size."""
    if mask.mpp is None:
        raise ConfigError("the glass rule needs the slide's pixel size", value=None,
                          fix="pass --mpp (microns per pixel of the slide)")
    base_mpp = mask.mpp / mask.downsample
    cell_um2 = mask.downsample_xy[0] * mask.downsample_xy[1] * base_mpp**2
    enclosed = _small_holes(mask.mask, params.region_max_hole_um2 / cell_um2)
    codes = np.where(mask.mask, TISSUE, np.where(enclosed, ENCLOSED, GLASS)).astype(np.uint8)
    return TissueRegion(codes=codes, downsample_xy=mask.downsample_xy, base_mpp=base_mpp,
                        margin_um=float(params.margin_um))


def select_region_tiles(mask: TissueMask, region: TissueRegion, grid: Any, min_fraction: float) -> np.ndarray:
    """The tiles of ``grid`` (a :class:`~histopan.tiling.TileGrid`) that a run with the glass rule processes,
    as ascending row-major indices: those with at least ``min_fraction`` tissue (:func:`select_tiles`), and,
    grown from them tile by tile (8 neighbours), every tile whose core holds a pixel of the region.

    So a piece of tissue is processed whole or not at all: wherever the region reaches into a skipped tile, that
    tile has no processed neighbour, and no seam between a painted tile and a skipped one can run over tissue
    (over glass both are background).  Specks of tissue in tiles that hold less than ``min_fraction`` of tissue,
    away from processed tiles, stay skipped.  Which tiles hold region pixels is decided on the mask's cells
    (:meth:`TissueRegion.reaches`) and, for the tiles that only that finds, at the grid's pixel centres.
    """
    shape = (grid.n_rows, grid.n_cols)
    boxes, cores = grid.boxes("core", level0=True), grid.boxes("core", level0=False)
    seeds = np.zeros(len(grid), bool)
    seeds[select_tiles(mask, boxes, min_fraction)] = True
    reached = region.reaches(boxes)
    for index in np.flatnonzero(reached & ~seeds):
        # the cells' answer is a superset; a tile that only it finds is processed only if the region really has
        # a pixel there (else a tile of glass would be read and run for nothing, and might find "nuclei" on dust)
        x, y, w, h = (int(v) for v in cores[index])
        reached[index] = region.sample_box(x, y, w, h, grid.downsample).any()
    grown = ndimage.binary_propagation(seeds.reshape(shape), structure=np.ones((3, 3), bool),
                                       mask=(reached | seeds).reshape(shape))
    return np.flatnonzero(grown.ravel())
