"""OpenSlide backend: Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF, DICOM WSI, generic tiled TIFF.

OpenSlide is thread-safe for reads, so one handle is shared by all threads.  OpenSlide takes level-0
coordinates and divides them by the level downsample; when that downsample is not a whole number (Aperio
levels are e.g. 4.0005x) the level origin falls between pixels and OpenSlide interpolates, so the same level
pixel would come out slightly different in reads starting at different places.  Such levels are therefore
read in fixed blocks on a level-pixel grid (cached), which keeps every level pixel's value independent of the
request and tiled reads seam-free.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
from PIL import ImageChops

from histopan.errors import SlideError
from histopan.slide.base import LazyImages, SlideReader, plausible_mpp

log = logging.getLogger(__name__)

_BLOCK = 512
_CACHE_BLOCKS = 32
_CORRUPT_FIX = "the file may be truncated or corrupt: copy it again from the scanner or archive"


def detect_format(path: Path) -> str | None:
    """OpenSlide's name for the format of ``path`` (e.g. 'aperio'), or None when OpenSlide cannot read it."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def _float(props: dict[str, str], key: str) -> float | None:
    text = props.get(key)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        log.warning("ignoring non-numeric slide property %s=%r", key, text)
        return None


def _pil_to_rgb(img) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """RGB uint8 of an OpenSlide RGBA image, transparent pixels composited on white.

    Regions inside the slide are almost always opaque, so the common case is made cheap: one scan of the
    alpha band (its inverse has no non-zero pixel, i.e. no bounding box, exactly when every alpha is 255),
    then Pillow's C conversion to RGB.
    """
    if img.mode == "RGBA" and ImageChops.invert(img.getchannel("A")).getbbox() is not None:
        arr = np.asarray(img, dtype=np.float32)
        a = arr[..., 3:4] / 255.0
        out = arr[..., :3] * a + 255.0 * (1.0 - a)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        try:
            self._osr = openslide.OpenSlide(str(self._path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"OpenSlide does not support this file: {exc}", path=self._path,
                             fix="pass a whole-slide image (svs, ndpi, mrxs, scn, bif, dcm, tiled tiff)") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"OpenSlide cannot open the slide: {exc}", path=self._path,
                             fix=_CORRUPT_FIX) from exc
        osr = self._osr
        self._properties = dict(osr.properties)
        self._level_dimensions = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in osr.level_downsamples)
        self._vendor = self._properties.get("openslide.vendor")
        self._objective_power = _float(self._properties, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        mx = _float(self._properties, openslide.PROPERTY_NAME_MPP_X)
        my = _float(self._properties, openslide.PROPERTY_NAME_MPP_Y)
        self._mpp_xy = plausible_mpp((mx, my), path=self._path, source="openslide.mpp-x/y")
        self._associated = LazyImages(sorted(osr.associated_images), self._load_associated)
        self._integral = tuple(abs(d - round(d)) < 1e-9 for d in self._level_downsamples)
        self._blocks: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _load_associated(self, name: str) -> np.ndarray:
        try:
            return _pil_to_rgb(self._osr.associated_images[name])
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read associated image {name!r}: {exc}", path=self._path,
                             fix=_CORRUPT_FIX) from exc

    def _raw(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._osr is None:
            raise SlideError("the slide reader is closed", path=self._path, fix="open the slide again")
        ds = self._level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        try:
            return _pil_to_rgb(self._osr.read_region(loc, level, (w, h)))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"OpenSlide failed to read level {level} region x={x}, y={y}, w={w}, h={h}: "
                             f"{exc}", path=self._path, fix=_CORRUPT_FIX) from exc

    def _block(self, level: int, bx: int, by: int) -> np.ndarray:
        key = (level, bx, by)
        with self._lock:
            blk = self._blocks.get(key)
            if blk is not None:
                self._blocks.move_to_end(key)
                return blk
        lw, lh = self._level_dimensions[level]
        x0, y0 = bx * _BLOCK, by * _BLOCK
        blk = self._raw(level, x0, y0, min(_BLOCK, lw - x0), min(_BLOCK, lh - y0))
        with self._lock:
            self._blocks[key] = blk
            while len(self._blocks) > _CACHE_BLOCKS:
                self._blocks.popitem(last=False)
        return blk

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._integral[level]:
            return self._raw(level, x, y, w, h)
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y // _BLOCK, (y + h - 1) // _BLOCK + 1):
            for bx in range(x // _BLOCK, (x + w - 1) // _BLOCK + 1):
                blk = self._block(level, bx, by)
                bx0, by0 = bx * _BLOCK, by * _BLOCK
                sx0, sy0 = max(x, bx0), max(y, by0)
                sx1, sy1 = min(x + w, bx0 + blk.shape[1]), min(y + h, by0 + blk.shape[0])
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = blk[sy0 - by0:sy1 - by0, sx0 - bx0:sx1 - bx0]
        return out

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None
        self._blocks.clear()
