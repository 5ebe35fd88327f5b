"""A run's inputs checked before anything heavy is loaded: ``histopan segment`` and ``batch`` call these first.

Torch takes seconds to import (10-27 s on a cold machine) and the model longer to load, so a mistyped path, a
complete store without ``--overwrite``, a bad ``--mpp`` or a wrong model folder is reported here, in a
fraction of a second, with the same one-line errors the pipeline would raise later.  Nothing here imports
torch or zarr (a test asserts it); the pipeline repeats every check, so library callers are covered too.
"""

from __future__ import annotations

from os import PathLike

from histopan.checks import check_mpp, check_output
from histopan.errors import ConfigError
from histopan.model.folder import ModelFolder, check_model_folder
from histopan.outputs import check_output_state

__all__ = ["check_batch", "check_segment", "check_slide"]

MPP_OPTION_FIX = "pass e.g. --mpp 0.25 for a 40x slide or --mpp 0.5 for 20x"


def check_slide(slide: str | PathLike[str], mpp: float | None = None) -> None:
    """Open the slide (readable, a known format, not truncated) and make sure its microns per pixel are known
    (from its metadata or ``mpp``); raises the :class:`~histopan.errors.SlideError` the run would."""
    from histopan.slide import open_slide

    with open_slide(slide, mpp=mpp) as reader:
        reader.require_mpp()


def check_segment(slide: str | PathLike[str], out: str | PathLike[str], *, model: str, mpp: float | None,
                  overwrite: bool) -> ModelFolder:
    """Every check of a ``histopan segment`` run that needs no torch, in the order a user meets them: ``--mpp``,
    the output path, the slide, the model folder, then what is at the output
    (:func:`histopan.outputs.check_output_state`; call this under the output's lock)."""
    if mpp is not None:
        check_mpp(mpp, what="--mpp", fix=MPP_OPTION_FIX, error=ConfigError)
    out = check_output(out, folder=True, suffixes=(".zarr",))
    check_slide(slide, mpp)
    folder = check_model_folder(model)
    check_output_state(out, overwrite)
    return folder


def check_batch(outdir: str | PathLike[str], *, model: str) -> ModelFolder:
    """The checks of a ``histopan batch`` run that need no torch: the output folder (its parent must exist) and
    the model folder.  Slides are checked one by one on the cluster (a bad one fails alone), and complete
    stores are skipped, not refused."""
    check_output(outdir, folder=True)
    return check_model_folder(model)
