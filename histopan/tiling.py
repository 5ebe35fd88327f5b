"""Tile geometry at a target resolution and lazy dask arrays of tiles.

A :class:`TileGrid` cuts a slide, resampled to a target microns per pixel (mpp), into *cores* of
``tile x tile`` target pixels on a regular grid (optionally shifted by ``origin``).  Each core is grown by a
``halo`` of context on every side; the grown box, clipped at the slide borders, is the tile's *read* box.
Cores are half-open boxes that partition the slide: every target pixel belongs to exactly one core, so
exactly one tile owns it (:meth:`TileGrid.owner_of`, :meth:`TileGrid.owns`).  Tiles are numbered row-major.

Coordinates: target pixels are integers on the target-mpp grid; level-0 coordinates are floats, target
pixels times :attr:`TileGrid.downsample` (``mpp / base_mpp``).  Boxes are ``(x, y, w, h)``.

The grid itself is pure geometry and touches no file.  :func:`tile_stack`, :func:`mosaic` and
:func:`to_dask` wrap a slide reader into dask arrays with one task per tile; nothing is read until the
array is computed.  Inside the graph the reader travels as a small reference (its path and mpp) that each
worker process reopens once and caches, so the graph runs on the threaded scheduler and on
``dask.distributed`` alike.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from histopan.checks import check_mpp
from histopan.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

# Tolerance when converting level-0 sizes to target pixels, so that e.g. 2220 * 0.499 / 0.499 floors to 2220.
_EPS = 1e-9


@dataclass(frozen=True)
class Box:
    """A half-open integer box ``[x, x + w) x [y, y + h)`` in target pixels."""

    x: int
    y: int
    w: int
    h: int

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of this box in an array whose origin is the target-pixel origin."""
        return slice(self.y, self.y1), slice(self.x, self.x1)

    def slices_in(self, outer: Box) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of this box inside an array that holds the box ``outer``."""
        return slice(self.y - outer.y, self.y1 - outer.y), slice(self.x - outer.x, self.x1 - outer.x)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    ``cell`` is the unclipped grid cell, ``core = cell`` clipped to the slide, ``window = cell`` grown by the
    halo (always ``tile + 2 * halo`` square, may stick out of the slide) and ``read = window`` clipped to the
    slide, i.e. the core plus the halo, clipped at the borders.  ``core_level0`` and ``read_level0`` are the
    same boxes in level-0 pixels (floats).  ``core_in_read`` crops the core out of an array holding the read
    box; ``read_in_window``/``core_in_window`` place them in a padded ``window``-sized array (see
    :func:`tile_stack`).
    """

    index: int
    row: int
    col: int
    cell: Box
    core: Box
    window: Box
    read: Box
    core_level0: tuple[float, float, float, float]
    read_level0: tuple[float, float, float, float]

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        return self.core.slices_in(self.read)

    @property
    def read_in_window(self) -> tuple[slice, slice]:
        return self.read.slices_in(self.window)

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        return self.core.slices_in(self.window)


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be a whole number of pixels", value=value, fix=fix)
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}", value=value, fix=fix)


@dataclass(frozen=True)
class TileGrid:
    """A grid of core + halo tiles over a slide resampled to ``mpp`` microns per pixel.

    Parameters are the slide's level-0 size and mpp (``base_mpp``), the target ``mpp``, the core size
    ``tile`` and the ``halo`` (target pixels), and an optional grid ``origin`` ``(x, y)``: grid lines lie at
    ``origin + k * tile`` (taken modulo ``tile``), so a non-zero origin gives partial cores along the top and
    left borders.  The slide measures ``floor(level-0 size * base_mpp / mpp)`` target pixels.
    """

    level0_width: int
    level0_height: int
    base_mpp: float
    mpp: float
    tile: int
    halo: int
    origin: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        _check_int("level-0 width", self.level0_width, 1, "pass the slide's level-0 dimensions")
        _check_int("level-0 height", self.level0_height, 1, "pass the slide's level-0 dimensions")
        check_mpp(self.base_mpp, what="the slide's mpp", fix="pass the slide's true mpp (--mpp)")
        check_mpp(self.mpp, what="the target mpp", fix="use a target mpp such as 0.5", error=ConfigError)
        _check_int("tile size", self.tile, 1, "use a tile size such as 512")
        _check_int("halo", self.halo, 0, "use a halo such as 32 (0 for none)")
        if self.halo >= self.tile:
            raise ConfigError(f"halo must be smaller than the tile size {self.tile}", value=self.halo,
                              fix="use a halo below half the tile size, e.g. tile 512 with halo 64")
        if (not isinstance(self.origin, tuple) or len(self.origin) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in self.origin)):
            raise ConfigError("grid origin must be a pair of whole numbers (x, y)", value=self.origin,
                              fix="pass origin=(0, 0) for an unshifted grid")
        object.__setattr__(self, "origin", (int(self.origin[0]) % self.tile, int(self.origin[1]) % self.tile))
        if self.width < 1 or self.height < 1:
            raise ConfigError(
                f"the slide ({self.level0_width} x {self.level0_height} px at {self.base_mpp} mpp) is smaller "
                f"than one pixel at the target mpp", value=self.mpp, fix="use a finer (smaller) target mpp")

    @classmethod
    def for_slide(cls, reader: Any, mpp: float, tile: int, halo: int,
                  origin: tuple[int, int] = (0, 0)) -> TileGrid:
        """The grid for a slide reader (uses ``reader.dimensions`` and ``reader.require_mpp()``)."""
        width, height = reader.dimensions
        return cls(int(width), int(height), float(reader.require_mpp()), mpp, tile, halo, tuple(origin))

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def downsample(self) -> float:
        """Level-0 pixels per target pixel."""
        return self.mpp / self.base_mpp

    @functools.cached_property
    def width(self) -> int:
        """Slide width in target pixels."""
        return int(math.floor(self.level0_width * self.base_mpp / self.mpp + _EPS))

    @functools.cached_property
    def height(self) -> int:
        """Slide height in target pixels."""
        return int(math.floor(self.level0_height * self.base_mpp / self.mpp + _EPS))

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in target pixels."""
        return (self.height, self.width)

    @functools.cached_property
    def _col_starts(self) -> np.ndarray:
        return _cell_starts(self.width, self.tile, self.origin[0])

    @functools.cached_property
    def _row_starts(self) -> np.ndarray:
        return _cell_starts(self.height, self.tile, self.origin[1])

    @property
    def n_cols(self) -> int:
        return len(self._col_starts)

    @property
    def n_rows(self) -> int:
        return len(self._row_starts)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def row_chunks(self) -> tuple[int, ...]:
        """Core heights, top to bottom (the mosaic's row chunks)."""
        return tuple(int(v) for v in np.diff(_core_edges(self._row_starts, self.tile, self.height)))

    @property
    def col_chunks(self) -> tuple[int, ...]:
        """Core widths, left to right (the mosaic's column chunks)."""
        return tuple(int(v) for v in np.diff(_core_edges(self._col_starts, self.tile, self.width)))

    # ------------------------------------------------------------------------------------------ tiles
    def tile_at(self, row: int, col: int) -> Tile:
        """The tile in grid row ``row`` and column ``col``."""
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise ConfigError(f"tile ({row}, {col}) is outside the {self.n_rows} x {self.n_cols} grid",
                              value=(row, col), fix="use 0 <= row < n_rows and 0 <= col < n_cols")
        t, h = self.tile, self.halo
        cx, cy = int(self._col_starts[col]), int(self._row_starts[row])
        cell = Box(cx, cy, t, t)
        core = _clip(cell, self.width, self.height)
        window = Box(cx - h, cy - h, t + 2 * h, t + 2 * h)
        read = _clip(window, self.width, self.height)
        ds = self.downsample
        return Tile(
            index=row * self.n_cols + col, row=row, col=col, cell=cell, core=core, window=window, read=read,
            core_level0=tuple(v * ds for v in core.as_tuple()),  # type: ignore[arg-type]
            read_level0=tuple(v * ds for v in read.as_tuple()),  # type: ignore[arg-type]
        )

    def __getitem__(self, index: int) -> Tile:
        """The tile with row-major index ``index`` (negative indices count from the end)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ConfigError("tile indices must be whole numbers", value=index,
                              fix="index the grid with an int, e.g. grid[0]")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise ConfigError(f"tile index out of range for a grid of {n} tiles", value=int(index),
                              fix=f"use an index in 0..{n - 1}")
        return self.tile_at(*divmod(i, self.n_cols))

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self)):
            yield self[i]

    def boxes(self, kind: Literal["core", "read"] = "core", level0: bool = True) -> np.ndarray:
        """``(N, 4)`` array of ``(x, y, w, h)`` boxes of every tile in row-major order.

        ``level0=True`` gives float level-0 boxes (what ``histopan.slide.tissue.tissue_fraction`` takes),
        ``level0=False`` integer target-pixel boxes.
        """
        if kind not in ("core", "read"):
            raise ConfigError("box kind must be 'core' or 'read'", value=kind, fix="pass kind='core'")
        pad = 0 if kind == "core" else self.halo
        xs = _core_edges(self._col_starts, self.tile, self.width)
        ys = _core_edges(self._row_starts, self.tile, self.height)
        x0 = np.maximum(xs[:-1] - pad, 0) if pad else xs[:-1]
        x1 = np.minimum(xs[1:] + pad, self.width) if pad else xs[1:]
        y0 = np.maximum(ys[:-1] - pad, 0) if pad else ys[:-1]
        y1 = np.minimum(ys[1:] + pad, self.height) if pad else ys[1:]
        gy0, gx0 = np.meshgrid(y0, x0, indexing="ij")
        gy1, gx1 = np.meshgrid(y1, x1, indexing="ij")
        out = np.stack([gx0.ravel(), gy0.ravel(), (gx1 - gx0).ravel(), (gy1 - gy0).ravel()], axis=1)
        return out.astype(np.float64) * self.downsample if level0 else out.astype(np.int64)

    # -------------------------------------------------------------------------------------- ownership
    def owner_of(self, y: Any, x: Any) -> tuple[Any, Any]:
        """``(row, col)`` of the tile whose core contains the target-pixel point ``(y, x)``.

        Works on scalars and on arrays (then returns arrays).  Cores are half-open, so a point on a grid
        line belongs to the core below/right of it and every point of ``[0, height) x [0, width)`` has
        exactly one owner.  Points outside the slide raise :class:`~histopan.errors.ConfigError`.
        """
        ya, xa = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
        outside = ~((ya >= 0) & (ya < self.height) & (xa >= 0) & (xa < self.width))
        if np.any(outside):
            bad = (ya[outside].ravel()[0], xa[outside].ravel()[0]) if ya.ndim or xa.ndim else (float(ya), float(xa))
            raise ConfigError(f"point (y, x) lies outside the {self.height} x {self.width} target-pixel slide",
                              value=bad, fix="only ask for owners of points inside the slide")
        rows = np.searchsorted(_core_edges(self._row_starts, self.tile, self.height), ya, side="right") - 1
        cols = np.searchsorted(_core_edges(self._col_starts, self.tile, self.width), xa, side="right") - 1
        if rows.ndim == 0 and cols.ndim == 0:
            return int(rows), int(cols)
        return rows, cols

    def owns(self, tile: Tile, y: Any, x: Any) -> Any:
        """Whether ``tile``'s (half-open) core contains the target-pixel point(s) ``(y, x)``."""
        c = tile.core
        ya, xa = np.asarray(y), np.asarray(x)
        inside = (ya >= c.y) & (ya < c.y1) & (xa >= c.x) & (xa < c.x1)
        return bool(inside) if inside.ndim == 0 else inside

    # ------------------------------------------------------------------------------------- neighbourhood
    def neighbours(self, tile: Tile) -> list[Tile]:
        """The up to 8 grid neighbours of ``tile``, in row-major order: with a halo of at most half the tile
        size, every tile whose read box can overlap ``tile``'s."""
        out = []
        for r in range(max(tile.row - 1, 0), min(tile.row + 2, self.n_rows)):
            for c in range(max(tile.col - 1, 0), min(tile.col + 2, self.n_cols)):
                if (r, c) != (tile.row, tile.col):
                    out.append(self.tile_at(r, c))
        return out

    def tiles_reaching(self, box: Box) -> list[Tile]:
        """The tiles whose read box can reach ``box`` (target pixels, inside the slide): those whose core lies
        within one halo of it, in row-major order."""
        h = self.halo
        r0, c0 = self.owner_of(max(box.y - h, 0), max(box.x - h, 0))
        r1, c1 = self.owner_of(min(box.y1 + h, self.height) - 1, min(box.x1 + h, self.width) - 1)
        return [self.tile_at(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def _cell_starts(size: int, tile: int, origin: int) -> np.ndarray:
    """Starts of the grid cells (lines at ``origin + k * tile``) that overlap ``[0, size)``."""
    first = origin - tile if origin > 0 else 0
    return np.arange(first, size, tile, dtype=np.int64)


def _core_edges(starts: np.ndarray, tile: int, size: int) -> np.ndarray:
    """Core edges along one axis: ``n + 1`` increasing values from 0 to ``size``."""
    edges = np.clip(np.append(starts, starts[-1] + tile), 0, size)
    return edges


def _clip(box: Box, width: int, height: int) -> Box:
    x0, y0 = max(box.x, 0), max(box.y, 0)
    x1, y1 = min(box.x1, width), min(box.y1, height)
    return Box(x0, y0, x1 - x0, y1 - y0)


# ------------------------------------------------------------------------------------------- dask arrays


class _ReaderRef:
    """A picklable handle on a slide reader: pickles as ``(path, mpp, identity)``.

    In the process that built the graph it holds the caller's reader; elsewhere (a distributed worker) the
    first use takes the process's shared reader of the slide (:func:`histopan.engine.cached_reader`), so a
    worker opens each slide once, not once per task.  A reopened slide whose identity differs from the one
    the graph was built for raises :class:`~histopan.errors.SlideError`.
    """

    def __init__(self, path: str, mpp: float | None, identity: Any, reader: Any = None) -> None:
        self.path, self.mpp, self.identity = path, mpp, identity
        self._reader = reader

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ReaderRef, (self.path, self.mpp, self.identity))

    def get(self) -> Any:
        if self._reader is None:
            self._reader = _open_cached(self.path, self.mpp, self.identity)
        return self._reader


def _open_cached(path: str, mpp: float | None, identity: Any) -> Any:
    """The process's shared reader of the slide (:func:`histopan.engine.cached_reader`), checked against the
    identity the graph was built for."""
    from histopan.engine import cached_reader

    reader = cached_reader(path, mpp)
    if identity is not None and reader.identity != identity:
        raise SlideError("the slide changed on disk after the tile graph was built", path=path,
                         value=reader.identity, fix="rebuild the dask array from the current file")
    return reader


def _reader_ref(reader: Any) -> _ReaderRef:
    return _ReaderRef(str(reader.path), reader.mpp, getattr(reader, "identity", None), reader)


def _read_box(ref: _ReaderRef, box_level0: tuple[float, ...], size: tuple[int, int], mpp: float) -> np.ndarray:
    x, y, w, h = box_level0
    return ref.get().read_region(x, y, w, h, mpp=mpp, out_size=size)


def _read_window(ref: _ReaderRef, tile: Tile, mpp: float, fill: int) -> np.ndarray:
    pixels = _read_box(ref, tile.read_level0, (tile.read.w, tile.read.h), mpp)
    if tile.read == tile.window:  # inner tiles: no padding, no copy
        return pixels[None]
    out = np.full((1, tile.window.h, tile.window.w, 3), fill, dtype=np.uint8)
    rows, cols = tile.read_in_window
    out[0, rows, cols] = pixels
    return out


def _check_grid(reader: Any, grid: TileGrid) -> None:
    dims = tuple(int(v) for v in reader.dimensions)
    if dims != (grid.level0_width, grid.level0_height):
        raise ConfigError(
            f"the tile grid was made for a {grid.level0_width} x {grid.level0_height} slide, not this "
            f"{dims[0]} x {dims[1]} one", path=getattr(reader, "path", None),
            fix="build the grid with TileGrid.for_slide(reader, ...)")
    slide_mpp = float(reader.require_mpp())
    if not math.isclose(slide_mpp, grid.base_mpp, rel_tol=1e-9):
        raise ConfigError(f"the tile grid assumes {grid.base_mpp} mpp but the slide has {slide_mpp}",
                          path=getattr(reader, "path", None), fix="build the grid with TileGrid.for_slide")


def _graph_name(prefix: str, ref: _ReaderRef, *parts: Any) -> str:
    from dask.base import tokenize

    return f"{prefix}-{tokenize(ref.path, ref.mpp, ref.identity, *parts)}"


def tile_stack(reader: Any, grid: TileGrid, tiles: Sequence[int] | None = None, fill: int = 255):
    """A lazy ``(N, tile + 2*halo, tile + 2*halo, 3)`` uint8 dask array of tile windows, one chunk per tile.

    Chunk ``i`` is the window of tile ``tiles[i]`` (all tiles, row-major, when ``tiles`` is None): the read
    box (core + halo, clipped at the slide borders) at ``grid.tile_at(...).read_in_window``, ``fill``
    (white) outside the slide.  Crop the core with ``tile.core_in_window``.  One task per tile; building the
    array reads nothing.
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    _check_grid(reader, grid)
    if isinstance(fill, bool) or not isinstance(fill, (int, np.integer)) or not 0 <= fill <= 255:
        raise ConfigError("fill must be a uint8 value 0..255", value=fill, fix="use fill=255 (white)")
    indices = _tile_indices(grid, tiles)
    ref = _reader_ref(reader)
    size = grid.tile + 2 * grid.halo
    name = _graph_name("histopan-tiles", ref, dataclasses.astuple(grid), indices, int(fill))
    dsk = {(name, i, 0, 0, 0): (_read_window, ref, grid[t], grid.mpp, int(fill)) for i, t in enumerate(indices)}
    chunks = (tuple(1 for _ in indices), (size,), (size,), (3,))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks, dtype=np.uint8, meta=np.empty((0, 0, 0, 0), dtype=np.uint8))


def compute_local(array, workers: int = 1):
    """Compute a tile array in this process: ``workers`` threads, or no thread pool at all for one worker.

    Dask's synchronous scheduler runs the tasks in the calling thread; with one worker a thread pool adds
    only its hand-off cost per task (about 0.6 ms, measured against a 4 ms tile read in
    ``benchmarks/bench_read.py``).
    """
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError("workers must be a positive integer", value=workers, fix="use workers=1 or more")
    if workers == 1:
        return array.compute(scheduler="synchronous")
    return array.compute(scheduler="threads", num_workers=int(workers))


def mosaic(reader: Any, grid: TileGrid):
    """The whole slide at ``grid.mpp`` as a lazy ``(height, width, 3)`` uint8 dask array, chunks = cores.

    Block ``(r, c)`` is the core of tile ``(r, c)``; one task per tile, nothing read while building.  It
    equals one ``read_region`` of the whole slide at the same mpp.
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    _check_grid(reader, grid)
    ref = _reader_ref(reader)
    name = _graph_name("histopan-mosaic", ref, dataclasses.astuple(grid))
    dsk = {}
    for tile in grid:
        dsk[(name, tile.row, tile.col, 0)] = (_read_box, ref, tile.core_level0, (tile.core.w, tile.core.h),
                                              grid.mpp)
    chunks = (grid.row_chunks, grid.col_chunks, (3,))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), dtype=np.uint8))


def to_dask(reader: Any, mpp: float, tile: int, halo: int, tiles: Sequence[int] | None = None, *,
            origin: tuple[int, int] = (0, 0), view: Literal["stack", "mosaic"] = "stack", fill: int = 255):
    """Tile a slide reader at ``mpp``: returns ``(dask_array, grid)``.

    ``view="stack"`` gives :func:`tile_stack` (core + halo windows, optionally only the tiles with the
    given row-major indices, e.g. from ``histopan.slide.tissue.select_tiles``); ``view="mosaic"`` gives
    :func:`mosaic` (the cores assembled into the slide at ``mpp``; ``tiles`` must then be None).
    """
    grid = TileGrid.for_slide(reader, mpp, tile, halo, origin)
    if view == "stack":
        return tile_stack(reader, grid, tiles, fill), grid
    if view == "mosaic":
        if tiles is not None:
            raise ConfigError("the mosaic view always covers every tile", value="tiles=...",
                              fix="use view='stack' to read only selected tiles")
        return mosaic(reader, grid), grid
    raise ConfigError("view must be 'stack' or 'mosaic'", value=view, fix="pass view='stack'")


def _tile_indices(grid: TileGrid, tiles: Sequence[int] | None) -> tuple[int, ...]:
    n = len(grid)
    if tiles is None:
        return tuple(range(n))
    arr = np.asarray(tiles)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError("tiles must be a 1-D list of row-major tile indices", value=tiles if arr.size < 8
                          else f"array of shape {arr.shape}", fix="pass e.g. select_tiles(...) output")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ConfigError(f"tile index out of range for a grid of {n} tiles",
                          value=int(arr.min() if arr.min() < 0 else arr.max()), fix=f"use indices in 0..{n - 1}")
    return tuple(int(v) for v in arr)
