"""tifffile backend: OME-TIFF, pyramidal TIFFs OpenSlide cannot read, and plain single images.

TIFF files are read lazily through tifffile's zarr store (only the tiles or strips a region touches).  PNG
and JPEG files are read whole with Pillow on first use and act as one-level slides; they carry no trustworthy
pixel size, so they need an explicit mpp (``--mpp``) for anything that works in micrometres.

Pixel formats (decided per case):

- RGB uint8: read as is.  RGBA / grey+alpha: composited on white.
- single channel (greyscale), with or without alpha: replicated to RGB for reading (``greyscale`` is set);
  :meth:`~histopan.slide.base.SlideReader.require_segmentable` (called by ``segment`` and ``batch``) refuses it,
  because an H&E model on grey pixels finds no tissue and would write an empty result.
- 16-bit unsigned: scaled to 8 bits over the full 16-bit range (value / 257), with a logged warning.
- CMYK, palette, MinIsWhite, floating point, signed or 32-bit integer images, more than 4 channels or extra
  Z/T/channel axes: refused with a :class:`~histopan.errors.SlideError` that says how to convert the file,
  because a naive conversion would silently change the stain colours the models depend on.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
import zarr

from histopan.errors import SlideError
from histopan.slide.base import LazyImages, SlideReader, plausible_mpp

log = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
_CONVERT_FIX = ("convert it to 8-bit RGB, e.g. `vips colourspace in.tif out.tif srgb` or "
                "`magick in.tif -colorspace sRGB -depth 8 out.tif`")
_CORRUPT_FIX = "the file may be truncated or corrupt: copy or export it again"
_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


def check_tiff_complete(tif: tifffile.TiffFile, path: Path) -> None:
    """Raise :class:`SlideError` if any image data of ``tif`` lies beyond the end of the file (truncated)."""
    size = path.stat().st_size
    for page in tif.pages:
        offsets = getattr(page, "dataoffsets", ())
        counts = getattr(page, "databytecounts", ())
        if offsets and counts:
            end = max(int(o) + int(c) for o, c in zip(offsets, counts))
            if end > size:
                raise SlideError(f"the TIFF is truncated: its image data runs to byte {end} but the file has "
                                 f"only {size} bytes", path=path, fix=_CORRUPT_FIX)


def _pixel_mode(dtype: np.dtype, channels: int, photometric: str | None, path: Path) -> str:
    """How to turn raw samples into RGB uint8; raises SlideError for formats we refuse."""
    if photometric in ("SEPARATED", "CMYK"):
        raise SlideError("CMYK images are not supported (stain colours need a colour-managed conversion)",
                         path=path, fix=_CONVERT_FIX)
    if photometric in ("PALETTE", "P"):
        raise SlideError("palette (indexed colour) images are not supported", path=path, fix=_CONVERT_FIX)
    if photometric == "MINISWHITE":
        raise SlideError("MinIsWhite (inverted greyscale) images are not supported", path=path,
                         fix=_CONVERT_FIX)
    if dtype == np.uint8:
        scale = "u8"
    elif dtype == np.uint16:
        log.warning("%s: 16-bit image; scaling to 8 bits over the full 16-bit range (value / 257)", path)
        scale = "u16"
    else:
        raise SlideError(f"pixel type {dtype} is not supported (expected 8- or 16-bit unsigned integers)",
                         path=path, value=str(dtype), fix=_CONVERT_FIX)
    if channels not in (1, 2, 3, 4):
        raise SlideError(f"images with {channels} channels are not supported (expected grey, RGB or RGBA)",
                         path=path, value=channels, fix=_CONVERT_FIX)
    if channels in (1, 2):
        # debug only: `histopan info` reports a greyscale slide itself and `segment` refuses it in one line
        log.debug("%s: single-channel (greyscale) image; replicating it to RGB", path)
    return scale


def _to_rgb8(arr: np.ndarray, scale: str) -> np.ndarray:
    """(h, w, c) raw samples -> (h, w, 3) RGB uint8, alpha composited on white."""
    if scale == "u16":
        arr = np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    c = arr.shape[2]
    if c in (2, 4):
        alpha = arr[..., -1]
        colour = arr[..., :-1]
        if alpha.min() < 255:
            a = alpha.astype(np.float32)[..., None] / 255.0
            colour = np.clip(np.rint(colour.astype(np.float32) * a + 255.0 * (1.0 - a)), 0, 255)
            colour = colour.astype(np.uint8)
        arr = colour
        c -= 1
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _ome_metadata(xml: str) -> tuple[tuple[float, float] | None, float | None]:
    """(mpp_x, mpp_y) and objective power from OME-XML (first image), each None when absent."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("ignoring OME-XML that does not parse")
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    mpp = None
    if pixels is not None:
        vals = []
        for axis in ("X", "Y"):
            size = pixels.get(f"PhysicalSize{axis}")
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            try:
                vals.append(float(size) * _OME_UNITS[unit] if size is not None else None)
            except (KeyError, ValueError):
                vals.append(None)
        if vals[0] is not None or vals[1] is not None:
            mx = vals[0] if vals[0] is not None else vals[1]
            my = vals[1] if vals[1] is not None else vals[0]
            mpp = (mx, my)
    power = None
    objective = next((el for el in root.iter() if el.tag.endswith("}Objective") or el.tag == "Objective"), None)
    if objective is not None and objective.get("NominalMagnification"):
        try:
            power = float(objective.get("NominalMagnification"))
        except ValueError:
            power = None
    return mpp, power


def _tag_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """mpp from the TIFF resolution tags (inch or centimetre units), else None."""
    unit = page.tags.get("ResolutionUnit")
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit is None or xres is None or yres is None:
        return None
    per = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    out = []
    for tag in (xres, yres):
        num, den = tag.value
        if per is None or num == 0:
            return None
        out.append(per * den / num)
    return out[0], out[1]


class TifffileReader(SlideReader):
    """A slide read with tifffile (TIFF / OME-TIFF) or Pillow (PNG / JPEG)."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._lock = threading.Lock()
        self._tif: tifffile.TiffFile | None = None
        self._levels: list = []
        self._image: np.ndarray | None = None
        self._closed = False
        self._is_pil = self._path.suffix.lower() in PIL_SUFFIXES
        if self._is_pil:
            self._open_pillow()
        else:
            self._open_tiff()

    # ------------------------------------------------------------------------------------ Pillow

    def _open_pillow(self) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            # PIL warns about (and beyond twice the limit refuses) images whose header claims more pixels than
            # MAX_IMAGE_PIXELS; a plain image is decoded whole, so both are refused here, before any decoding.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(self._path) as img:
                    img.verify()
                img = Image.open(self._path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SlideError(f"the image header claims more pixels than a plain PNG/JPEG may have here "
                             f"(more than {Image.MAX_IMAGE_PIXELS} pixels; it would be decoded whole): {str(exc).rstrip('.')}",
                             path=self._path,
                             fix="save a large image as a tiled pyramidal TIFF (e.g. `vips tiffsave in.png out.tif "
                                 "--tile --pyramid --compression jpeg`), or check that the file is what it claims") \
                from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SlideError(f"not a readable PNG/JPEG image: {exc}", path=self._path,
                             fix=_CORRUPT_FIX) from exc
        with img:
            if img.mode == "CMYK":
                raise SlideError("CMYK images are not supported (stain colours need a colour-managed "
                                 "conversion)", path=self._path, fix=_CONVERT_FIX)
            self._level_dimensions = ((int(img.width), int(img.height)),)
            self._pil_mode = img.mode
            grey = img.mode in ("1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I")
            self._greyscale = grey
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                self._scale = _pixel_mode(np.dtype(np.uint16), 1, None, self._path)
            elif img.mode in ("F", "I;32"):
                _pixel_mode(np.dtype(np.float32), 1, None, self._path)
            else:
                self._scale = _pixel_mode(np.dtype(np.uint8), 1 if grey else 3, None, self._path)
            self._properties = {f"pillow.{k}": str(v) for k, v in img.info.items()
                                if isinstance(v, (str, int, float, tuple))}
            self._properties["pillow.mode"] = img.mode
            self._vendor = (img.format or self._path.suffix.lstrip(".")).lower()
        self._level_downsamples = (1.0,)
        self._mpp_xy = None  # dpi in PNG/JPEG files is a screen/print setting, not the microscope's pixel size

    def _pillow_image(self) -> np.ndarray:
        from PIL import Image

        with self._lock:
            if self._image is None:
                try:
                    with Image.open(self._path) as img:
                        img.load()
                        if self._scale == "u16":
                            arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)[..., None]
                        elif img.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
                            arr = np.asarray(img.convert("RGBA"))
                        elif img.mode == "L":
                            arr = np.asarray(img)[..., None]
                        else:
                            arr = np.asarray(img.convert("RGB"))
                except OSError as exc:
                    raise SlideError(f"cannot decode the image: {exc}", path=self._path,
                                     fix=_CORRUPT_FIX) from exc
                self._image = _to_rgb8(arr, self._scale)
            return self._image

    # ------------------------------------------------------------------------------------ TIFF

    def _open_tiff(self) -> None:
        try:
            tif = tifffile.TiffFile(self._path)
        except (tifffile.TiffFileError, OSError, ValueError, EOFError) as exc:
            raise SlideError(f"not a readable slide or image file: {exc}", path=self._path,
                             fix="pass a whole-slide image (svs, ndpi, mrxs, scn, bif, dcm, tiff, ome.tiff) "
                                 "or a PNG/JPEG tile with --mpp") from exc
        try:
            self._setup_tiff(tif)
        except SlideError:
            tif.close()
            raise
        self._tif = tif

    def _setup_tiff(self, tif: tifffile.TiffFile) -> None:
        path = self._path
        check_tiff_complete(tif, path)
        if not tif.series:
            raise SlideError("the TIFF holds no images", path=path, fix=_CORRUPT_FIX)
        series = tif.series[0]
        page = series.pages[0] if series.pages else tif.pages[0]
        photometric = getattr(page.photometric, "name", None)
        axes = series.axes
        shape = series.shape
        extra = [a for a, n in zip(axes, shape) if a not in "YXSC" and n > 1]
        if extra or sum(a in "SC" and n > 1 for a, n in zip(axes, shape)) > 1:
            raise SlideError(f"the image has axes {axes} with shape {shape}; expected a 2-D grey, RGB or RGBA "
                             "image", path=path, value=axes,
                             fix="export one 2-D RGB plane (one Z, T and channel set) as the slide")
        channels = 1
        for a, n in zip(axes, shape):
            if a in "SC" and n > 1:
                channels = n
        self._scale = _pixel_mode(np.dtype(series.dtype), channels, photometric, path)
        self._greyscale = channels in (1, 2)
        self._axes = axes
        dims = []
        for level in series.levels:
            lshape = dict(zip(level.axes, level.shape))
            dims.append((int(lshape["X"]), int(lshape["Y"])))
        w0, h0 = dims[0]
        self._level_dimensions = tuple(dims)
        self._level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        self._level_axes = [level.axes for level in series.levels]
        self._levels = [None] * len(dims)
        props = {}
        for tag in page.tags:
            if tag.name in ("ImageDescription", "Software", "DateTime", "Make", "Model", "Artist"):
                props[f"tiff.{tag.name}"] = str(tag.value)
        props["tiff.series"] = series.kind
        self._properties = props
        mpp_xy, power = None, None
        if tif.is_ome and tif.ome_metadata:
            mpp_xy, power = _ome_metadata(tif.ome_metadata)
            self._vendor = "ome-tiff"
            source = "OME PhysicalSizeX/Y"
        else:
            desc = page.description or ""
            m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
            if m:
                value = float(m.group(1))
                mpp_xy, source = (value, value), "the Aperio ImageDescription"
            else:
                mpp_xy, source = _tag_mpp(page), "the TIFF resolution tags"
            p = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
            power = float(p.group(1)) if p else None
            self._vendor = "aperio" if desc.startswith("Aperio") else "tiff"
        self._mpp_xy = plausible_mpp(mpp_xy, path=path, source=source)
        self._objective_power = power
        assoc = {s.name.lower(): i for i, s in enumerate(tif.series)
                 if i > 0 and s.name and s.name.lower() in ("label", "macro", "thumbnail")}
        self._assoc_index = assoc
        self._associated = LazyImages(sorted(assoc), self._load_associated)

    def _load_associated(self, name: str) -> np.ndarray:
        if self._tif is None:
            raise SlideError("the slide reader is closed", path=self._path, fix="open the slide again")
        series = self._tif.series[self._assoc_index[name]]
        with self._lock:
            arr = series.asarray()
        if arr.ndim == 2:
            arr = arr[..., None]
        return _to_rgb8(arr, "u8" if arr.dtype == np.uint8 else "u16")

    def _zarr_level(self, level: int):  # noqa: ANN202 - a zarr array
        if self._levels[level] is None:
            store = self._tif.series[0].aszarr(level=level)
            self._levels[level] = zarr.open_array(store, mode="r")
        return self._levels[level]

    # ------------------------------------------------------------------------------------ reading

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._closed:
            raise SlideError("the slide reader is closed", path=self._path, fix="open the slide again")
        if self._is_pil:
            return self._pillow_image()[y:y + h, x:x + w].copy()
        axes = self._level_axes[level]
        index = []
        for a in axes:
            index.append(slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X"
                         else slice(None) if a in "SC" else 0)
        kept = [a for a in axes if a in "YXSC"]
        try:
            with self._lock:
                arr = np.asarray(self._zarr_level(level)[tuple(index)])
        except (ValueError, OSError, RuntimeError, KeyError) as exc:
            raise SlideError(f"cannot read level {level} region x={x}, y={y}, w={w}, h={h}: {exc}",
                             path=self._path, fix=_CORRUPT_FIX) from exc
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]
        arr = np.transpose(arr, order).reshape(h, w, -1)
        return _to_rgb8(arr, self._scale)

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._levels = []
        self._image = None
        self._closed = True
