"""Pass 1 of a slide run, the one engine behind ``histopan segment`` and ``histopan batch``.

A run's tissue tiles go through in fixed batches, each in three steps:

- :func:`read_batch`: the core + halo windows of the batch's tiles, read from the slide (dask, in this
  process);
- :func:`infer_batch`: the network on those windows (:class:`~histopan.inference.TileInferencer`);
- :func:`record_tile`: each tile's maps post-processed into its :class:`~histopan.stitching.TileRecord`
  (:func:`~histopan.postprocess.process_tile`, with the glass rule of the run's tissue region, which the
  store keeps), which the caller saves in the store; a tile whose
  post-processing runs longer than :data:`SLOW_TILE_SECONDS` is reported by name while it runs
  (:class:`SlowWatch`).

``segment`` runs them in one process (reading one batch ahead and post-processing one batch behind the
network), ``batch`` as Dask tasks on worker processes.  Worker processes reuse what they load across tasks
through the per-process caches here, the only ones there are: :func:`cached_model` (checked against its
sha256), :func:`cached_inferencer` and :func:`cached_reader`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from histopan.errors import ModelError
from histopan.postprocess import ProbabilityMaps, process_tile
from histopan.stitching import IdScheme, TileRecord
from histopan.tiling import TileGrid, compute_local, tile_stack

log = logging.getLogger(__name__)

__all__ = ["SLOW_TILE_SECONDS", "ModelRef", "SlowWatch", "Timer", "cached_inferencer", "cached_model",
           "cached_reader", "describe_tile", "infer_batch", "read_batch", "record_tile"]


class Timer:
    """Seconds spent per stage of a run, summed."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


@dataclass(frozen=True)
class ModelRef:
    """A loaded model without its network: where it lives, its weights' sha256 and its config.

    What a pickled run plan carries instead of the :class:`~histopan.model.checkpoint.LoadedModel`, so
    shipping a plan to another process never copies the weights; that process loads the network from
    ``path`` itself (:func:`cached_model` checks ``weights_sha256``).
    """

    path: Path
    weights_sha256: str
    config: Any  # ModelConfig

    @classmethod
    def of(cls, model: Any) -> ModelRef:
        return model if isinstance(model, ModelRef) else cls(Path(model.path), model.weights_sha256, model.config)


# ------------------------------------------------------------------------------------------------ pass 1


def read_batch(reader: Any, grid: TileGrid, batch: Sequence[int], workers: int = 1) -> tuple[np.ndarray, float]:
    """The core + halo windows of the tiles ``batch`` as one (N, T, T, 3) uint8 array (dask, in this process:
    ``workers`` threads, the synchronous scheduler for one), and the seconds it took."""
    t = time.perf_counter()
    windows = compute_local(tile_stack(reader, grid, [int(i) for i in batch]), workers)
    return windows, time.perf_counter() - t


def infer_batch(inferencer: Any, windows: np.ndarray) -> tuple[list[ProbabilityMaps], float]:
    """The network's maps of each window, and the seconds it took (the GPU's work included)."""
    import torch

    t = time.perf_counter()
    maps = inferencer.predict(windows)
    if inferencer.device.type == "cuda":
        torch.cuda.synchronize(inferencer.device)
    return maps, time.perf_counter() - t


#: a tile still being post-processed after this many seconds is reported, and again every such period
SLOW_TILE_SECONDS = 60.0


def describe_tile(grid: TileGrid, index: int) -> str:
    """Where tile ``index`` lies, for a message: its grid cell and its core box in level-0 pixels."""
    tile = grid[int(index)]
    x, y, w, h = (int(round(v)) for v in tile.core_level0)
    return f"tile {int(index)} (row {tile.row}, column {tile.col}; level-0 pixels x {x}-{x + w}, y {y}-{y + h})"


class SlowWatch:
    """Reports, from a timer thread, work that runs longer than ``after`` seconds while it is still running
    (a warning naming ``what`` every ``after`` seconds), so one slow window cannot stall a slide unseen; use
    as a context manager around the work.  ``reports`` counts the warnings given."""

    def __init__(self, what: str, after: float = SLOW_TILE_SECONDS) -> None:
        self.what = what
        self.after = float(after)
        self.reports = 0
        self._started = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._running = False

    def _arm(self) -> None:
        self._timer = threading.Timer(self.after, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._running:
                return
            self.reports += 1
            log.warning("post-processing of %s is still running after %.0f s; the run goes on (a window this "
                        "slow is unusual: look at it in the QC report)", self.what, time.perf_counter() - self._started)
            self._arm()

    def __enter__(self) -> SlowWatch:
        self._started = time.perf_counter()
        self._running = True
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running = False
            if self._timer is not None:
                self._timer.cancel()
        if self.reports:
            log.warning("post-processing of %s finished after %.0f s", self.what, time.perf_counter() - self._started)


def record_tile(maps: ProbabilityMaps, grid: TileGrid, index: int, model_config: Any,
                ids: IdScheme, slow_after: float = SLOW_TILE_SECONDS, tissue: Any = None) -> tuple[TileRecord, float]:
    """Tile ``index``'s record from its window's maps, and the seconds the post-processing took.  A tile
    still being post-processed after ``slow_after`` seconds is reported while it runs (:class:`SlowWatch`).
    ``tissue`` is the run's tissue region (:class:`~histopan.slide.tissue.TissueRegion`, the store's): outside
    it the glass rule makes the tissue classes background; None: no glass rule."""
    t = time.perf_counter()
    tile = grid[int(index)]
    with SlowWatch(describe_tile(grid, index), slow_after):
        region = None if tissue is None else tissue.sample_box(*tile.read.as_tuple(), grid.downsample)
        record = process_tile(maps, tile, grid, model_config, ids, tissue=region)
    return record, time.perf_counter() - t


# ------------------------------------------------------------------------------------- per-process caches

_LOCK = threading.RLock()
_MODELS: dict[tuple[Any, ...], Any] = {}
_INFERENCERS: dict[tuple[Any, ...], Any] = {}
_READERS: OrderedDict[tuple[str, float | None], Any] = OrderedDict()
_MAX_READERS = 8


def cached_model(model: str | PathLike[str] | Any) -> Any:
    """The :class:`~histopan.model.checkpoint.LoadedModel` of ``model``, loaded once per process.

    A LoadedModel is returned as it is; a :class:`ModelRef` is loaded from its path once and must still have
    the weights it was made from; a name or folder is loaded once per (folder, its files' modification times,
    sizes and inodes), so a model saved again is reloaded.
    """
    from histopan.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, LoadedModel, load_model, resolve_model_path

    if isinstance(model, LoadedModel):
        return model
    with _LOCK:
        if isinstance(model, ModelRef):
            key: tuple[Any, ...] = ("ref", str(model.path), model.weights_sha256)
            if key not in _MODELS:
                loaded = load_model(model.path)
                if loaded.weights_sha256 != model.weights_sha256:
                    raise ModelError("the model's weights changed on disk after the run was planned",
                                     path=model.path, value=loaded.weights_sha256[:12],
                                     fix="do not replace a model while a run uses it; rerun")
                _MODELS[key] = loaded
            return _MODELS[key]
        folder = resolve_model_path(model)
        weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size, f.stat().st_ino) if f.is_file() else None
                      for f in (weights, config))
        key = ("folder", str(Path(folder).resolve()), *stamp)
        if key not in _MODELS:
            for old in [k for k in _MODELS if k[:2] == key[:2]]:
                del _MODELS[old]
            _MODELS[key] = load_model(folder)
        return _MODELS[key]


def cached_inferencer(model: Any, device: str | None, batch_size: int, tta: bool = False) -> Any:
    """A :class:`~histopan.inference.TileInferencer` of ``model`` (a ModelRef or LoadedModel) per device,
    batch size and TTA setting, made once per process."""
    from histopan.inference import TileInferencer

    ref = ModelRef.of(model)
    key = (str(ref.path), ref.weights_sha256, device, batch_size, tta)
    with _LOCK:
        if key not in _INFERENCERS:
            _INFERENCERS[key] = TileInferencer(cached_model(model), device=device, batch_size=batch_size, tta=tta)
        return _INFERENCERS[key]


def cached_reader(path: str | PathLike[str], mpp: float | None) -> Any:
    """The slide ``path`` (with the mpp override ``mpp``) opened once per process; the least recently used of
    more than a few open slides is closed."""
    from histopan.slide import open_slide

    key = (str(path), mpp)
    with _LOCK:
        if key in _READERS:
            _READERS.move_to_end(key)
            return _READERS[key]
        reader = open_slide(path, mpp=mpp)
        _READERS[key] = reader
        while len(_READERS) > _MAX_READERS:
            _READERS.popitem(last=False)[1].close()
        return reader
