"""Errors raised by histopan.

Every error a user can cause is a :class:`HistopanError` (or a subclass) whose message names the file,
the offending value and the fix.  The CLI prints the message and exits non-zero; library callers can catch
the precise subclass.
"""

from __future__ import annotations

from os import PathLike


class HistopanError(Exception):
    """Base class of every user-facing histopan error.

    ``HistopanError("mpp must be positive", path=p, value=-1, fix="pass --mpp 0.5")`` renders as
    ``<path>: mpp must be positive (got -1). Fix: pass --mpp 0.5``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        value: object = None,
        fix: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.value = value
        self.fix = fix
        self.reason = message
        text = message
        if self.path is not None:
            text = f"{self.path}: {text}"
        if value is not None:
            text = f"{text} (got {value!r})"
        if fix:
            text = f"{text}. Fix: {fix}"
        # one line, whatever the parts hold (a YAML parser's or an OS error's message spans several)
        super().__init__(" ".join(text.split()))


class SlideError(HistopanError):
    """A slide file cannot be opened or read."""


class MppError(SlideError):
    """The microns per pixel of a slide are missing or invalid."""


class RegionError(SlideError):
    """A requested region lies (partly) outside the slide or has a bad size."""


class ConfigError(HistopanError):
    """A configuration file or value is invalid."""


class ModelError(HistopanError):
    """A model folder, checkpoint or architecture is invalid or mismatched."""


class DataError(HistopanError):
    """Training or evaluation data is missing, mis-sized or inconsistent."""


class AnnotationError(DataError):
    """An annotation file (e.g. QuPath GeoJSON) is invalid or does not match its image."""


class StoreError(HistopanError):
    """An output store is missing, incomplete, or would be overwritten."""


class OutputError(HistopanError):
    """An output path cannot be written: its folder is missing or read-only, it has the wrong kind or name,
    or it already exists."""
