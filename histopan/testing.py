"""Synthetic whole-slide test images with known nucleus ground truth.

:func:`write_test_slide` writes a pyramidal, tiled TIFF that OpenSlide opens, either as a generic tiled
TIFF (``flavour="tiff"``, mpp in the resolution tags) or Aperio-flavoured (``flavour="svs"``: an
``Aperio Image Library`` ImageDescription with ``|MPP = ...|AppMag = ...|`` and a stripped thumbnail),
plus beside it a uint32 nucleus instance label TIFF at level 0 (``<stem>.truth.tif``) and a JSON spec
(``<stem>.json``) from which any region can be re-rendered.  Every level is written tile by tile from a
generator, so memory stays bounded for slides from 1k x 1k up to 100k x 100k pixels.

The content is H&E-like and fully determined by the :class:`SlideSpec` (size, mpp, seed):

- a tissue region (a lobed blob plus a small fragment, with a few lumens) on off-white glass, from a
  smooth low-resolution field that is interpolated per pixel;
- pink eosin stroma with a fibrous texture that is periodic in level-0 coordinates (so tiles agree at
  their borders) and a faint haematoxylin background;
- haematoxylin-purple elliptical nuclei with darker rims, 5-10 um across (set by ``nucleus_um``), placed
  on a global pseudo-random layout: every 16 um cell of the slide hashes ``(seed, cell, slot)`` to its
  candidate nuclei, so any region can be rendered on its own.  A candidate is kept inside tissue with a
  probability that follows a smooth density field, and dropped when its centre is closer than the sum of
  the minor semi-axes to a lower-id candidate; the survivors may still touch or overlap, and where they
  overlap the higher id is on top (in the image and in the labels alike).

Colours follow Beer-Lambert with H and E stain vectors.  Level ``k`` (downsample ``2**k``) is the 2 x 2 mean
of a render at downsample ``2**(k-1)``: level 1 is the 2 x 2 mean of level 0 up to uint8 rounding (before
compression); pyramid levels from downsample 16 on draw nuclei as their expected stain density instead of
one by one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histopan.checks import check_output
from histopan.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Beer-Lambert stain vectors (optical density per unit concentration, R G B), Ruifrok & Johnston.
_H_VEC = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_E_VEC = np.array([0.11, 0.88, 0.45], dtype=np.float32)
_GLASS_OD = np.float32(0.035)  # off-white background, about 247

_CELL_UM = 16.0  # nucleus layout cell
_SLOTS = 4  # candidate nuclei per cell
_P_MAX = 0.6  # keep probability of a candidate at full density
_FIELD_SIZE = 256  # tissue/density field raster, longer side
_TEX = 512  # periodic texture period in level-0 pixels (a power of two)
_MEANFIELD_FROM = 8  # render downsample from which nuclei are drawn as mean stain density

Flavour = Literal["svs", "tiff"]
Compression = Literal["jpeg", "deflate", "lzw"]
_TIFF_COMPRESSION = {"jpeg": "jpeg", "deflate": "zlib", "lzw": "lzw"}


@dataclass(frozen=True)
class SlideSpec:
    """Everything that determines a synthetic slide's pixels and ground truth."""

    width: int
    height: int
    mpp: float = 0.25
    seed: int = 0
    nucleus_um: tuple[float, float] = (5.0, 10.0)
    density: float = 1.0

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 16 <= v <= 200_000:
                raise ConfigError(f"test slide {name} must be a whole number of pixels in 16..200000",
                                  value=v, fix="use e.g. 1024 or 40000")
        if isinstance(self.mpp, bool) or not isinstance(self.mpp, (int, float)) or not (
                math.isfinite(self.mpp) and 0.05 <= self.mpp <= 10):
            raise ConfigError("test slide mpp must be in 0.05..10 microns per pixel", value=self.mpp,
                              fix="use 0.25 (40x) or 0.5 (20x)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63:
            raise ConfigError("seed must be a non-negative whole number", value=self.seed, fix="use seed=0")
        lo, hi = self.nucleus_um
        if not (1.0 <= lo <= hi <= _CELL_UM * 0.75):
            raise ConfigError(f"nucleus diameters must satisfy 1 <= min <= max <= {_CELL_UM * 0.75} um",
                              value=self.nucleus_um, fix="use nucleus_um=(5.0, 10.0)")
        if not 0.0 <= self.density <= 2.0:
            raise ConfigError("nucleus density must be in 0..2", value=self.density, fix="use density=1.0")


@dataclass(frozen=True)
class TestSlide:
    """A written synthetic slide: its files, spec and what was written."""

    __test__ = False  # not a pytest test class

    path: Path
    truth_path: Path | None
    spec_path: Path
    spec: SlideSpec
    flavour: str
    compression: str
    tile: int
    level_dimensions: tuple[tuple[int, int], ...]
    n_nuclei: int

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def height(self) -> int:
        return self.spec.height

    @property
    def mpp(self) -> float:
        return self.spec.mpp


# --------------------------------------------------------------------------------------- random numbers

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, *keys: np.ndarray) -> np.ndarray:
    """Deterministic uniform [0, 1) numbers, one per element of the broadcast ``keys`` (ints >= 0)."""
    with np.errstate(over="ignore"):
        h = _mix64(np.full(np.broadcast_shapes(*(np.shape(k) for k in keys)), np.uint64(seed) ^ np.uint64(0x9E3779B97F4A7C15)))
        for k in keys:
            h = _mix64(h ^ (np.asarray(k).astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


# ------------------------------------------------------------------------------------------- synthesis


class _Synth:
    """Precomputed fields and textures of a :class:`SlideSpec`, and the renderer."""

    def __init__(self, spec: SlideSpec) -> None:
        from scipy import ndimage

        self.spec = spec
        rng = np.random.default_rng([spec.seed, 7])
        W, H = spec.width, spec.height
        # Tissue / density fields on a coarse raster; pixel (i, j) of the raster sits at level-0 (j*s, i*s).
        self.s = max(W, H) / (_FIELD_SIZE - 1)
        gw, gh = int(math.ceil(W / self.s)) + 2, int(math.ceil(H / self.s)) + 2
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
        u, v = xx * self.s / W - 0.5, yy * self.s / H - 0.5
        theta = np.arctan2(v, u)
        ph = rng.uniform(0, 2 * np.pi, 4)
        lobes = 1 + 0.10 * np.sin(3 * theta + ph[0]) + 0.06 * np.sin(5 * theta + ph[1])
        main = 1 - np.hypot(u / 0.36, v / 0.33) / lobes
        fx, fy = rng.uniform(0.78, 0.86), rng.uniform(0.12, 0.2)
        frag = 1 - np.hypot((u + 0.5 - fx) / 0.07, (v + 0.5 - fy) / 0.06)
        noise = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 6, mode="wrap")
        noise /= noise.std() + 1e-12
        field = np.maximum(main, frag) + 0.05 * noise
        for _ in range(4):  # lumens: small holes inside the main blob
            cu, cv = rng.uniform(-0.18, 0.18, 2)
            ru = rng.uniform(0.025, 0.05)
            hole = 1 - np.hypot((u - cu) / ru, (v - cv) / (ru * rng.uniform(0.6, 1.0)))
            field = np.minimum(field, -hole)
        self.field = field.astype(np.float64)
        dens = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 10, mode="wrap")
        dens = (dens - dens.min()) / (np.ptp(dens) + 1e-12)
        self.density = (0.35 + 0.65 * dens) * spec.density  # nucleus keep-probability factor
        self.eosin = 0.75 + 0.5 * (1 - dens)  # paler stroma where nuclei are dense
        # Periodic textures (level-0 pixels, period _TEX): fibrous eosin, blotchy H, fine chromatin.
        n = rng.standard_normal((3, _TEX, _TEX))
        fib = _oriented_noise(n[0], rng.uniform(0, np.pi), 1.2, 9.0)
        fib = _unit(fib) + 0.6 * _unit(ndimage.gaussian_filter(n[1], 24, mode="wrap"))
        blot = ndimage.gaussian_filter(n[1], 4, mode="wrap")
        chrom = ndimage.gaussian_filter(n[2], 1.0, mode="wrap")
        tex = np.stack([_unit(fib), _unit(blot), _unit(chrom)], axis=-1).astype(np.float32)
        self.tex = [tex]  # level j: 2**j x 2**j means
        while self.tex[-1].shape[0] > 1:
            t = self.tex[-1]
            self.tex.append(t.reshape(t.shape[0] // 2, 2, t.shape[1] // 2, 2, 3).mean(axis=(1, 3)))
        self.cell = max(4, int(round(_CELL_UM / spec.mpp)))  # level-0 px
        self.ncx = -(-W // self.cell)
        self.ncy = -(-H // self.cell)
        self.max_id = self.ncx * self.ncy * _SLOTS
        if self.max_id >= 2**32 - 1:
            raise ConfigError("too many nucleus cells for uint32 labels", value=(W, H, spec.mpp),
                              fix="use a coarser mpp or a smaller slide")
        lo, hi = spec.nucleus_um
        self.a_max = hi / 2 / spec.mpp  # largest semi-axis, level-0 px
        dmean = (lo + hi) / 2 / spec.mpp
        # expected nucleus area per cell at density 1 (mean aspect 0.775, ~12% lost to the hard-core rule)
        self.cover_per_cell = _SLOTS * _P_MAX * math.pi * (dmean / 2) ** 2 * 0.775 * 0.88 / self.cell**2

    # -------------------------------------------------------------------------------- fields at pixels
    def _interp(self, grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Separable bilinear interpolation of a raster field at level-0 rows ``ys`` x columns ``xs``."""
        fy = np.clip(ys / self.s, 0, grid.shape[0] - 1.000001)
        fx = np.clip(xs / self.s, 0, grid.shape[1] - 1.000001)
        iy, ix = np.floor(fy).astype(np.intp), np.floor(fx).astype(np.intp)
        wy, wx = (fy - iy)[:, None], (fx - ix)[None, :]
        x0, x1 = ix.min(), ix.max() + 2
        sub = grid[:, x0:x1]
        rows = (1 - wy) * sub[iy] + wy * sub[iy + 1]
        jx = ix - x0
        return (1 - wx) * rows[:, jx] + wx * rows[:, jx + 1]

    def _interp_points(self, grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        fy = np.clip(ys / self.s, 0, grid.shape[0] - 1.000001)
        fx = np.clip(xs / self.s, 0, grid.shape[1] - 1.000001)
        iy, ix = np.floor(fy).astype(np.intp), np.floor(fx).astype(np.intp)
        wy, wx = fy - iy, fx - ix
        return ((1 - wy) * ((1 - wx) * grid[iy, ix] + wx * grid[iy, ix + 1])
                + wy * ((1 - wx) * grid[iy + 1, ix] + wx * grid[iy + 1, ix + 1]))

    # ----------------------------------------------------------------------------------------- nuclei
    def nuclei(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, np.ndarray]:
        """Nuclei whose ellipse may reach the level-0 box ``[x0, x1) x [y0, y1)``, sorted by id.

        Returns arrays ``id`` (uint32), ``x``, ``y`` (centre, level-0 px), ``a``, ``b`` (semi-axes, px),
        ``angle`` (radians, of the major axis from the x axis towards y) and ``stain`` (relative H).
        """
        spec, c = self.spec, self.cell
        m = self.a_max
        # cells whose nuclei may paint into the box, plus neighbours for the hard-core rule
        gx0, gx1 = int(math.floor((x0 - 3 * m) / c)), int(math.floor((x1 + 3 * m) / c)) + 1
        gy0, gy1 = int(math.floor((y0 - 3 * m) / c)), int(math.floor((y1 + 3 * m) / c)) + 1
        gx0, gy0 = max(gx0, 0), max(gy0, 0)
        gx1, gy1 = min(gx1, self.ncx), min(gy1, self.ncy)
        if gx1 <= gx0 or gy1 <= gy0:
            return _empty_nuclei()
        cy, cx, k = np.meshgrid(np.arange(gy0, gy1), np.arange(gx0, gx1), np.arange(_SLOTS), indexing="ij")
        cy, cx, k = cy.ravel(), cx.ravel(), k.ravel()
        ident = ((cy * self.ncx + cx) * _SLOTS + k + 1).astype(np.uint64)
        u = [_uniform(spec.seed, ident, np.uint64(j)) for j in range(7)]
        x = (cx + u[1]) * c
        y = (cy + u[2]) * c
        inside = (x < spec.width) & (y < spec.height)
        lo, hi = spec.nucleus_um
        a = (lo + (hi - lo) * u[3]) / 2 / spec.mpp
        b = a * (0.55 + 0.45 * u[4])
        keep = inside.copy()
        keep[inside] = (self._interp_points(self.field, y[inside], x[inside]) > 0.015)
        keep[keep] &= u[0][keep] < _P_MAX * self._interp_points(self.density, y[keep], x[keep])
        idx = np.flatnonzero(keep)  # candidates, ascending id
        if idx.size > 1:
            # hard core: drop j if a lower-id candidate lies closer than b_i + b_j (neighbour cells only)
            cxi, cyi = cx[idx], cy[idx]
            order = np.lexsort((ident[idx], cxi, cyi))
            dropped = np.zeros(idx.size, dtype=bool)
            key = (cyi - gy0) * (gx1 - gx0) + (cxi - gx0)
            starts = np.searchsorted(key[order], np.arange((gy1 - gy0) * (gx1 - gx0) + 1))
            xs, ys, bs, ids = x[idx], y[idx], b[idx], ident[idx]
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    nb = key + dy * (gx1 - gx0) + dx
                    ok = ((cyi + dy >= gy0) & (cyi + dy < gy1) & (cxi + dx >= gx0) & (cxi + dx < gx1))
                    for slot in range(_SLOTS):
                        pos = np.where(ok, starts[np.clip(nb, 0, len(starts) - 2)] + slot, -1)
                        end = np.where(ok, starts[np.clip(nb, 0, len(starts) - 2) + 1], 0)
                        valid = ok & (pos < end)
                        j = order[np.clip(pos, 0, idx.size - 1)]
                        close = (np.hypot(xs[j] - xs, ys[j] - ys) < bs[j] + bs) & (ids[j] < ids)
                        dropped |= valid & close
            idx = idx[~dropped]
        # only nuclei that can reach the box
        near = ((x[idx] + m >= x0) & (x[idx] - m < x1) & (y[idx] + m >= y0) & (y[idx] - m < y1))
        idx = idx[near]
        return {
            "id": ident[idx].astype(np.uint32), "x": x[idx], "y": y[idx], "a": a[idx], "b": b[idx],
            "angle": u[5][idx] * np.pi, "stain": 0.85 + 0.3 * u[6][idx],
        }

    # ------------------------------------------------------------------------------------------ render
    def render(self, x0: int, y0: int, w: int, h: int, r: int, labels: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 ``(h, w, 3)`` of the region at downsample ``r`` whose top-left pixel is ``(x0, y0)``
        (in downsample-``r`` pixels), and at ``r == 1`` optionally its uint32 nucleus labels.

        ``r >= 2`` is the 2 x 2 mean of a render at ``r // 2``.
        """
        if r == 1:
            return self._render_raw(x0, y0, w, h, 1, labels)
        rgbf = self._render_od(2 * x0, 2 * y0, 2 * w, 2 * h, r // 2)[0]
        rgbf = rgbf.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        return np.clip(np.rint(rgbf), 0, 255).astype(np.uint8), None

    def _render_raw(self, x0: int, y0: int, w: int, h: int, r: int, labels: bool
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        rgbf, lab = self._render_od(x0, y0, w, h, r, labels)
        return np.clip(np.rint(rgbf), 0, 255).astype(np.uint8), lab

    def _render_od(self, x0: int, y0: int, w: int, h: int, r: int, labels: bool = False
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        spec = self.spec
        xs = (x0 + np.arange(w) + 0.5) * r - 0.5  # pixel centres, level-0
        ys = (y0 + np.arange(h) + 0.5) * r - 0.5
        lab = np.zeros((h, w), dtype=np.uint32) if labels else None
        in_x, in_y = xs < spec.width, ys < spec.height
        # tissue field; cheap exit for glass-only regions
        fx0, fx1 = x0 * r, (x0 + w) * r
        fy0, fy1 = y0 * r, (y0 + h) * r
        field = self._interp(self.field, ys, xs)
        tissue = (field > 0) & in_y[:, None] & in_x[None, :]
        if not tissue.any():
            od = np.zeros((h, w, 3), dtype=np.float32) + _GLASS_OD
            return 255.0 * np.exp(-od), lab
        j = int(round(math.log2(r)))
        tex = self.tex[min(j, len(self.tex) - 1)]
        period = tex.shape[0]
        iy = (y0 + np.arange(h)) % period
        ix = (x0 + np.arange(w)) % period
        t = tex[iy[:, None], ix[None, :]]  # (h, w, 3)
        eos = self._interp(self.eosin, ys, xs).astype(np.float32)
        e_conc = eos * (0.30 + 0.28 * t[..., 0])
        h_conc = 0.07 + 0.06 * t[..., 1]
        if r >= _MEANFIELD_FROM:
            cover = (self.cover_per_cell * self._interp(self.density, ys, xs)).astype(np.float32)
            h_conc = h_conc + cover * 0.95
            e_conc = e_conc * (1 - 0.7 * cover)
        else:
            nuc = self.nuclei(fx0 - 0.5 * r, fy0 - 0.5 * r, fx1, fy1)
            if nuc["id"].size:
                self._paint(nuc, xs, ys, r, t[..., 2], h_conc, e_conc, lab)
        tf = tissue.astype(np.float32)[..., None]
        od = _GLASS_OD + tf * (h_conc[..., None] * _H_VEC + e_conc[..., None] * _E_VEC)
        return 255.0 * np.exp(-od), lab

    def _paint(self, nuc: dict[str, np.ndarray], xs: np.ndarray, ys: np.ndarray, r: int, chrom: np.ndarray,
               h_conc: np.ndarray, e_conc: np.ndarray, lab: np.ndarray | None) -> None:
        """Paint nuclei (ascending id, later on top) into the concentration maps and labels in place."""
        h, w = h_conc.shape
        half = int(math.ceil(self.a_max / r)) + 1
        off = np.arange(-half, half + 1)
        # nucleus centre in output-pixel index space
        ci = np.rint((nuc["y"] - ys[0]) / r).astype(np.intp)
        cj = np.rint((nuc["x"] - xs[0]) / r).astype(np.intp)
        pi_ = ci[:, None, None] + off[None, :, None]  # (N, S, 1)
        pj = cj[:, None, None] + off[None, None, :]  # (N, 1, S)
        dy = (ys[0] + pi_ * r) - nuc["y"][:, None, None]
        dx = (xs[0] + pj * r) - nuc["x"][:, None, None]
        ca, sa = np.cos(nuc["angle"])[:, None, None], np.sin(nuc["angle"])[:, None, None]
        q = ((dx * ca + dy * sa) / nuc["a"][:, None, None]) ** 2 + ((dy * ca - dx * sa) / nuc["b"][:, None, None]) ** 2
        inside = (q < 1.0) & (pi_ >= 0) & (pi_ < h) & (pj >= 0) & (pj < w)
        n_idx, _, _ = np.nonzero(inside)
        flat = (np.broadcast_to(pi_, inside.shape) * w + np.broadcast_to(pj, inside.shape))[inside]
        qv = q[inside]
        # later (higher id) nuclei win: numbering in nuc order, keep the last writer per pixel
        owner = np.full(h * w, -1, dtype=np.intp)
        np.maximum.at(owner, flat, n_idx)
        win = owner[flat] == n_idx
        flat, qv, n_idx = flat[win], qv[win], n_idx[win]
        rim = np.clip((qv - 0.55) / 0.45, 0, 1) ** 2
        stain = nuc["stain"][n_idx]
        hv = stain * (0.75 + 0.35 * chrom.ravel()[flat]) * (1.0 + 0.9 * rim)
        h_conc.ravel()[flat] = hv
        e_conc.ravel()[flat] *= 0.35
        if lab is not None:
            lab.ravel()[flat] = nuc["id"][n_idx]


def _oriented_noise(noise: np.ndarray, angle: float, sigma_across: float, sigma_along: float) -> np.ndarray:
    """Periodic noise smoothed by an oriented Gaussian (fibres along ``angle``), via the FFT."""
    n = noise.shape[0]
    f = np.fft.fftfreq(n)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    along = fx * math.cos(angle) + fy * math.sin(angle)
    across = -fx * math.sin(angle) + fy * math.cos(angle)
    kernel = np.exp(-2 * np.pi**2 * ((along * sigma_along) ** 2 + (across * sigma_across) ** 2))
    return np.fft.ifft2(np.fft.fft2(noise) * kernel).real


def _unit(a: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] by the 1st and 99th percentiles."""
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / (hi - lo + 1e-12), 0, 1)


def _empty_nuclei() -> dict[str, np.ndarray]:
    f = np.empty(0)
    return {"id": np.empty(0, np.uint32), "x": f, "y": f, "a": f, "b": f, "angle": f, "stain": f}


# ------------------------------------------------------------------------------------------ public API


def render_region(spec: SlideSpec, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
    """The uncompressed RGB content ``(h, w, 3)`` of pyramid ``level`` at level pixels ``(x, y)``.

    This is what :func:`write_test_slide` compresses into the slide (JPEG adds its loss).
    """
    _check_region(spec, x, y, w, h)
    return _synth(spec).render(int(x), int(y), int(w), int(h), 2**int(level))[0]


def truth_region(spec: SlideSpec | TestSlide, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The uint32 nucleus instance labels (0 = background) of the level-0 box ``(x, y, w, h)``.

    Equal to the same box of the ``.truth.tif`` written beside the slide, for any box (also one sticking
    out of the slide: pixels outside are 0).
    """
    spec = spec.spec if isinstance(spec, TestSlide) else spec
    _check_region(spec, x, y, w, h)
    lab = _synth(spec).render(int(x), int(y), int(w), int(h), 1, labels=True)[1]
    return _crop_outside(lab, spec, int(x), int(y))  # type: ignore[arg-type]


def nuclei_in_region(spec: SlideSpec | TestSlide, x: float, y: float, w: float, h: float
                     ) -> dict[str, np.ndarray]:
    """The nucleus table of every nucleus whose centre lies in the level-0 box ``(x, y, w, h)``.

    Keys: ``id`` (its label value), ``x``, ``y`` (centre, level-0 px), ``a``, ``b`` (semi-axes, px),
    ``angle`` (radians).  A nucleus fully covered by higher-id neighbours has no pixels in the labels
    (rare; the hard-core rule keeps centres apart).
    """
    spec = spec.spec if isinstance(spec, TestSlide) else spec
    nuc = _synth(spec).nuclei(x, y, x + w, y + h)
    sel = (nuc["x"] >= x) & (nuc["x"] < x + w) & (nuc["y"] >= y) & (nuc["y"] < y + h)
    return {k: v[sel] for k, v in nuc.items() if k != "stain"}


def level_dimensions(width: int, height: int, tile: int = 256, levels: int | None = None
                     ) -> tuple[tuple[int, int], ...]:
    """Pyramid level sizes: level ``k`` is ``floor(size / 2**k)``; by default down to a side <= ``tile``."""
    dims = [(width, height)]
    while (levels is None and max(dims[-1]) > tile) or (levels is not None and len(dims) < levels):
        w, h = dims[-1]
        if min(w, h) < 2:
            break
        dims.append((w // 2, h // 2))
    return tuple(dims)


def write_test_slide(
    path: str | PathLike[str],
    width: int,
    height: int,
    *,
    mpp: float = 0.25,
    flavour: Flavour = "svs",
    seed: int = 0,
    tile: int = 256,
    compression: Compression = "jpeg",
    quality: int = 90,
    levels: int | None = None,
    truth: bool = True,
    nucleus_um: tuple[float, float] = (5.0, 10.0),
    density: float = 1.0,
    overwrite: bool = False,
) -> TestSlide:
    """Write a synthetic pyramidal H&E slide, tile by tile, and its ground truth beside it.

    ``flavour="svs"`` writes an Aperio-style file (description ``Aperio Image Library ...`` with
    ``|MPP = <mpp>|AppMag = <round(10 / mpp)>|``, level 0, a stripped thumbnail, then the levels);
    ``flavour="tiff"`` a generic tiled pyramidal TIFF with the mpp in its resolution tags.  Tiles are
    ``tile`` square (a multiple of 16), compressed with ``compression`` (JPEG at ``quality``, deflate or
    LZW).  ``levels`` limits the pyramid (default: halve until the longer side is at most ``tile``).  With
    ``truth`` the level-0 nucleus labels go to ``<stem>.truth.tif`` (uint32, deflate, same tiling).  The
    spec goes to ``<stem>.json``; :func:`load_test_slide` reads it back.  Memory use does not grow with the
    slide size (beyond a bitmap of one byte per possible nucleus id).
    """
    import tifffile

    spec = SlideSpec(width, height, float(mpp), seed, tuple(float(v) for v in nucleus_um), float(density))
    if flavour not in ("svs", "tiff"):
        raise ConfigError("unknown test slide flavour", value=flavour, fix="use 'svs' or 'tiff'")
    if compression not in _TIFF_COMPRESSION:
        raise ConfigError("unknown compression", value=compression, fix="use 'jpeg', 'deflate' or 'lzw'")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile % 16:
        raise ConfigError("TIFF tile size must be a positive multiple of 16", value=tile, fix="use tile=256")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ConfigError("JPEG quality must be in 1..100", value=quality, fix="use quality=90")
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 1):
        raise ConfigError("levels must be a whole number >= 1", value=levels, fix="leave levels=None")
    path = Path(path)
    stem = path.with_suffix("")
    truth_path = stem.with_name(stem.name + ".truth.tif") if truth else None
    spec_path = stem.with_name(stem.name + ".json")
    for p in (path, truth_path, spec_path):
        if p is not None:
            check_output(p, overwrite=overwrite)

    synth = _synth(spec)
    dims = level_dimensions(width, height, tile, levels)
    mag = 10.0 / spec.mpp
    comp = _TIFF_COMPRESSION[compression]
    comp_args = {"level": quality} if compression == "jpeg" else None
    bigtiff = width * height * 3 * 1.4 > 2**31 or (truth and width * height * 4 > 2**31)
    res = (1e4 / spec.mpp, 1e4 / spec.mpp)
    w0, h0 = dims[0]
    seen = np.zeros(synth.max_id + 1, dtype=bool)
    label_q: queue.Queue[Any] = queue.Queue(maxsize=16)
    truth_error: list[BaseException] = []

    def level0_tiles() -> Iterator[np.ndarray]:
        for ty in range(0, h0, tile):
            for tx in range(0, w0, tile):
                rgb, lab = synth.render(tx, ty, tile, tile, 1, labels=truth)
                if lab is not None:
                    lab = _crop_outside(lab, spec, tx, ty)
                    seen[lab.ravel()] = True
                    _put(label_q, lab, lambda: bool(truth_error))
                yield rgb

    def level_tiles(k: int) -> Iterator[np.ndarray]:
        wk, hk = dims[k]
        for ty in range(0, hk, tile):
            for tx in range(0, wk, tile):
                yield synth.render(tx, ty, tile, tile, 2**k)[0]

    def write_truth() -> None:
        try:
            with tifffile.TiffWriter(truth_path, bigtiff=bigtiff) as tt:
                tt.write(data=_drain(label_q, _n_tiles(w0, h0, tile)), shape=(h0, w0), dtype=np.uint32,
                         tile=(tile, tile), compression="zlib", photometric="minisblack",
                         resolution=res, resolutionunit="CENTIMETER", metadata=None,
                         description=f"histopan synthetic nucleus labels for {path.name}")
        except BaseException as exc:  # handed to the main thread and re-raised there
            truth_error.append(exc)
            raise

    def desc(kind: str, wk: int = 0, hk: int = 0) -> str:
        head = f"Aperio Image Library v12.0.16 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
        props = (f"|MPP = {spec.mpp:g}|AppMag = {mag:g}|Filename = {stem.name}|ScanScope ID = histopan"
                 f"|Title = histopan synthetic H&E seed {spec.seed}")
        if kind == "level0":
            return f"{head} {compression.upper()} Q={quality}{props}"
        if kind == "thumb":
            return f"Aperio Image Library v12.0.16 \r\n{w0}x{h0} -> {wk}x{hk} - {props}"
        return f"{head} -> {wk}x{hk} {compression.upper()} Q={quality}{props}"

    common = dict(photometric="rgb", compression=comp, compressionargs=comp_args, metadata=None,
                  software=False, resolution=res, resolutionunit="CENTIMETER")
    log.info("writing %s (%d x %d, %d levels, %s)", path, w0, h0, len(dims), flavour)
    thread = None
    if truth:
        thread = threading.Thread(target=write_truth, name="histopan-truth-writer", daemon=True)
        thread.start()
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
            tw.write(data=level0_tiles(), shape=(h0, w0, 3), dtype=np.uint8, tile=(tile, tile),
                     subfiletype=0, description=desc("level0") if flavour == "svs" else None, **common)
            if flavour == "svs":
                tdims = _thumbnail_dims(w0, h0)
                thumb = np.empty((tdims[1], tdims[0], 3), dtype=np.uint8)
                for y in range(0, tdims[1], tile):  # block by block, to keep the working memory small
                    for x in range(0, tdims[0], tile):
                        bw, bh = min(tile, tdims[0] - x), min(tile, tdims[1] - y)
                        thumb[y:y + bh, x:x + bw] = synth.render(x, y, bw, bh, 2 ** tdims[2])[0]
                tw.write(thumb, photometric="rgb", compression=comp, compressionargs=comp_args,
                         metadata=None, software=False, rowsperstrip=16, subfiletype=0,
                         description=desc("thumb", tdims[0], tdims[1]))
            for k in range(1, len(dims)):
                wk, hk = dims[k]
                tw.write(data=level_tiles(k), shape=(hk, wk, 3), dtype=np.uint8, tile=(tile, tile),
                         subfiletype=1, description=desc("level", wk, hk) if flavour == "svs" else None,
                         **common)
    except BaseException:
        if thread is not None:
            truth_error.append(RuntimeError("image writer failed"))
            _put(label_q, None, lambda: not thread.is_alive())
            thread.join()
        raise
    if thread is not None:
        thread.join()
        if truth_error:
            raise truth_error[0]
    seen[0] = False
    result = TestSlide(path=path, truth_path=truth_path, spec_path=spec_path, spec=spec, flavour=flavour,
                       compression=compression, tile=tile, level_dimensions=dims,
                       n_nuclei=int(seen.sum()) if truth else -1)
    spec_path.write_text(json.dumps({
        "format": "histopan-test-slide", "version": FORMAT_VERSION, "spec": dataclasses.asdict(spec),
        "image": path.name, "truth": truth_path.name if truth_path else None, "flavour": flavour,
        "compression": compression, "tile": tile, "level_dimensions": dims, "n_nuclei": result.n_nuclei,
    }, indent=2), encoding="utf-8")
    return result


def load_test_slide(path: str | PathLike[str]) -> TestSlide:
    """Read back what :func:`write_test_slide` wrote, from the slide path or its ``.json`` spec."""
    p = Path(path)
    spec_path = p if p.suffix == ".json" else p.with_suffix("").with_name(p.with_suffix("").name + ".json")
    if not spec_path.is_file():
        raise DataError("no test-slide spec beside this file", path=spec_path,
                        fix="write the slide with histopan.testing.write_test_slide")
    try:
        d = json.loads(spec_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not a valid test-slide spec: {exc}", path=spec_path, fix="rewrite the slide") from exc
    if not isinstance(d, dict) or d.get("format") != "histopan-test-slide" or d.get("version") != FORMAT_VERSION:
        raise DataError("not a histopan test-slide spec of this version", path=spec_path,
                        value=d.get("version") if isinstance(d, dict) else None, fix="rewrite the slide")
    s = d["spec"]
    spec = SlideSpec(int(s["width"]), int(s["height"]), float(s["mpp"]), int(s["seed"]),
                     tuple(float(v) for v in s["nucleus_um"]), float(s["density"]))
    folder = spec_path.parent
    return TestSlide(path=folder / d["image"], truth_path=folder / d["truth"] if d["truth"] else None,
                     spec_path=spec_path, spec=spec, flavour=d["flavour"], compression=d["compression"],
                     tile=int(d["tile"]), level_dimensions=tuple(tuple(v) for v in d["level_dimensions"]),
                     n_nuclei=int(d["n_nuclei"]))


# ---------------------------------------------------------------------------------------------- helpers

_SYNTH_CACHE: dict[SlideSpec, _Synth] = {}
_SYNTH_LOCK = threading.Lock()


def _synth(spec: SlideSpec) -> _Synth:
    with _SYNTH_LOCK:
        s = _SYNTH_CACHE.get(spec)
        if s is None:
            if len(_SYNTH_CACHE) >= 8:
                _SYNTH_CACHE.pop(next(iter(_SYNTH_CACHE)))
            s = _SYNTH_CACHE[spec] = _Synth(spec)
        return s


def _check_region(spec: SlideSpec, x: int, y: int, w: int, h: int) -> None:
    for name, v in (("x", x), ("y", y), ("w", w), ("h", h)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"region {name} must be a whole number of pixels", value=v, fix="pass ints")
    if w < 1 or h < 1 or x < 0 or y < 0:
        raise ConfigError("region must have x, y >= 0 and w, h >= 1", value=(x, y, w, h),
                          fix="pass a box inside the slide")


def _crop_outside(lab: np.ndarray, spec: SlideSpec, x0: int, y0: int) -> np.ndarray:
    """Zero the labels of pixels outside the slide (level-0 box origin ``(x0, y0)``)."""
    h, w = lab.shape
    if x0 + w > spec.width:
        lab[:, max(spec.width - x0, 0):] = 0
    if y0 + h > spec.height:
        lab[max(spec.height - y0, 0):, :] = 0
    return lab


def _thumbnail_dims(w0: int, h0: int) -> tuple[int, int, int]:
    k = 0
    while max(w0, h0) / 2**k > 1024:
        k += 1
    return max(1, w0 // 2**k), max(1, h0 // 2**k), k


def _n_tiles(w: int, h: int, tile: int) -> int:
    return (-(-w // tile)) * (-(-h // tile))


def _put(q: queue.Queue[Any], item: Any, give_up: Any) -> None:
    while True:
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            if give_up():
                raise RuntimeError("the ground-truth writer stopped") from None


def _drain(q: queue.Queue[Any], n: int) -> Iterator[np.ndarray]:
    for _ in range(n):
        item = q.get()
        if item is None:
            raise RuntimeError("the slide writer stopped before the ground truth was complete")
        yield item
