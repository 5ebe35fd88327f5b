"""histopan: slide-level panoptic segmentation of H&E whole-slide images."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("histopan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
