"""QuPath interop: stream a store's nuclei and tissue regions to GeoJSON, and read QuPath GeoJSON back.

Export (:func:`export_qupath`) writes one FeatureCollection that QuPath imports as it is (File > Import
objects, or drag and drop; ``.geojson.gz`` too):

- every nucleus is a Feature with ``id`` a UUID 5 of the slide identity and the nucleus id (the same nucleus
  gets the same id in every export), a Polygon traced from ``labels/nuclei`` (pixel-edge midpoints,
  simplified within ``simplify_px`` label pixels, valid, counter-clockwise exterior, level-0 pixel
  coordinates with at most two decimals), ``objectType`` ``"detection"`` (or ``"cell"`` with
  ``nucleusGeometry`` when ``cells=True``), a ``classification`` with ``name`` and ``color`` (the nucleus
  type when the model predicts types, else the nucleus class) and ``measurements`` (finite numbers only;
  names in :data:`MEASUREMENTS`);
- every connected region of a tissue ("stuff") class other than background is an ``annotation`` Feature
  (Polygon with holes, or MultiPolygon if clipping to ``bbox`` or simplification splits it), traced on a
  coarser pyramid level of ``labels/semantic`` (see :func:`stuff_level`), with nucleus pixels given to a
  neighbouring tissue class first (grown in from around them).

The file is streamed: nuclei are traced block by block of the label map (the blocks follow the nucleus
table's bounding boxes; all outlines of a block are traced, simplified and checked in a few vectorised
calls), each Feature is encoded with orjson (standard JSON, UTF-8) and the blocks are written in order as
soon as they are ready, so memory is a few blocks of labels plus the nucleus table's numeric columns (about
100 bytes per nucleus).  Blocks can be encoded by several worker processes (``workers``); the file is the
same byte for byte for any number.  It is written under a temporary name in the output folder and renamed
at the end: a file with the final name is always complete.  A name ending in ``.gz`` is gzip-compressed,
one gzip member per job of a few blocks (members one after the other form one valid gzip stream).

Import is :mod:`histopan.export.geojson` (:func:`~histopan.export.geojson.read_geojson`), the one GeoJSON
reader; its :class:`~histopan.export.geojson.Annotation` and ``read_geojson`` are importable from here too.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from histopan.checks import check_output
from histopan.errors import ConfigError, OutputError, RegionError, StoreError
from histopan.export.contours import Rings, outer_rings, trace_rings
from histopan.export.geojson import GEOJSON_SUFFIXES, Annotation, read_geojson  # noqa: F401 (import side, re-exported)
from histopan.store import SlideStore, open_store

log = logging.getLogger(__name__)

#: Namespace of the nucleus UUIDs: ``uuid5(NAMESPACE, f"{slide identity}:nucleus:{id}")``.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "histopan:qupath-export")

#: Measurement name in the GeoJSON (QuPath's naming style) -> nucleus table column.
MEASUREMENTS: dict[str, str] = {
    "Area µm^2": "area_um2",
    "Perimeter µm": "perimeter_um",
    "Circularity": "circularity",
    "Eccentricity": "eccentricity",
    "Solidity": "solidity",
    "Nucleus probability": "nucleus_prob",
    "Type probability": "type_prob",
}

_TABLE_COLUMNS = ("id", "centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "type",
                  *MEASUREMENTS.values())
#: Stuff regions are traced on the finest pyramid level at least this coarse (um per pixel) ...
STUFF_MIN_MPP = 2.0
#: ... and at most this many pixels.
STUFF_MAX_PIXELS = 16_000_000
_GZIP_LEVEL = 1  # zlib level: 225 MB/s, 5 % larger than level 3 (170 MB/s) on this GeoJSON


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_qupath` writes.

    ``bbox``: (x, y, w, h) in level-0 pixels: nuclei whose centroid lies inside, regions clipped to it.
    ``classes``: names to keep: tissue class names select regions, nucleus type names select nuclei of
    that type, the nucleus class name selects every nucleus (None: everything).
    ``cells``: nuclei as QuPath cells: the geometry is the nucleus grown by ``cell_expansion_um`` without
    overlapping its neighbours (as QuPath's cell expansion), the nucleus goes to ``nucleusGeometry``.
    ``simplify_px``: simplification tolerance in label pixels (0 keeps the traced outline).
    ``regions``: also write the tissue regions; ``min_region_um2``: smaller regions and holes are dropped.
    ``partial``: accept an incomplete store (its missing parts are simply not exported).
    """

    bbox: tuple[float, float, float, float] | None = None
    classes: tuple[str, ...] | None = None
    cells: bool = False
    cell_expansion_um: float = 3.0
    simplify_px: float = 0.5
    regions: bool = True
    min_region_um2: float = 100.0
    partial: bool = False
    block: int | None = None  # label px per tracing block (None: the store's chunk size, at least 512)

    def __post_init__(self) -> None:
        if self.bbox is not None:
            object.__setattr__(self, "bbox", tuple(float(v) for v in self.bbox))
            if len(self.bbox) != 4 or not all(math.isfinite(v) for v in self.bbox) or min(self.bbox[2:]) <= 0:
                raise ConfigError("bbox must be four finite numbers x, y, w, h (level-0 pixels) with w, h > 0",
                                  value=self.bbox, fix="pass e.g. --bbox 1000,2000,4096,4096")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        for name in ("cell_expansion_um", "simplify_px", "min_region_um2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0", value=value, fix=f"use e.g. {name}=1")
        if self.block is not None and self.block < 64:
            raise ConfigError("block must be at least 64 label pixels", value=self.block, fix="use e.g. 1024")


@dataclass
class ExportResult:
    """What :func:`export_qupath` wrote."""

    path: Path
    n_nuclei: int
    n_regions: int
    n_missing: int  # table rows whose id is not in labels/nuclei (not exported)
    stuff_level: int | None  # pyramid level the regions were traced on
    seconds: float
    bytes: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def nuclei_per_second(self) -> float:
        return self.n_nuclei / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "n_nuclei": self.n_nuclei, "n_regions": self.n_regions,
                "n_missing": self.n_missing, "stuff_level": self.stuff_level, "seconds": self.seconds,
                "bytes": self.bytes, "nuclei_per_second": self.nuclei_per_second, "timings": self.timings}


# ---------------------------------------------------------------------------------------------- UUIDs


def nucleus_uuid(slide_identity: str, nucleus_id: int) -> str:
    """The exported id of a nucleus: ``str(uuid5(NAMESPACE, f"{slide_identity}:nucleus:{nucleus_id}"))``."""
    return str(uuid.uuid5(NAMESPACE, f"{slide_identity}:nucleus:{int(nucleus_id)}"))


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_DASHES = (8, 12, 16, 20)


def nucleus_uuids(slide_identity: str, ids: np.ndarray) -> list[str]:
    """:func:`nucleus_uuid` for many ids (SHA-1 per id, the bit fiddling and hex formatting vectorised)."""
    if ids.size == 0:
        return []
    prefix = NAMESPACE.bytes + f"{slide_identity}:nucleus:".encode()
    sha1 = hashlib.sha1
    digests = b"".join([sha1(prefix + str(i).encode()).digest()[:16] for i in ids.tolist()])
    raw = np.frombuffer(digests, np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.empty((raw.shape[0], 32), np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((raw.shape[0], 36), ord("-"), np.uint8)
    out[:, 0:8], out[:, 9:13], out[:, 14:18] = hexed[:, 0:8], hexed[:, 8:12], hexed[:, 12:16]
    out[:, 19:23], out[:, 24:36] = hexed[:, 16:20], hexed[:, 20:32]
    text = out.tobytes().decode("ascii")
    return [text[k:k + 36] for k in range(0, len(text), 36)]


# ------------------------------------------------------------------------------------------ geometry


def ring_polygons(rings: Rings, scale: float, dx: float, dy: float, simplify: float):
    """The rings as single-ring polygons in output coordinates ((x + dx) * scale), simplified within
    ``simplify * scale`` (Douglas-Peucker, all rings in one call), rounded to two decimals and valid.

    A ring that simplification or rounding leaves invalid or collapsed (fewer than four points) keeps its
    traced outline (valid by construction) snapped to the 0.01 grid instead.
    Returns (coordinates (n, 2) of all closed rings, bounds: ring i is ``coords[bounds[i]:bounds[i+1]]``).
    """
    import shapely

    n = len(rings)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(1, np.int64)
    ring_index = np.repeat(np.arange(n), np.diff(rings.offsets))
    exact = np.stack([(rings.x + dx) * scale, (rings.y + dy) * scale], axis=1)
    lines = shapely.linearrings(exact, indices=ring_index)
    if simplify > 0:  # on the rings, not polygons: GEOS would repair each simplified polygon (a buffer)
        lines = shapely.simplify(lines, simplify * scale, preserve_topology=False)
    coords, index = shapely.get_coordinates(lines, return_index=True)
    coords = np.round(coords, 2)
    good = np.bincount(index, minlength=n) >= 4
    if not good.all():
        keep = good[index]
        coords, index = coords[keep], index[keep]
    valid = np.zeros(n, bool)
    renumber = np.cumsum(good) - 1
    valid[good] = shapely.is_valid(shapely.polygons(shapely.linearrings(coords, indices=renumber[index])))
    bad = np.flatnonzero(~valid)
    if bad.size:  # rare: the traced outline snapped to the 0.01 grid
        exact_rings = shapely.linearrings(exact, indices=ring_index)[bad]
        fixed = shapely.set_precision(shapely.polygons(exact_rings), 0.01)
        keep = ~np.isin(index, bad)
        fc, fi = shapely.get_coordinates(fixed, return_index=True)
        coords = np.concatenate([coords[keep], np.round(fc, 2)])
        index = np.concatenate([index[keep], bad[fi]])
        order = np.argsort(index, kind="stable")
        coords, index = coords[order], index[order]
    bounds = np.searchsorted(index, np.arange(n + 1))
    return np.ascontiguousarray(coords), bounds


def _polygon_json(poly) -> dict[str, Any]:
    """GeoJSON geometry of a shapely Polygon (coordinates rounded to two decimals)."""
    rings = [poly.exterior, *poly.interiors]
    return {"type": "Polygon", "coordinates": [np.round(np.asarray(r.coords), 2).tolist() for r in rings]}


# ------------------------------------------------------------------------------------------ the store


@dataclass(frozen=True)
class _SlideInfo:
    identity: str
    mpp: float  # level-0 um / px
    width: int
    height: int
    downsample: float  # level-0 px per label px


def _slide_info(store: SlideStore) -> _SlideInfo:
    attrs = store.attrs
    slide = attrs.get("slide")
    if not isinstance(slide, dict) or "identity" not in slide or "mpp" not in slide:
        raise StoreError("the store has no slide attributes (identity, mpp)", path=store.path,
                         fix="export a store written by 'histopan segment' of this histopan version")
    ds = float(attrs.get("downsample") or store.mpp / float(slide["mpp"]))
    if not (math.isfinite(ds) and ds > 0):  # orjson would write a non-finite coordinate as null
        raise StoreError("the store's downsample (level-0 px per label px) is not a finite positive number",
                         path=store.path, value=ds, fix="export a store written by 'histopan segment'")
    h, w = store.shape
    width = int(slide.get("width") or round(w * ds))
    height = int(slide.get("height") or round(h * ds))
    return _SlideInfo(str(slide["identity"]), float(slide["mpp"]), width, height, ds)


def _type_colors(store: SlideStore) -> dict[str, tuple[int, int, int]]:
    config = store.attrs.get("run", {}).get("model", {}).get("config", {})
    return {t["name"]: tuple(int(c) for c in t["color"]) for t in config.get("nucleus_types", []) or []}


def _fallback_color(name: str) -> tuple[int, int, int]:
    digest = hashlib.sha1(name.encode()).digest()
    return tuple(int(64 + v % 160) for v in digest[:3])  # type: ignore[return-value]


def stuff_level(store: SlideStore) -> int:
    """Pyramid level the tissue regions are traced on: the finest with at least :data:`STUFF_MIN_MPP` um
    per pixel and at most :data:`STUFF_MAX_PIXELS` pixels (or the coarsest level there is)."""
    levels = len(store.group["labels/semantic"].attrs["ome"]["multiscales"][0]["datasets"])
    h, w = store.shape
    level = 0
    while level < levels - 1 and (store.mpp * 2**level < STUFF_MIN_MPP
                                  or (-(-h // 2**level)) * (-(-w // 2**level)) > STUFF_MAX_PIXELS):
        level += 1
    return level


def _read_table(store: SlideStore) -> dict[str, np.ndarray]:
    """The table's columns as numpy arrays, read batch by batch into preallocated arrays (reading it whole
    with pyarrow would peak at several times its final size); ``type`` becomes codes into ``type_names``,
    the measurement columns one (n, len(MEASUREMENTS)) float64 array ``values``."""
    import pyarrow as pa

    table = store.nucleus_table()  # a StoreError naming the fix when there is none
    table.require(_TABLE_COLUMNS)
    n = table.num_rows
    out: dict[str, np.ndarray] = {}
    measured = list(MEASUREMENTS.values())
    numeric = [c for c in _TABLE_COLUMNS if c != "type" and c not in measured]
    for name in numeric:
        out[name] = np.empty(n, table.schema.field(name).type.to_pandas_dtype())
    out["values"] = np.empty((n, len(measured)), np.float64)
    out["type_code"] = np.full(n, -1, np.int64)
    type_names: dict[str, int] = {}
    pos = 0
    for batch in table.batches(_TABLE_COLUMNS, batch_size=65536):
        k = batch.num_rows
        for name in numeric:
            out[name][pos:pos + k] = batch.column(name).to_numpy(zero_copy_only=False)
        for j, name in enumerate(measured):
            out["values"][pos:pos + k, j] = batch.column(name).to_numpy(zero_copy_only=False)
        col = batch.column("type")
        if not pa.types.is_null(col.type):
            enc = col.dictionary_encode() if not pa.types.is_dictionary(col.type) else col
            local = [type_names.setdefault(v, len(type_names)) for v in enc.dictionary.to_pylist()]
            idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            lut = np.asarray(local + [-1], np.int64)  # index -1 -> -1
            out["type_code"][pos:pos + k] = lut[idx]
        pos += k
    out["type_names"] = np.array(list(type_names), dtype=object)
    del table
    pa.default_memory_pool().release_unused()  # the batches' buffers: give them back to the system
    return out


# ------------------------------------------------------------------------------------------ writing


def _pack(data: bytes, gzip_level: int | None) -> bytes:
    """``data`` as it goes into the file: as it is, or as one gzip member (several members one after the
    other form one valid gzip stream; Python's gzip, zcat and Java's GZIPInputStream read them all)."""
    if gzip_level is None:
        return data
    return gzip.compress(data, compresslevel=gzip_level, mtime=0)


class _Writer:
    """Streams encoded pieces of the FeatureCollection into ``out`` (temporary name first, renamed at the end).

    Every piece is serializer output (:func:`orjson.dumps` of one Feature, joined with ``,\\n``) already
    packed with :func:`_pack`; the writer adds the head, the ``,\\n`` between pieces and the tail.
    """

    HEAD = b'{"type":"FeatureCollection","features":[\n'
    TAIL = b"\n]}\n"

    def __init__(self, out: Path, gzip_level: int | None) -> None:
        self.out = out
        self.gzip_level = gzip_level
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
        try:
            self.raw = open(self.tmp, "wb", buffering=1 << 20)
        except OSError as exc:
            raise OutputError(f"cannot write into the output folder: {exc.strerror or exc}", path=out,
                              fix="choose a folder you can write to, or fix its permissions") from exc
        self.sep = _pack(b",\n", gzip_level)
        self.raw.write(_pack(self.HEAD, gzip_level))
        self.first = True

    def write(self, packed: bytes, n_features: int) -> None:
        """One piece: ``n_features`` Features packed by :func:`_pack` (nothing is written for none)."""
        if n_features == 0:
            return
        if not self.first:
            self.raw.write(self.sep)
        self.raw.write(packed)
        self.first = False

    def close(self) -> int:
        self.raw.write(_pack(self.TAIL, self.gzip_level))
        self.raw.close()
        os.replace(self.tmp, self.out)
        return self.out.stat().st_size

    def abort(self) -> None:
        """Throw the partial file away.  Closing flushes what is still buffered, which fails again on a full
        disk: that data is being discarded with the file, so only the file's removal matters here (the error
        that made the export abort is the one raised)."""
        try:
            self.raw.close()
        except OSError as exc:
            log.debug("discarding the unwritten end of %s: %s", self.tmp, exc)
        finally:
            self.tmp.unlink(missing_ok=True)


def _encode_features(features: Sequence[dict[str, Any]], gzip_level: int | None) -> bytes:
    """Features encoded with orjson (standard JSON, UTF-8; numpy arrays as nested lists), joined with ``,\\n``
    and packed.  Every number must be finite: orjson would write NaN as null (callers drop non-finite
    measurements, and coordinates come from integer rings times a finite scale)."""
    dumps, opt = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    return _pack(b",\n".join([dumps(f, option=opt) for f in features]), gzip_level)


# ------------------------------------------------------------------------------------------ export


def export_qupath(store_path: str | PathLike[str], out: str | PathLike[str],
                  options: ExportOptions = ExportOptions(),
                  progress: Callable[[int, int], None] | None = None, workers: int | None = 1) -> ExportResult:
    """Write the store's nuclei (and tissue regions) to ``out`` as QuPath GeoJSON; see the module docstring.

    Raises :class:`~histopan.errors.StoreError` for a missing or incomplete store (unless
    ``options.partial``), :class:`~histopan.errors.ConfigError` for an unknown class name,
    :class:`~histopan.errors.RegionError` for a bbox not inside the slide and
    :class:`~histopan.errors.OutputError` for an output path that cannot be written.
    ``progress(done, total)`` is called with nuclei done.

    ``workers``: processes that trace and encode blocks of nuclei (the output is byte-identical for any
    number); 1 works in the calling process; None: :func:`default_workers`, but one per
    :data:`_ROWS_PER_AUTO_WORKER` nuclei at most.  Worker processes are started with ``spawn``, so a script
    that asks for more than one must guard its entry point with ``if __name__ == "__main__":``.
    """
    t_start = time.perf_counter()
    out = check_output(out, suffixes=GEOJSON_SUFFIXES)
    store = open_store(store_path, partial=options.partial)
    slide = _slide_info(store)
    classes = store.classes
    thing = next((c for c in classes if c.kind == "thing"), None)
    stuff = [c for c in classes if c.kind == "stuff" and c.id != 0]
    type_colors = _type_colors(store)
    timings: dict[str, float] = {}

    bbox = options.bbox
    if bbox is not None:
        x, y, w, h = bbox
        if x < 0 or y < 0 or x + w > slide.width or y + h > slide.height:
            raise RegionError(f"bbox x={x:g}, y={y:g}, w={w:g}, h={h:g} (level-0 pixels) is not inside the slide "
                              f"of {slide.width} x {slide.height} pixels", path=store.path,
                              fix=f"keep 0 <= x, 0 <= y, x + w <= {slide.width}, y + h <= {slide.height}")

    has_table = store.has_table
    if not has_table and not options.partial:
        _read_table(store)  # raises the StoreError naming the fix
    t = time.perf_counter()
    table = _read_table(store) if has_table else None
    timings["read_table"] = time.perf_counter() - t

    # which classes / types are wanted
    type_names = list(type_colors)
    if table is not None:
        type_names += [n for n in table["type_names"].tolist() if n not in type_colors]
    known = [c.name for c in classes if c.id != 0] + type_names
    want_regions = list(stuff)
    want_all_nuclei = True
    want_types: set[str] = set()
    if options.classes is not None:
        unknown = [n for n in options.classes if n not in known]
        if unknown:
            raise ConfigError(f"unknown class name(s) {unknown} for this store", path=store.path,
                              value=", ".join(unknown), fix=f"use some of {known}")
        wanted = set(options.classes)
        want_regions = [c for c in stuff if c.name in wanted]
        want_all_nuclei = thing is not None and thing.name in wanted
        want_types = wanted & set(type_names)

    rows = np.zeros(0, np.int64)
    if table is not None and (want_all_nuclei or want_types):
        rows = _select_rows(table, bbox, want_all_nuclei, want_types)
    elif table is None:
        log.warning("%s has no nucleus table yet: only tissue regions are exported", store.path)
    n_workers = _worker_count(workers, int(rows.size))
    timings["workers"] = n_workers
    want_regions = want_regions if options.regions else []
    level = stuff_level(store) if want_regions else None

    if store.complete is False:
        log.warning("%s is incomplete (--partial): exporting what has been written so far", store.path)
    gzip_level = _GZIP_LEVEL if out.name.lower().endswith(".gz") else None
    writer = _Writer(out, gzip_level)
    n_nuclei = n_missing = n_regions = 0
    pool = _start_pool(n_workers, str(store.path), options.partial) if rows.size else None
    try:
        regions_job = None
        if pool is not None and want_regions:  # regions in a worker, alongside the first blocks of nuclei
            regions_job = pool.submit(_regions_in_worker, slide, level, want_regions, thing, options, gzip_level)
        if rows.size:
            n_nuclei, n_missing = _export_nuclei(store, table, slide, options, writer, thing, type_colors, rows,
                                                 progress, timings, pool, n_workers)
        if want_regions:
            t = time.perf_counter()
            if regions_job is not None:
                data, n_regions = regions_job.result()
            else:
                data, n_regions = _export_regions(store, slide, level, want_regions, thing, options, gzip_level)
            writer.write(data, n_regions)
            timings["regions"] = time.perf_counter() - t
        size = writer.close()
    except OSError as exc:
        writer.abort()
        raise OutputError(f"writing the output failed: {exc.strerror or exc}", path=out,
                          fix="free some space in the output folder (or choose another), then run the export again") from exc
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if n_missing:
        log.warning("%d nuclei of the table are not in labels/nuclei and were not exported", n_missing)
    seconds = time.perf_counter() - t_start
    return ExportResult(out, n_nuclei, n_regions, n_missing, level, seconds, size, timings)


@dataclass(frozen=True)
class _NucleiContext:
    """Everything a worker needs to encode blocks of nuclei (picklable, sent once per worker)."""

    store_path: str
    partial: bool
    identity: str
    downsample: float
    simplify_px: float
    cells: bool
    expand_px: float
    px_area_um2: float
    names: tuple[str, ...]
    class_objs: tuple[dict[str, Any], ...]  # per type code
    default_obj: dict[str, Any]
    object_type: str
    gzip_level: int | None


@dataclass(frozen=True)
class _Block:
    """One block of nuclei: the label window (label px) and the table rows of its nuclei."""

    row: int  # block row
    y0: int
    x0: int
    y1: int
    x1: int
    ids: np.ndarray  # int64
    codes: np.ndarray  # type code per nucleus (-1: none)
    values: np.ndarray  # (n, len(MEASUREMENTS)) float64


@dataclass(frozen=True)
class _Job:
    """Consecutive blocks of one block row, read as one window (each label chunk is decoded once per job,
    not once per block: the blocks' windows overlap the chunks of their neighbours)."""

    blocks: tuple[_Block, ...]

    @property
    def window(self) -> tuple[int, int, int, int]:
        b = self.blocks
        return (min(k.y0 for k in b), min(k.x0 for k in b), max(k.y1 for k in b), max(k.x1 for k in b))

    @property
    def n_rows(self) -> int:
        return sum(k.ids.size for k in self.blocks)


@dataclass
class _Encoded:
    data: bytes  # features joined with ",\n" (packed, see _pack, when it is a whole job's)
    n: int
    n_missing: int
    timings: dict[str, float]


#: In a worker process: the store's ``labels/nuclei`` array (opened once by :func:`_init_worker`).
_WORKER_LABELS: Any = None
_WORKER_STORE: Any = None


def _init_worker(store_path: str, partial: bool) -> None:
    global _WORKER_LABELS, _WORKER_STORE
    import zarr

    # the pool is the parallelism: one decoding thread per worker keeps its memory (malloc arenas) small
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 2})
    _WORKER_STORE = open_store(store_path, partial=partial)
    _WORKER_LABELS = _WORKER_STORE.nuclei


def _encode_job_in_worker(ctx: _NucleiContext, job: _Job) -> _Encoded:
    return _encode_job(ctx, _WORKER_LABELS, job)


def _encode_job(ctx: _NucleiContext, labels, job: _Job) -> _Encoded:
    """Read the job's window once, encode its blocks, join and pack them (the same bytes in any process)."""
    t0 = time.perf_counter()
    y0, x0, y1, x1 = job.window
    window = labels[y0:y1, x0:x1]
    parts, n, n_missing = [], 0, 0
    timings = {"read_labels": time.perf_counter() - t0}
    for b in job.blocks:
        enc = _encode_block(ctx, window[b.y0 - y0:b.y1 - y0, b.x0 - x0:b.x1 - x0], b)
        if enc.n:
            parts.append(enc.data)
        n += enc.n
        n_missing += enc.n_missing
        for k, v in enc.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    t = time.perf_counter()
    data = _pack(b",\n".join(parts), ctx.gzip_level)
    timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t
    return _Encoded(data, n, n_missing, timings)


def _encode_block(ctx: _NucleiContext, window: np.ndarray, block: _Block) -> _Encoded:
    """Trace, simplify and encode the nuclei of one block (``window``: its labels); not packed."""
    t1 = time.perf_counter()
    ids = block.ids
    nuc_rings = outer_rings(trace_rings(window, ids))
    cell_rings = None
    if ctx.cells:
        from skimage.segmentation import expand_labels

        cell_rings = outer_rings(trace_rings(expand_labels(window, distance=ctx.expand_px), ids))
    t2 = time.perf_counter()

    # match table rows to traced rings (both by id)
    pos = np.searchsorted(nuc_rings.label, ids)
    if len(nuc_rings):
        found = (pos < len(nuc_rings)) & (nuc_rings.label[np.minimum(pos, len(nuc_rings) - 1)].astype(np.int64) == ids)
    else:
        found = np.zeros(ids.size, bool)
    n_missing = int((~found).sum())
    ids, pos = ids[found], pos[found]
    nuc_coords, nuc_bounds = ring_polygons(nuc_rings.take(pos), ctx.downsample, block.x0, block.y0,
                                            ctx.simplify_px)
    vals = block.values[found]
    if ctx.cells:
        cpos = np.searchsorted(cell_rings.label, ids)
        cell_coords, cell_bounds = ring_polygons(cell_rings.take(cpos), ctx.downsample, block.x0, block.y0,
                                                  ctx.simplify_px)
        cell_area = (cell_rings.area[cpos] + 0.5) * ctx.px_area_um2  # midpoint ring area + 1/2 = pixel count
        vals = np.concatenate([vals, cell_area[:, None]], axis=1)
    vals = np.round(vals, 4)
    finite = np.isfinite(vals)
    vals_l = vals.tolist()
    uids = nucleus_uuids(ctx.identity, ids)
    codes = block.codes[found].tolist()
    t3 = time.perf_counter()

    names, object_type = ctx.names, ctx.object_type
    classes = [*ctx.class_objs, ctx.default_obj]  # code -1: the default
    if finite.all():
        measurements = [dict(zip(names, row)) for row in vals_l]
    else:  # QuPath measurements are numbers: leave out NaN / inf
        measurements = [{n: v for n, v, ok in zip(names, row, oks) if ok}
                        for row, oks in zip(vals_l, finite.tolist())]
    nb = nuc_bounds.tolist()
    nuc_geoms = [{"type": "Polygon", "coordinates": [nuc_coords[s:e]]} for s, e in zip(nb[:-1], nb[1:])]
    if ctx.cells:
        cb = cell_bounds.tolist()
        geoms = [{"type": "Polygon", "coordinates": [cell_coords[s:e]]} for s, e in zip(cb[:-1], cb[1:])]
        props = [{"objectType": object_type, "classification": classes[c], "measurements": m, "nucleusGeometry": g}
                 for c, m, g in zip(codes, measurements, nuc_geoms)]
    else:
        geoms = nuc_geoms
        props = [{"objectType": object_type, "classification": classes[c], "measurements": m}
                 for c, m in zip(codes, measurements)]
    feats = [{"type": "Feature", "id": u, "geometry": g, "properties": p} for u, g, p in zip(uids, geoms, props)]
    data = _encode_features(feats, None)
    t4 = time.perf_counter()
    return _Encoded(data, len(feats), n_missing, {"trace": t2 - t1, "geometry": t3 - t2, "encode": t4 - t3})


def _select_rows(table: dict[str, np.ndarray], bbox, want_all: bool, want_types: set[str]) -> np.ndarray:
    keep = np.ones(table["id"].size, bool)
    if bbox is not None:
        x, y, w, h = bbox
        cx, cy = table["centroid_x"], table["centroid_y"]
        keep &= (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)
    if not want_all:
        codes = [i for i, n in enumerate(table["type_names"].tolist()) if n in want_types]
        keep &= np.isin(table["type_code"], codes)
    return np.flatnonzero(keep)


def default_workers() -> int:
    """Worker processes :func:`export_qupath` uses by default: ``min(4, CPU count)``."""
    return max(1, min(4, os.cpu_count() or 1))


#: With ``workers=None`` an export uses one worker process per this many nuclei at most (starting a
#: process costs about a second, so small exports run in the calling process).
_ROWS_PER_AUTO_WORKER = 50_000


def _worker_count(workers: int | None, n_rows: int) -> int:
    if workers is None:
        return max(1, min(default_workers(), n_rows // _ROWS_PER_AUTO_WORKER))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("workers must be a whole number >= 1", value=workers, fix="pass e.g. --workers 4")
    return workers


def _start_pool(n_workers: int, store_path: str, partial: bool):
    """A pool of ``n_workers`` processes that have the store open (None for one worker: work in-process)."""
    if n_workers <= 1:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent runs threads (zarr's event loop) that a fork would copy mid-flight
    return ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(store_path, partial))


def _blocks(store: SlideStore, table: dict[str, np.ndarray], rows: np.ndarray, options: ExportOptions,
            margin: int, values: np.ndarray):
    """The blocks of nuclei, in file order: rows grouped by the ``block`` x ``block`` square of the label map
    their bounding box starts in; the window is the union of their bounding boxes (plus ``margin``)."""
    height, width = store.nuclei.shape
    block = options.block or max(int(store.attrs.get("chunk", 512)), 512)
    bx, by = table["bbox_x"][rows], table["bbox_y"][rows]
    order = np.lexsort((bx // block, by // block))
    rows = rows[order]
    key = (by[order] // block) * (width // block + 1) + bx[order] // block
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], rows.size]
    for s, e in zip(starts.tolist(), ends.tolist()):
        r = rows[s:e]
        y0 = max(int(table["bbox_y"][r].min()) - margin, 0)
        x0 = max(int(table["bbox_x"][r].min()) - margin, 0)
        y1 = min(int((table["bbox_y"][r] + table["bbox_h"][r]).max()) + margin, height)
        x1 = min(int((table["bbox_x"][r] + table["bbox_w"][r]).max()) + margin, width)
        yield _Block(int(key[s]) // (width // block + 1), y0, x0, y1, x1, table["id"][r].astype(np.int64),
                     table["type_code"][r], values[r])


#: Blocks per job (see :class:`_Job`): a job reads a window of about 1 x this many blocks.
_BLOCKS_PER_JOB = 4


def _jobs(blocks):
    """Consecutive blocks of the same block row, :data:`_BLOCKS_PER_JOB` at most, in file order."""
    group: list[_Block] = []
    for b in blocks:
        if group and (b.row != group[0].row or len(group) == _BLOCKS_PER_JOB):
            yield _Job(tuple(group))
            group = []
        group.append(b)
    if group:
        yield _Job(tuple(group))


def _export_nuclei(store: SlideStore, table: dict[str, np.ndarray], slide: _SlideInfo, options: ExportOptions,
                   writer: _Writer, thing, type_colors: dict[str, tuple[int, int, int]],
                   rows: np.ndarray, progress, timings: dict[str, float], pool, n_workers: int) -> tuple[int, int]:
    """Write the nuclei of the table ``rows``, block by block (in ``pool`` when given); returns (written,
    missing from the labels)."""
    total = int(rows.size)
    if total == 0:
        return 0, 0
    # classification objects, shared by all features of a class
    thing_name = thing.name if thing is not None else "nucleus"
    thing_color = list(thing.color) if thing is not None else [40, 40, 220]
    type_names = table["type_names"].tolist()
    class_objs = tuple({"name": n, "color": list(type_colors.get(n) or _fallback_color(n))} for n in type_names)
    names = tuple(MEASUREMENTS)
    if options.cells:
        names = tuple(f"Nucleus: {n}" for n in names) + ("Cell: Area µm^2",)
    expand_px = options.cell_expansion_um / store.mpp
    ctx = _NucleiContext(str(store.path), options.partial, slide.identity, slide.downsample, options.simplify_px,
                         options.cells, expand_px, store.mpp**2, names, class_objs,
                         {"name": thing_name, "color": thing_color}, "cell" if options.cells else "detection",
                         writer.gzip_level)
    values = table["values"]
    margin = int(math.ceil(2 * expand_px)) + 1 if options.cells else 0
    jobs = _jobs(_blocks(store, table, rows, options, margin, values))

    done = n_missing = 0
    sums = {"read_labels": 0.0, "trace": 0.0, "geometry": 0.0, "encode": 0.0, "write": 0.0}

    def put(enc: _Encoded, n_rows: int) -> None:
        nonlocal done, n_missing
        for k, v in enc.timings.items():
            sums[k] += v
        t = time.perf_counter()
        writer.write(enc.data, enc.n)
        sums["write"] += time.perf_counter() - t
        n_missing += enc.n_missing
        done += n_rows
        if progress is not None:
            progress(done, total)

    if pool is None:
        labels = store.nuclei
        for job in jobs:
            put(_encode_job(ctx, labels, job), job.n_rows)
    else:
        in_flight: collections.deque = collections.deque()
        for job in jobs:
            in_flight.append((pool.submit(_encode_job_in_worker, ctx, job), job.n_rows))
            if len(in_flight) >= 2 * n_workers:  # bounded: at most two jobs per worker in memory
                fut, n_rows = in_flight.popleft()
                put(fut.result(), n_rows)
        while in_flight:
            fut, n_rows = in_flight.popleft()
            put(fut.result(), n_rows)
    timings.update(sums)
    return done - n_missing, n_missing


def _stuff_map(store: SlideStore, level: int, thing_id: int | None) -> np.ndarray:
    """Tissue classes at ``level``, nucleus pixels given to a neighbouring tissue class (grown 1 px at a time)."""
    from scipy import ndimage

    if store.complete:
        sem = store.group[f"labels/semantic/{level}"][:]
    else:  # the pyramid may not be built yet: sample level 0 chunk row by chunk row
        step = 2**level
        src = store.semantic
        chunk = int(store.attrs.get("chunk", 1024))
        chunk = -(-chunk // step) * step
        parts = [src[y:y + chunk, :][::step, ::step] for y in range(0, src.shape[0], chunk)]
        sem = np.concatenate(parts, axis=0)
    if thing_id is not None:
        # grow the tissue classes into the nucleus pixels (a nucleus is a pixel or two at this level)
        for _ in range(64):
            is_thing = sem == thing_id
            if not is_thing.any():
                break
            grown = ndimage.maximum_filter(np.where(is_thing, 0, sem), size=3)
            sem = np.where(is_thing & (grown > 0), grown, sem)
        sem[sem == thing_id] = 0
    return sem


def _regions_in_worker(slide: _SlideInfo, level: int, wanted: list, thing, options: ExportOptions,
                       gzip_level: int | None) -> tuple[bytes, int]:
    return _export_regions(_WORKER_STORE, slide, level, wanted, thing, options, gzip_level)


def _export_regions(store: SlideStore, slide: _SlideInfo, level: int, wanted: list, thing, options: ExportOptions,
                    gzip_level: int | None) -> tuple[bytes, int]:
    """The tissue regions of the classes ``wanted``, traced on pyramid ``level``: (packed features, count)."""
    import shapely
    from scipy import ndimage

    sem = _stuff_map(store, level, thing.id if thing is not None else None)
    scale = slide.downsample * 2**level  # level-0 px per traced px
    px_um2 = (store.mpp * 2**level) ** 2
    min_px = options.min_region_um2 / px_um2
    clip = None
    if options.bbox is not None:
        x, y, w, h = options.bbox
        clip = shapely.box(x, y, x + w, y + h)
    feats: list[dict[str, Any]] = []
    for cls in wanted:
        comp, n_comp = ndimage.label(sem == cls.id)
        if n_comp == 0:
            continue
        rings = trace_rings(comp)
        # pixel count of a ring = area + 1/2 (outer) or |area| - 1/2 (hole), see contours
        big = np.abs(rings.area) + 0.5 >= min_px
        rings = rings.select(big)
        outer = rings.area > 0
        order = np.argsort(rings.label, kind="stable")
        n_before = len(feats)
        lab_sorted = rings.label[order]
        bounds = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            members = order[a:b]
            shells = [i for i in members if outer[i]]
            if not shells:
                continue  # the region itself is too small
            shell = max(shells, key=lambda i: rings.area[i])
            holes = [rings.ring(i) * scale for i in members if not outer[i]]
            poly = shapely.Polygon(rings.ring(shell) * scale, holes)
            if options.simplify_px > 0:
                poly = shapely.simplify(poly, options.simplify_px * scale, preserve_topology=True)
            if not poly.is_valid:
                poly = shapely.make_valid(poly)
            if clip is not None:
                poly = shapely.intersection(poly, clip)
            poly = shapely.set_precision(poly, 0.01)  # two decimals, still valid
            parts = [p for p in shapely.get_parts(poly) if p.geom_type == "Polygon" and p.area > 0]
            for p in parts:
                p = shapely.orient_polygons(p)  # exterior counter-clockwise, holes clockwise (RFC 7946)
                lab = int(rings.label[shell])
                rid = str(uuid.uuid5(NAMESPACE, f"{slide.identity}:region:{cls.name}:{level}:{lab}:{len(feats) - n_before}"))
                feats.append({"type": "Feature", "id": rid, "geometry": _polygon_json(p),
                              "properties": {"objectType": "annotation", "name": cls.name,
                                             "classification": {"name": cls.name, "color": list(cls.color)},
                                             "measurements": {"Area µm^2": round(p.area * slide.mpp**2, 2)}}})
    return _encode_features(feats, gzip_level), len(feats)
