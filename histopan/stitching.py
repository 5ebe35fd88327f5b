"""Seam-free stitching of per-tile nucleus labels into slide-level instances (pure numpy).

Each tile is segmented on its *read* box (core + halo).  Stitching works in two steps:

1. :func:`own_objects` keeps the nuclei a tile *owns*: those whose centroid lies in the tile's core (cores are
   half-open and partition the slide, so every nucleus is owned by exactly one tile).  An owned nucleus is
   kept whole, also where it reaches into the halo, and gets a global id that depends only on the tile's
   index and the nucleus' rank inside the tile (raster order of centroids), never on scheduling.  A nucleus
   that touches the edge of the read box where that edge is not the slide border may continue beyond what
   the tile saw: it is larger than the halo, is flagged ``cut`` and reported, never silently dropped.
2. :func:`paint` draws the owned objects of every tile whose read box meets an output region into that
   region.  Objects are drawn in ascending global id and only fill pixels that are still free, so there are
   no overlapping instances and a nucleus that crosses a core border is drawn whole.

Because step 2 works per output region (the store's chunks), chunk writers never share a chunk, and the
chunk grid does not need to match the tile grid.

Slide-level, over the :class:`TileRecord` of every processed tile (one typed record per tile: its owned
nuclei, their measurements and its stuff core): :func:`deduplicate_tiles` decides which nuclei to keep in
ascending tile order, and :class:`ChunkPainter` paints and fuses the output chunks from the records of the
tiles that reach each chunk.  Records come from a ``load(index)`` callable, so nothing here opens files.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from histopan.errors import HistopanError
from histopan.panoptic import fuse
from histopan.tiling import Box, Tile, TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdScheme:
    """Deterministic global ids: ``id = tile_index * stride + rank + 1`` (0 stays background).

    ``stride`` bounds the number of nuclei one tile can own: it is derived from the read-window area and the
    smallest allowed nucleus area, so it can never overflow for valid post-processing output.
    """

    stride: int
    n_tiles: int

    @classmethod
    def for_grid(cls, n_tiles: int, window_px: int, min_area_px: float) -> IdScheme:
        per_tile = int(math.ceil(window_px / max(float(min_area_px), 1.0))) + 1
        stride = 1 << max(1, (per_tile - 1).bit_length())
        if n_tiles * stride >= np.iinfo(np.uint32).max:
            raise HistopanError(
                f"{n_tiles} tiles x up to {stride} nuclei each do not fit in uint32 nucleus ids",
                value=n_tiles * stride,
                fix="raise the post-processing min_area_um2 or use a larger tile size",
            )
        return cls(stride=stride, n_tiles=n_tiles)

    @classmethod
    def for_tiles(cls, grid: TileGrid, min_area_um2: float) -> IdScheme:
        """The ids of a tile grid whose windows hold nuclei of at least ``min_area_um2`` (one pixel at least)."""
        min_area_px = max(min_area_um2 / grid.mpp**2, 1.0)
        return cls.for_grid(len(grid), (grid.tile + 2 * grid.halo) ** 2, min_area_px)

    def global_ids(self, tile_index: int, count: int) -> np.ndarray:
        if count > self.stride:
            raise HistopanError(f"tile {tile_index} owns {count} nuclei, more than the id stride allows",
                                value=count, fix="raise min_area_um2 in the model's post-processing config")
        return (np.uint32(tile_index) * np.uint32(self.stride) + np.arange(1, count + 1, dtype=np.uint32))

    def tile_of(self, ids: np.ndarray) -> np.ndarray:
        """The index of the tile that owns each global id."""
        return (np.asarray(ids, dtype=np.int64) - 1) // self.stride


@dataclass(frozen=True)
class OwnedObjects:
    """The nuclei one tile owns, in slide (target-pixel) coordinates.

    ``bboxes`` rows are ``(y0, x0, y1, x1)`` half-open; ``masks`` holds each object's boolean mask over its
    bbox, flattened and concatenated (``offsets[i]:offsets[i + 1]``).  ``local_ids`` are the ids the objects
    had in the tile's own label image (to look up per-object properties).
    """

    tile_index: int
    ids: np.ndarray  # uint32 (n,)
    local_ids: np.ndarray  # int64 (n,)
    bboxes: np.ndarray  # int64 (n, 4)
    offsets: np.ndarray  # int64 (n + 1,)
    masks: np.ndarray  # bool (sum of bbox areas,)
    centroids: np.ndarray  # float64 (n, 2): (y, x) in target pixels
    cut: np.ndarray  # bool (n,)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def mask(self, i: int) -> np.ndarray:
        y0, x0, y1, x1 = self.bboxes[i]
        return self.masks[self.offsets[i]:self.offsets[i + 1]].reshape(int(y1 - y0), int(x1 - x0))

    @classmethod
    def empty(cls, tile_index: int) -> OwnedObjects:
        return cls(tile_index, np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros((0, 4), np.int64),
                   np.zeros(1, np.int64), np.zeros(0, bool), np.zeros((0, 2)), np.zeros(0, bool))

    def subset(self, keep: np.ndarray) -> OwnedObjects:
        """The objects where ``keep`` is True (same order)."""
        keep = np.asarray(keep, bool)
        if keep.all():
            return self
        masks = [self.masks[self.offsets[i]:self.offsets[i + 1]] for i in np.flatnonzero(keep)]
        sizes = np.array([m.size for m in masks], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return OwnedObjects(self.tile_index, self.ids[keep], self.local_ids[keep], self.bboxes[keep], offsets,
                            np.concatenate(masks) if masks else np.zeros(0, bool), self.centroids[keep],
                            self.cut[keep])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``); :meth:`from_arrays` restores the object."""
        return {"tile_index": np.array(self.tile_index), "ids": self.ids, "local_ids": self.local_ids,
                "bboxes": self.bboxes, "offsets": self.offsets, "masks": np.packbits(self.masks),
                "n_mask": np.array(self.masks.size), "centroids": self.centroids, "cut": self.cut}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> OwnedObjects:
        n_mask = int(arrays["n_mask"])
        masks = np.unpackbits(arrays["masks"], count=n_mask).astype(bool)
        return cls(int(arrays["tile_index"]), arrays["ids"].astype(np.uint32), arrays["local_ids"],
                   arrays["bboxes"], arrays["offsets"], masks, arrays["centroids"], arrays["cut"].astype(bool))


def own_objects(
    labels: np.ndarray,
    read_box: tuple[int, int, int, int],
    core_box: tuple[int, int, int, int],
    slide_shape: tuple[int, int],
    tile_index: int,
    ids: IdScheme,
) -> OwnedObjects:
    """Keep the nuclei of one tile whose centroid lies in its core, with global ids.

    ``labels`` is the tile's instance image over its read box; boxes are ``(x, y, w, h)`` in slide target
    pixels; ``slide_shape`` is ``(height, width)``.  Centroids are the mean pixel centre of each object.
    """
    rx, ry, rw, rh = read_box
    cx, cy, cw, ch = core_box
    if labels.shape != (rh, rw):
        raise ValueError(f"labels shape {labels.shape} does not match the read box {rh} x {rw}")
    objects = ndimage.find_objects(labels)
    if not objects:
        return OwnedObjects.empty(tile_index)
    present = np.array([s is not None for s in objects])
    local = np.flatnonzero(present) + 1
    if local.size == 0:
        return OwnedObjects.empty(tile_index)
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(labels, dtype=np.uint8), labels, local),
                           dtype=np.float64).reshape(-1, 2)
    gy = centroids[:, 0] + ry
    gx = centroids[:, 1] + rx
    owned = (gy >= cy) & (gy < cy + ch) & (gx >= cx) & (gx < cx + cw)
    if not owned.any():
        return OwnedObjects.empty(tile_index)
    local = local[owned]
    gy, gx = gy[owned], gx[owned]
    # Deterministic rank: raster order of centroids (row, then column), ties by local id.
    order = np.lexsort((local, gx, gy))
    local, gy, gx = local[order], gy[order], gx[order]

    height, width = slide_shape
    open_top, open_left = ry > 0, rx > 0
    open_bottom, open_right = ry + rh < height, rx + rw < width
    bboxes = np.empty((local.size, 4), np.int64)
    cut = np.zeros(local.size, bool)
    masks: list[np.ndarray] = []
    offsets = np.zeros(local.size + 1, np.int64)
    for i, lid in enumerate(local):
        sl = objects[lid - 1]
        m = labels[sl] == lid
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        bboxes[i] = (y0 + ry, x0 + rx, y1 + ry, x1 + rx)
        cut[i] = (open_top and y0 == 0) or (open_left and x0 == 0) or (open_bottom and y1 == rh) or (
            open_right and x1 == rw)
        masks.append(m.ravel())
        offsets[i + 1] = offsets[i] + m.size
    if cut.any():
        log.debug("tile %d: %d object(s) touch the edge of the halo and may be larger than it", tile_index,
                  int(cut.sum()))
    return OwnedObjects(
        tile_index=tile_index,
        ids=ids.global_ids(tile_index, local.size),
        local_ids=local.astype(np.int64),
        bboxes=bboxes,
        offsets=offsets,
        masks=np.concatenate(masks) if masks else np.zeros(0, bool),
        centroids=np.stack([gy, gx], axis=1),
        cut=cut,
    )


def deduplicate(objs: OwnedObjects, earlier: Iterable[OwnedObjects], max_overlap: float = 0.5) -> np.ndarray:
    """Which of a tile's owned nuclei to keep, given the kept nuclei of neighbouring tiles with lower ids.

    Neighbouring tiles segment the same nucleus from slightly different context; near a core border both can
    place its centroid inside their own core (e.g. when one splits a blob the other does not).  A nucleus of
    which more than ``max_overlap`` of the pixels are already taken by kept nuclei of lower ids is such a
    duplicate and is dropped.  Deciding in ascending id order makes the result independent of chunking and
    scheduling; painting in the same order then gives every kept nucleus at least half its pixels.
    """
    n = len(objs)
    keep = np.ones(n, bool)
    if n == 0:
        return keep
    y0, x0 = objs.bboxes[:, 0].min(), objs.bboxes[:, 1].min()
    y1, x1 = objs.bboxes[:, 2].max(), objs.bboxes[:, 3].max()
    claimed = paint((int(x0), int(y0), int(x1 - x0), int(y1 - y0)), earlier) > 0
    if not claimed.any():
        return keep
    for i in range(n):
        by0, bx0, by1, bx1 = (int(v) for v in objs.bboxes[i])
        m = objs.mask(i)
        taken = claimed[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0][m].sum()
        keep[i] = taken <= max_overlap * m.sum()
    return keep


def paint(region: tuple[int, int, int, int], owned: Iterable[OwnedObjects]) -> np.ndarray:
    """Draw owned nuclei into ``region`` (``(x, y, w, h)`` slide target pixels) -> uint32 instance image.

    Objects are drawn in ascending global id; each fills only pixels still free, so instances never overlap
    and the result does not depend on the order of ``owned``.
    """
    x, y, w, h = region
    out = np.zeros((h, w), np.uint32)
    items: list[tuple[int, OwnedObjects, int]] = []
    for objs in owned:
        if len(objs) == 0:
            continue
        b = objs.bboxes
        hit = (b[:, 0] < y + h) & (b[:, 2] > y) & (b[:, 1] < x + w) & (b[:, 3] > x)
        items.extend((int(objs.ids[i]), objs, int(i)) for i in np.flatnonzero(hit))
    items.sort(key=lambda t: t[0])
    for gid, objs, i in items:
        y0, x0, y1, x1 = (int(v) for v in objs.bboxes[i])
        m = objs.mask(i)
        oy0, ox0 = max(y0, y), max(x0, x)
        oy1, ox1 = min(y1, y + h), min(x1, x + w)
        sub = m[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0]
        dst = out[oy0 - y:oy1 - y, ox0 - x:ox1 - x]
        dst[sub & (dst == 0)] = gid
    return out


# ------------------------------------------------------------------------------------------ tile records

#: the per-nucleus measurements of a :class:`TileRecord`, with their dtypes
MEASUREMENTS: dict[str, type] = {"area_px": np.int64, "perimeter_px": np.float64, "eccentricity": np.float64,
                                 "solidity": np.float64, "nucleus_prob": np.float64, "type": np.int64,
                                 "type_prob": np.float64, "stuff_class": np.int64}


@dataclass(frozen=True)
class TileRecord:
    """What pass 1 keeps of one tile: the nuclei it owns, their measurements, and its stuff core.

    ``objects`` are the owned nuclei (:class:`OwnedObjects`); the measurement arrays have one entry per owned
    nucleus, in the same order: ``area_px``, ``perimeter_px`` (target pixels), ``eccentricity``,
    ``solidity``, ``nucleus_prob``, ``type`` (index into the model's nucleus types, -1 without a type head),
    ``type_prob`` and ``stuff_class`` (the majority stuff class under the nucleus).  ``stuff`` is the tile's
    core of the stuff map (uint8 class ids, small regions already absorbed).
    """

    objects: OwnedObjects
    stuff: np.ndarray
    area_px: np.ndarray
    perimeter_px: np.ndarray
    eccentricity: np.ndarray
    solidity: np.ndarray
    nucleus_prob: np.ndarray
    type: np.ndarray
    type_prob: np.ndarray
    stuff_class: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.objects)
        for name in MEASUREMENTS:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"record of tile {self.objects.tile_index}: {name} has shape "
                                 f"{getattr(self, name).shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.objects)

    @classmethod
    def without_nuclei(cls, objects: OwnedObjects, stuff: np.ndarray) -> TileRecord:
        """The record of a tile that owns no nucleus."""
        return cls(objects, stuff, **{name: np.zeros(0, dtype) for name, dtype in MEASUREMENTS.items()})

    def subset(self, keep: np.ndarray) -> TileRecord:
        """The record with only the nuclei where ``keep`` is True (same order)."""
        keep = np.asarray(keep, bool)
        if keep.all():
            return self
        return TileRecord(self.objects.subset(keep), self.stuff,
                          **{name: getattr(self, name)[keep] for name in MEASUREMENTS})

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``); :meth:`from_arrays` restores the record."""
        return {**self.objects.to_arrays(), "stuff": self.stuff,
                **{name: getattr(self, name) for name in MEASUREMENTS}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TileRecord:
        objects = OwnedObjects.from_arrays(arrays)
        if len(objects) == 0:
            return cls.without_nuclei(objects, arrays["stuff"])
        return cls(objects, arrays["stuff"], **{name: arrays[name] for name in MEASUREMENTS})

    def table_columns(self, downsample: float, mpp: float, base_mpp: float, class_names: list[str],
                      type_names: list[str]) -> dict[str, Any]:
        """The nucleus-table columns of this record's nuclei (see :data:`histopan.store.NUCLEUS_TABLE_COLUMNS`):
        centroids in level-0 pixels (pixel centres) and microns, sizes in microns, names for classes."""
        cy, cx = self.objects.centroids[:, 0], self.objects.centroids[:, 1]
        x0_level0 = (cx + 0.5) * downsample
        y0_level0 = (cy + 0.5) * downsample
        area_um2 = self.area_px * mpp * mpp
        perim_um = self.perimeter_px * mpp
        with np.errstate(divide="ignore", invalid="ignore"):
            circ = np.where(perim_um > 0, 4 * np.pi * area_um2 / perim_um**2, np.nan)
        circ = np.minimum(circ, 1.0)
        bb = self.objects.bboxes
        return {
            "id": self.objects.ids.astype(np.uint32), "centroid_x": x0_level0, "centroid_y": y0_level0,
            "centroid_x_um": x0_level0 * base_mpp, "centroid_y_um": y0_level0 * base_mpp,
            "area_um2": area_um2, "perimeter_um": perim_um, "eccentricity": self.eccentricity,
            "solidity": self.solidity, "circularity": circ, "nucleus_prob": self.nucleus_prob,
            "type": [type_names[t] if 0 <= t < len(type_names) else None for t in self.type],
            "type_prob": self.type_prob,
            "stuff_class": [class_names[s] for s in self.stuff_class],
            "bbox_x": bb[:, 1], "bbox_y": bb[:, 0], "bbox_w": bb[:, 3] - bb[:, 1], "bbox_h": bb[:, 2] - bb[:, 0],
            "cut": self.objects.cut.astype(bool),
        }


class RecordCache:
    """Tile records from ``load(index)``, least recently used dropped first (bounded memory).

    :meth:`get` returns the record with only the nuclei kept by de-duplication once ``keep`` has an entry
    for the tile.
    """

    def __init__(self, load: Callable[[int], TileRecord], capacity: int,
                 keep: dict[int, np.ndarray] | None = None) -> None:
        self.load = load
        self.capacity = capacity
        self.keep = keep if keep is not None else {}
        self.items: OrderedDict[int, TileRecord] = OrderedDict()

    def get(self, index: int) -> TileRecord:
        if index in self.items:
            self.items.move_to_end(index)
            record = self.items[index]
        else:
            record = self.load(index)
            self.items[index] = record
            if len(self.items) > self.capacity:
                self.items.popitem(last=False)
        if index in self.keep:
            record = record.subset(self.keep[index])
        return record


def _cache_capacity(grid: TileGrid) -> int:
    return 4 * (grid.n_cols + 2)  # a few rows of tiles: what painting row by row revisits


def deduplicate_tiles(grid: TileGrid, recorded: np.ndarray,
                      load: Callable[[int], TileRecord]) -> tuple[dict[int, np.ndarray], int]:
    """Keep flags of every recorded tile's nuclei, decided in ascending tile (= id) order (:func:`deduplicate`
    against the kept nuclei of its earlier neighbours), and the number of kept nuclei flagged ``cut``."""
    keep: dict[int, np.ndarray] = {}
    cache = RecordCache(load, _cache_capacity(grid), keep=keep)
    n_cut = 0
    for index in np.flatnonzero(recorded):
        tile = grid[int(index)]
        objs = cache.get(int(index)).objects
        earlier = [cache.get(t.index).objects for t in grid.neighbours(tile) if t.index < index
                   and recorded[t.index]]
        keep[int(index)] = deduplicate(objs, earlier)
        n_cut += int(objs.cut[keep[int(index)]].sum())
    n_dropped = sum(int((~k).sum()) for k in keep.values())
    if n_dropped:
        log.info("dropped %d duplicate nuclei seen by two neighbouring tiles", n_dropped)
    return keep, n_cut


@dataclass(frozen=True)
class Chunk:
    """One output chunk: its key (``"<row>_<col>"``), its box, and the recorded tiles that reach it."""

    key: str
    box: Box
    tiles: tuple[Tile, ...]


class ChunkPainter:
    """Pass 2's geometry: the output chunks (``chunk`` x ``chunk`` target pixels) that recorded tiles reach,
    each painted from their kept nuclei (:func:`paint`) and stuff cores, and fused (things over stuff)."""

    def __init__(self, grid: TileGrid, recorded: np.ndarray, keep: dict[int, np.ndarray],
                 load: Callable[[int], TileRecord], chunk: int, thing_id: int) -> None:
        self.grid, self.recorded, self.chunk, self.thing_id = grid, recorded, int(chunk), int(thing_id)
        self.cache = RecordCache(load, _cache_capacity(grid), keep=keep)

    @property
    def n_rows(self) -> int:
        return -(-self.grid.height // self.chunk)

    def rows(self) -> Iterator[list[Chunk]]:
        """Chunk rows top to bottom; each the row's chunks, left to right, that at least one recorded tile
        reaches (possibly none)."""
        height, width = self.grid.shape
        c = self.chunk
        for y in range(0, height, c):
            row = []
            for x in range(0, width, c):
                box = Box(x, y, min(c, width - x), min(c, height - y))
                near = tuple(t for t in self.grid.tiles_reaching(box) if self.recorded[t.index])
                if near:
                    row.append(Chunk(f"{y // c}_{x // c}", box, near))
            yield row

    def paint(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's semantic (uint8) and nucleus instance (uint32) labels."""
        box = chunk.box
        records = {t.index: self.cache.get(t.index) for t in chunk.tiles}
        stuff = np.zeros((box.h, box.w), np.uint8)  # background where no tile was processed
        for t in chunk.tiles:
            core = t.core
            oy0, ox0 = max(core.y, box.y), max(core.x, box.x)
            oy1, ox1 = min(core.y1, box.y1), min(core.x1, box.x1)
            if oy0 < oy1 and ox0 < ox1:
                src = records[t.index].stuff
                stuff[oy0 - box.y:oy1 - box.y, ox0 - box.x:ox1 - box.x] = src[oy0 - core.y:oy1 - core.y,
                                                                              ox0 - core.x:ox1 - core.x]
        nuclei = paint(box.as_tuple(), [records[t.index].objects for t in chunk.tiles])
        return fuse(stuff, nuclei, self.thing_id), nuclei
