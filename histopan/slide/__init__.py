"""Whole-slide reading: one reader interface, :func:`open_slide` picks the backend.

- :class:`~histopan.slide.openslide_backend.OpenSlideReader`: everything OpenSlide opens (Aperio SVS,
  Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF, DICOM WSI, generic tiled TIFF).
- :class:`~histopan.slide.tifffile_backend.TifffileReader`: OME-TIFF, TIFFs OpenSlide cannot read and plain
  images (TIFF, PNG, JPEG) as one-level slides.

All coordinates are level-0 pixels; see :meth:`SlideReader.read_region`.
"""

from __future__ import annotations

import logging
import os
from os import PathLike
from pathlib import Path

from histopan.checks import MPP_FIX, check_mpp
from histopan.errors import SlideError
from histopan.slide.base import SlideReader
from histopan.slide.openslide_backend import OpenSlideReader, detect_format
from histopan.slide.tifffile_backend import PIL_SUFFIXES, TifffileReader, check_tiff_complete

__all__ = ["MPP_FIX", "OpenSlideReader", "SlideReader", "TifffileReader", "open_slide"]

log = logging.getLogger(__name__)

_OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path: str | PathLike[str], mpp: float | None = None) -> SlideReader:
    """Open a slide or image for reading, choosing the backend from the file's content.

    ``mpp`` (micrometres per level-0 pixel), when given, overrides the metadata.  Raises
    :class:`~histopan.errors.SlideError` (or :class:`~histopan.errors.MppError`) naming the file and the fix
    for a missing path, a directory, an empty, truncated or unreadable file, or an invalid ``mpp``.
    """
    p = Path(path)
    if mpp is not None:
        check_mpp(mpp, path=p, what="--mpp")
    if not p.exists():
        raise SlideError("slide file not found", path=p, fix="check the path and spelling")
    if p.is_dir():
        raise SlideError("is a directory, not a slide file", path=p,
                         fix="pass the slide file itself (for a DICOM WSI one .dcm file of the series, "
                             "for MIRAX the .mrxs file)")
    if not os.access(p, os.R_OK):
        raise SlideError("the slide file cannot be read: permission denied", path=p,
                         fix=f"make it readable for this user (e.g. chmod a+r {p}) or copy it somewhere readable")
    size = p.stat().st_size
    if size == 0:
        raise SlideError("the file is empty (0 bytes)", path=p,
                         fix="copy the slide again; the transfer or export probably failed")
    name = p.name.lower()
    if name.endswith(_OME_SUFFIXES) or p.suffix.lower() in PIL_SUFFIXES:
        return TifffileReader(p, mpp=mpp)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise SlideError(f"the slide file cannot be read: {exc.strerror or exc}", path=p,
                         fix="check that the file is readable for this user and its disk is mounted") from exc
    plain_rgb8 = _check_tiff(p) if magic in _TIFF_MAGIC else True
    fmt = detect_format(p)
    if fmt is not None and (fmt != "generic-tiff" or plain_rgb8):
        return OpenSlideReader(p, mpp=mpp)
    # includes generic TIFFs that are not 8-bit RGB: OpenSlide would convert 16-bit, greyscale and CMYK
    # silently; the tifffile backend applies (and logs) histopan's documented per-format policy.
    return TifffileReader(p, mpp=mpp)


class _TifffileMessages(logging.Handler):
    """Collects what tifffile logs while it parses one file (e.g. "invalid offset to first page"), instead of
    letting Python's last-resort handler print it as a stray line beside histopan's own error; on exit the
    messages are passed on at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _TifffileMessages:
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self)
        for message in self.messages:
            log.debug("tifffile: %s", message)


def _check_tiff(path: Path) -> bool:
    """Fail early and clearly on a truncated or unparsable TIFF, whichever backend reads it.

    Returns whether the first image is plain 8-bit RGB (or YCbCr-coded RGB).
    """
    import numpy as np
    import tifffile

    with _TifffileMessages():
        try:
            with tifffile.TiffFile(path) as tif:
                if len(tif.pages) == 0:
                    raise SlideError(f"the TIFF holds no readable image: its first image directory is missing or "
                                     f"lies beyond the end of the file ({path.stat().st_size} bytes), so it is "
                                     f"truncated or corrupt", path=path, fix="copy or export the file again")
                check_tiff_complete(tif, path)
                page = tif.pages[0]
                photometric = getattr(page.photometric, "name", "")
                return page.dtype == np.uint8 and photometric in ("RGB", "YCBCR") and page.samplesperpixel in (3, 4)
        except (tifffile.TiffFileError, EOFError, ValueError, OSError) as exc:
            raise SlideError(f"the TIFF structure cannot be read (truncated or corrupt?): {exc}", path=path,
                             fix="copy or export the file again") from exc
