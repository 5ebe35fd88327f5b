"""Checks shared by every stage: a pixel size in microns per pixel, and an output path before writing.

:func:`check_mpp` is the one test of an ``mpp`` value (slides, tiles, configs, manifests, meta.json files);
:func:`check_output` is the one test of a file or folder about to be written.  Both raise errors that name
the path, the value and the fix.
"""

from __future__ import annotations

import math
import numbers
import os
from os import PathLike
from pathlib import Path

from histopan.errors import HistopanError, MppError, OutputError

__all__ = ["MPP_FIX", "check_mpp", "check_output"]

MPP_FIX = "pass --mpp (e.g. --mpp 0.25 for 40x, 0.5 for 20x)"


def check_mpp(mpp: object, *, what: str = "mpp", path: str | PathLike[str] | None = None, fix: str = MPP_FIX,
              error: type[Exception] = MppError) -> float:
    """``mpp`` as a float, or ``error`` unless it is a finite real number > 0 (booleans and text refused).

    ``what`` names the value in the message.  A :class:`~histopan.errors.HistopanError` subclass as
    ``error`` gets ``path``, the value and ``fix``; a ``ValueError`` (a config dataclass's ``__post_init__``,
    which :func:`histopan.config.from_dict` turns into a ConfigError naming the file and key) gets the
    message with the value.
    """
    if not isinstance(mpp, bool) and isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0:
        return float(mpp)
    problem = f"{what} must be a positive finite number of microns per pixel"
    if issubclass(error, HistopanError):
        raise error(problem, path=path, value=mpp, fix=fix)
    raise error(f"{problem}, got {mpp!r}")


def check_output(path: str | PathLike[str], *, folder: bool = False, suffixes: tuple[str, ...] = (),
                 overwrite: bool = True, create: bool = False) -> Path:
    """Refuse an output ``path`` that cannot be written, before any work is done; returns it as a Path.

    The folder that will hold it must exist and be writable (``create``: ``path`` is a folder, made with its
    parents when missing, and must itself be writable).  ``folder``: ``path`` is a folder (a store, a run
    folder), so an existing file there is refused; else it is a file, so an existing folder is refused, an
    existing file too unless ``overwrite``, and anything but a regular file (a device such as /dev/full)
    always.  A file in place of the folder (or of one of its parents) is named as such.  ``suffixes``: the
    name must end with one of them (case-insensitive).  Raises :class:`~histopan.errors.OutputError` naming
    the path and the fix.
    """
    out = Path(path)
    if suffixes and not out.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        kind = "folder" if folder else "file"
        raise OutputError(f"the output must be a {' or '.join(suffixes)} {kind}", path=out,
                          fix=f"pass e.g. {out.name.split('.')[0] or 'out'}{suffixes[0]}")
    folder = folder or create
    if create and not out.is_dir():
        if out.exists():
            raise OutputError("the output path exists and is not a folder", path=out, fix="choose another folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder: {exc.strerror or exc}", path=out,
                              fix="choose a folder you can write to") from exc
    parent = out if create else out.resolve().parent
    if not parent.is_dir():
        blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputError("a file is in the way of the output folder", path=blocker,
                              fix=f"write elsewhere, or move that file away (the output is {out})")
        raise OutputError("the output folder does not exist", path=parent, fix=f"create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable", path=parent,
                          fix="choose a folder you can write to, or fix its permissions")
    if folder:
        if out.exists() and not out.is_dir():
            raise OutputError("the output path exists and is not a folder", path=out, fix="choose another path")
        return out
    if out.is_dir():
        raise OutputError("the output path is a folder", path=out,
                          fix=f"pass a file name{f' ending in {suffixes[0]}' if suffixes else ''}")
    if out.exists():
        if not out.is_file():
            raise OutputError("the output path exists and is not a regular file", path=out,
                              fix="choose another file name")
        if not overwrite:
            raise OutputError("the output file exists", path=out, fix="choose another name, or allow overwriting")
        if not os.access(out, os.W_OK):
            raise OutputError("the output file exists and is not writable", path=out,
                              fix="choose another name or fix its permissions")
    return out
