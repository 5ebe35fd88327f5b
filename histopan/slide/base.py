"""The slide reader interface shared by every backend.

A backend subclasses :class:`SlideReader`, fills in the metadata attributes in its ``__init__`` and implements
one raw read, :meth:`SlideReader._read_level` (level pixels, RGB uint8, alpha composited on white).  Everything
else lives here: region checks, choosing the pyramid level for a target resolution, anti-aliased
resampling, the slide identity and pickling.

Coordinates in the public API are level-0 pixels.  Resampling is seam-free: two reads whose level-0 origins
lie on the same target pixel grid (multiples of the target downsample) give identical values for the pixels
they share, because each output pixel is computed only from source pixels that both reads load (a margin
wider than the filter is read and cropped off) with the same weights.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import sparse

from histopan.checks import MPP_FIX, check_mpp
from histopan.errors import MppError, RegionError, SlideError

log = logging.getLogger(__name__)

#: metadata mpp outside this range (micrometres per pixel) is treated as missing, e.g. a 72 dpi default
#: resolution tag (352.8 um/px) written by software that knows nothing about the microscope.
PLAUSIBLE_MPP = (0.01, 100.0)
#: a pyramid level whose downsample exceeds the target downsample by less than this relative amount is
#: still used (Aperio levels have downsamples such as 4.0005 for a nominal 4).
LEVEL_TOLERANCE = 0.01
_HEADER_BYTES = 1 << 16
_INTEGRAL_EPS = 1e-6
#: ``segment`` refuses a slide of more pixels than this (about 65,000 x 65,000) without a downsampled pyramid
#: level (see :meth:`SlideReader.require_segmentable`)
MAX_UNPYRAMIDED_PX = 2**32
#: Gaussian prefilter sigmas below this (in source pixels) are skipped: the filter would change nothing.
_MIN_SIGMA = 0.05
_TRUNCATE = 4.0


def plausible_mpp(mpp_xy: tuple[float | None, float | None] | None, *, path: Path,
                  source: str) -> tuple[float, float] | None:
    """(x, y) micrometres per pixel if plausible for a microscope, else None (logged).

    One missing axis takes the other's value.
    """
    if mpp_xy is None:
        return None
    mx, my = mpp_xy
    mx = mx if mx is not None else my
    my = my if my is not None else mx
    if mx is None or my is None:
        return None
    lo, hi = PLAUSIBLE_MPP
    if not all(math.isfinite(v) and lo <= v <= hi for v in (mx, my)):
        log.warning("%s: ignoring implausible pixel size %.4g x %.4g um/px from %s (expected %g..%g um/px); "
                    "pass --mpp to set it", path, mx, my, source, lo, hi)
        return None
    return (float(mx), float(my))


class LazyImages(Mapping[str, np.ndarray]):
    """A read-only mapping of associated image names to RGB uint8 arrays, each read on first access."""

    def __init__(self, names: list[str], load: Callable[[str], np.ndarray]) -> None:
        self._names = list(names)
        self._load = load
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        with self._lock:
            if name not in self._cache:
                self._cache[name] = self._load(name)
            return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LazyImages({self._names!r})"


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA uint8 on white; returns a new C-contiguous RGB array."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class _Axis:
    """Sampling plan along one axis: the source window [lo, hi) and a sparse weight matrix.

    Row k of ``matrix`` holds the weights of output pixel k over the window: a Gaussian prefilter (when
    shrinking) composed with linear interpolation at the pixel's centre, with source indices clamped at the
    slide border.  The weights depend only on the output pixel's position, so reads on a common grid agree.
    """

    __slots__ = ("lo", "hi", "matrix")

    def __init__(self, origin0: float, n: int, step0: float, ds: float, size: int) -> None:
        # Output pixel k covers level-0 [origin0 + k*step0, origin0 + (k+1)*step0); its centre in level
        # coordinates, with level pixel centres at integers, is u_k.  On a common grid (origin0 a multiple of
        # step0) centres are computed from the global index so every read gets bit-identical positions.
        g = origin0 / step0
        gi = round(g)
        k = np.arange(n, dtype=np.float64)
        if abs(g - gi) < _INTEGRAL_EPS:
            centres0 = (gi + k + 0.5) * step0
        else:
            centres0 = origin0 + (k + 0.5) * step0
        u = centres0 / ds - 0.5
        factor = step0 / ds
        sigma = (factor - 1.0) / 2.0 if factor > 1.0 else 0.0
        sigma = sigma if sigma >= _MIN_SIGMA else 0.0
        radius = int(_TRUNCATE * sigma + 0.5) if sigma else 0
        taps = np.arange(-radius, radius + 1)
        if sigma:
            kernel = np.exp(-0.5 * (taps / sigma) ** 2)
            kernel /= kernel.sum()
        else:
            kernel = np.ones(1)
        base = np.floor(u)
        frac = np.where(u < 0, 0.0, u - base)
        i0 = np.clip(base, 0, size - 1).astype(np.intp)
        i1 = np.clip(base + 1, 0, size - 1).astype(np.intp)
        lo = max(int(i0[0]) - radius, 0)
        hi = min(int(i1[-1]) + radius + 1, size)
        cols = np.concatenate([i0[:, None] + taps, i1[:, None] + taps], axis=1)
        cols = np.clip(cols, 0, size - 1) - lo
        vals = np.concatenate([(1.0 - frac)[:, None] * kernel, frac[:, None] * kernel], axis=1)
        rows = np.repeat(np.arange(n), cols.shape[1])
        self.matrix = sparse.csr_matrix((vals.ravel().astype(np.float32), (rows, cols.ravel())),
                                        shape=(n, hi - lo))
        self.matrix.sum_duplicates()
        self.lo, self.hi = lo, hi


class SlideReader(abc.ABC):
    """A whole-slide image opened for reading.

    Backends set, in ``__init__``: ``_level_dimensions`` (tuple of (w, h)), ``_level_downsamples`` (tuple of
    float), ``_mpp_xy`` (metadata (x, y) micrometres per pixel or None), ``_objective_power``, ``_vendor``,
    ``_properties`` (dict of str) and ``_associated`` (a :class:`LazyImages`), and implement
    :meth:`_read_level`.  Readers are safe to share between threads and pickle as (class, path, mpp override).
    """

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self._path = Path(path)
        self._mpp_override = None if mpp is None else check_mpp(mpp, path=self._path, what="--mpp")
        self._level_dimensions: tuple[tuple[int, int], ...] = ()
        self._level_downsamples: tuple[float, ...] = ()
        self._mpp_xy: tuple[float, float] | None = None
        self._objective_power: float | None = None
        self._vendor: str | None = None
        self._properties: dict[str, str] = {}
        self._associated: LazyImages = LazyImages([], lambda name: np.zeros((0, 0, 3), np.uint8))
        self._identity: str | None = None
        self._greyscale = False

    # ------------------------------------------------------------------------------------ backend hooks

    @abc.abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of level pixels [x, x+w) x [y, y+h), all inside the level."""

    def close(self) -> None:
        """Release the file handles (idempotent)."""

    # ------------------------------------------------------------------------------------ metadata

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self._level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def mpp_xy(self) -> tuple[float, float] | None:
        """(x, y) micrometres per level-0 pixel: the override if given, else the metadata, else None."""
        if self._mpp_override is not None:
            return (self._mpp_override, self._mpp_override)
        return self._mpp_xy

    @property
    def mpp(self) -> float | None:
        """Micrometres per level-0 pixel (mean of x and y), or None when unknown and not overridden."""
        xy = self.mpp_xy
        return None if xy is None else (xy[0] + xy[1]) / 2.0

    @property
    def mpp_override(self) -> float | None:
        return self._mpp_override

    @property
    def objective_power(self) -> float | None:
        return self._objective_power

    @property
    def vendor(self) -> str | None:
        return self._vendor

    @property
    def properties(self) -> dict[str, str]:
        return self._properties

    @property
    def associated_images(self) -> Mapping[str, np.ndarray]:
        """Associated images (label, macro, thumbnail, ...) by name, each read as RGB uint8 on first use."""
        return self._associated

    @property
    def identity(self) -> str:
        """Stable hex id of the slide: SHA-256 (first 32 hex digits) of the file's first and last 64 KiB,
        its size and the level dimensions.  It does not depend on the path: a copy has the same identity."""
        if self._identity is None:
            size = self._path.stat().st_size
            h = hashlib.sha256()
            with open(self._path, "rb") as fh:
                h.update(fh.read(_HEADER_BYTES))
                if size > _HEADER_BYTES:
                    fh.seek(max(size - _HEADER_BYTES, _HEADER_BYTES))
                    h.update(fh.read(_HEADER_BYTES))
            h.update(str(size).encode())
            h.update(repr(self._level_dimensions).encode())
            self._identity = h.hexdigest()[:32]
        return self._identity

    def describe(self) -> dict[str, Any]:
        """Plain, JSON-serialisable summary of the slide's metadata (what ``histopan info`` prints)."""
        return {
            "path": str(self._path),
            "backend": type(self).__name__,
            "vendor": self._vendor,
            "identity": self.identity,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self._level_dimensions],
            "level_downsamples": list(self._level_downsamples),
            "mpp": self.mpp,
            "mpp_xy": None if self.mpp_xy is None else list(self.mpp_xy),
            "mpp_source": "override" if self._mpp_override is not None
            else "metadata" if self._mpp_xy is not None else None,
            "objective_power": self._objective_power,
            "associated_images": list(self._associated),
            "greyscale": self._greyscale,
        }

    def require_mpp(self) -> float:
        """The slide's micrometres per pixel, or :class:`MppError` saying how to pass it."""
        mpp = self.mpp
        if mpp is None:
            hint = ""
            if self._objective_power:
                hint = (f"; its objective power is {self._objective_power:g}x, which usually means about "
                        f"{10.0 / self._objective_power:g} um/px")
            raise MppError(f"the slide has no microns per pixel in its metadata{hint}", path=self._path,
                           fix=MPP_FIX)
        return mpp

    @property
    def greyscale(self) -> bool:
        """Whether the image has a single (grey) channel, replicated to RGB when read."""
        return self._greyscale

    def require_segmentable(self) -> None:
        """:class:`SlideError` for a slide that ``segment`` cannot turn into a trustworthy result in bounded time:

        - a greyscale image: H&E models need the stain colours (a grey slide shows no tissue, so the result
          would be an empty store that looks complete);
        - a slide of more than :data:`MAX_UNPYRAMIDED_PX` pixels without a downsampled pyramid level: its
          low-resolution views (the tissue scan, the store's overview) would each read every pixel.
        """
        if self._greyscale:
            raise SlideError("the image is greyscale (one channel); H&E segmentation needs the colour (RGB) image",
                             path=self._path,
                             fix="pass the RGB original of the slide (a grey export loses the stain colours the "
                                 "model reads)")
        width, height = self.dimensions
        coarsest = max(self._level_downsamples) if self._level_downsamples else 1.0
        if width * height > MAX_UNPYRAMIDED_PX and coarsest < 4.0:
            raise SlideError(f"the slide is {width} x {height} pixels ({width * height / 1e9:.1f} gigapixels) with no "
                             f"downsampled pyramid level, so every low-resolution view would read all of it",
                             path=self._path,
                             fix="convert it to a pyramidal TIFF first, e.g. `vips tiffsave in.tif out.tif --tile "
                                 "--pyramid --compression jpeg --Q 90`")

    def snap_mpp(self, mpp: float, tolerance: float = 0.01) -> float:
        """The pixel size of a pyramid level within ``tolerance`` (relative) of ``mpp``, else ``mpp``.

        Reading at a level's own pixel size on its grid is a raw read with no resampling (e.g. 0.499 instead
        of 0.5 um/px on a 20x Aperio slide), which is about twice as fast; callers that can accept the small
        scale difference snap the target first.
        """
        mpp = check_mpp(mpp, path=self._path)
        base = self.require_mpp()
        for ds in self._level_downsamples:
            if abs(base * ds - mpp) <= tolerance * mpp:
                return base * ds
        return mpp

    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is <= ``downsample`` (within 1 %)."""
        best = 0
        for i, ds in enumerate(self._level_downsamples):
            if ds <= downsample * (1.0 + LEVEL_TOLERANCE) and ds > self._level_downsamples[best]:
                best = i
        return best

    # ------------------------------------------------------------------------------------ reading

    def read_region(self, x: float, y: float, w: float, h: float, mpp: float | None = None,
                    out_size: tuple[int, int] | None = None) -> np.ndarray:
        """RGB uint8 array (out_h, out_w, 3) of the level-0 region [x, x+w) x [y, y+h).

        The output size is ``out_size=(out_w, out_h)`` if given, else the region at ``mpp`` micrometres per
        pixel: ``(round(w * base_mpp / mpp), round(h * base_mpp / mpp))``; ``mpp=None`` means level-0
        resolution.  The coarsest pyramid level at or finer than the target is read and resampled (Gaussian
        prefilter with sigma = (factor - 1) / 2 source pixels when shrinking, then bilinear interpolation at
        output pixel centres).  A region that is not inside the slide raises :class:`RegionError`.
        """
        x, y, w, h = self._check_region(x, y, w, h)
        if mpp is None:
            target = 1.0
        else:
            target = check_mpp(mpp, path=self._path) / self.require_mpp()
        if out_size is not None:
            try:
                ow, oh = (int(v) for v in out_size)
            except (TypeError, ValueError):
                raise RegionError("out_size must be two whole numbers (width, height)", path=self._path,
                                  value=out_size, fix="pass out_size=(out_w, out_h)") from None
            if ow <= 0 or oh <= 0:
                raise RegionError("out_size must be positive", path=self._path, value=out_size,
                                  fix="pass out_size=(out_w, out_h) with both > 0")
        else:
            ow, oh = max(1, round(w / target)), max(1, round(h / target))
        sx, sy = w / ow, h / oh
        level = self.best_level(min(sx, sy))
        ds = self._level_downsamples[level]
        lw, lh = self._level_dimensions[level]
        lx, ly = x / ds, y / ds
        if (abs(sx - ds) < _INTEGRAL_EPS and abs(sy - ds) < _INTEGRAL_EPS
                and abs(lx - round(lx)) < _INTEGRAL_EPS and abs(ly - round(ly)) < _INTEGRAL_EPS):
            ix, iy = int(round(lx)), int(round(ly))
            if ix + ow <= lw and iy + oh <= lh:
                return self._read_level(level, ix, iy, ow, oh)
        ax = _Axis(x, ow, sx, ds, lw)
        ay = _Axis(y, oh, sy, ds, lh)
        src = self._read_level(level, ax.lo, ay.lo, ax.hi - ax.lo, ay.hi - ay.lo)
        return _resample(src, ax, ay)

    def _check_region(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        width, height = self.dimensions
        try:
            vals = tuple(float(v) for v in (x, y, w, h))
        except (TypeError, ValueError):
            raise RegionError("region coordinates must be numbers", path=self._path, value=(x, y, w, h),
                              fix="pass x, y, w, h in level-0 pixels") from None
        fx, fy, fw, fh = vals
        if not all(math.isfinite(v) for v in vals) or fw <= 0 or fh <= 0:
            raise RegionError(f"region x={x}, y={y}, w={w}, h={h} must be finite with w, h > 0",
                              path=self._path, fix="pass a non-empty region in level-0 pixels")
        tol = 1e-6
        if fx < -tol or fy < -tol or fx + fw > width + tol or fy + fh > height + tol:
            raise RegionError(
                f"region x={x}, y={y}, w={w}, h={h} (level-0 pixels) lies outside the slide of "
                f"{width} x {height} pixels", path=self._path,
                fix=f"keep 0 <= x, 0 <= y, x + w <= {width}, y + h <= {height} (clip tiles at the slide border)")
        return max(fx, 0.0), max(fy, 0.0), min(fw, width - max(fx, 0.0)), min(fh, height - max(fy, 0.0))

    # ------------------------------------------------------------------------------------ protocol

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (type(self), str(self._path), self._mpp_override))

    def __repr__(self) -> str:
        w, h = self.dimensions if self._level_dimensions else (0, 0)
        return (f"{type(self).__name__}({str(self._path)!r}, {w}x{h}, levels={self.level_count}, "
                f"mpp={self.mpp})")


class ArrayReader(SlideReader):
    """An RGB uint8 image in memory, read as a one-level slide of ``mpp`` micrometres per pixel (what
    ``predict_tile`` detects tissue on, through the same :meth:`read_region` as a slide file).  ``name`` stands
    in for a path in messages; the reader has no file, so it has no identity and does not pickle."""

    def __init__(self, image: np.ndarray, mpp: float, name: str = "<image>") -> None:
        super().__init__(name, mpp)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise SlideError("an in-memory slide must be an RGB uint8 image (H, W, 3)",
                             value=(tuple(image.shape), str(image.dtype)), fix="pass an RGB uint8 array")
        self._image = image
        self._level_dimensions = ((int(image.shape[1]), int(image.shape[0])),)
        self._level_downsamples = (1.0,)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._image[y:y + h, x:x + w]

    @property
    def identity(self) -> str:
        raise SlideError("an in-memory image has no file identity", path=self._path,
                         fix="write it to a file and open that with open_slide")

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("an in-memory ArrayReader does not pickle")


def _reopen(cls: type[SlideReader], path: str, mpp: float | None) -> SlideReader:
    return cls(path, mpp=mpp)


def _resample(src: np.ndarray, ax: _Axis, ay: _Axis) -> np.ndarray:
    """Apply the separable weights of ``ay`` (rows) and ``ax`` (columns) to ``src`` (h, w, 3) uint8."""
    h, w, c = src.shape
    rows = ay.matrix @ src.reshape(h, w * c).astype(np.float32)  # (out_h, w * c)
    oh = rows.shape[0]
    cols = rows.reshape(oh, w, c).transpose(1, 0, 2).reshape(w, oh * c)
    out = (ax.matrix @ cols).reshape(-1, oh, c).transpose(1, 0, 2)  # (out_h, out_w, c)
    out = np.clip(np.rint(out), 0, 255)
    return np.ascontiguousarray(out, dtype=np.uint8)
