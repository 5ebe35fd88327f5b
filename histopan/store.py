"""The slide-level output store: zarr v3 following OME-NGFF 0.5 (OME-Zarr).

Layout of ``OUT.zarr``::

    zarr.json                 OME image metadata (multiscales of the low-resolution RGB pyramid) and the
                              ``histopan`` attributes: classes, provenance, run state (``complete``)
    0, 1, ...                 RGB image pyramid (c, y, x) uint8, a low-resolution overview of the slide
    labels/zarr.json          {"ome": {"labels": ["semantic", "nuclei"]}}
    labels/semantic/0, 1, ... uint8 class per pixel at the model's mpp (nucleus class included),
                              pyramid by 2x2 majority; ``image-label`` colours and class names
    labels/nuclei/0, 1, ...   uint32 nucleus instance ids (0 = none), pyramid by nearest (top-left) sampling
    tissue                    uint8 tissue region of the glass rule on the tissue mask's grid (0 glass, 1 tissue
                              mask, 2 glass enclosed by tissue; :class:`~histopan.slide.tissue.TissueRegion`),
                              absent when the run used no tissue detection (``--min-tissue 0``)
    tables/nuclei.parquet     one row per nucleus (:data:`NUCLEUS_TABLE_COLUMNS`), written tile by tile
                              (:meth:`SlideStore.nucleus_table_writer`), read back batch by batch
                              (:meth:`SlideStore.nucleus_table`)
    work/                     resume state while a run is incomplete (per-tile records, finished chunks);
                              removed when the store is marked complete

Axes are ``y, x`` (and ``c`` for the image) in micrometres, so OME-Zarr readers and napari place the labels
over the image.  Label chunks are square and all-background chunks are not stored (zarr's fill value).
The store is marked ``complete`` only at the very end; :func:`open_store` refuses an incomplete store unless
asked for a partial one.  ``histopan segment`` and ``batch`` build a store in the sibling ``OUT.zarr.partial``
and rename it to ``OUT.zarr`` once complete (:mod:`histopan.outputs`), so ``OUT.zarr`` only ever holds a
complete store; ``open_store(OUT.zarr, partial=True)`` opens the partial one while it is being built.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histopan import __version__
from histopan.classes import ClassSpec
from histopan.errors import StoreError
from histopan.outputs import STORE_FORMAT, check_output_state, creating_prefix, read_histopan_attrs, replaced_path, \
    staging_path

log = logging.getLogger(__name__)

FORMAT = STORE_FORMAT
FORMAT_VERSION = 1
NGFF_VERSION = "0.5"

#: the array of the run's tissue region (:meth:`SlideStore.tissue_region`)
TISSUE_ARRAY = "tissue"

#: Resolution of the RGB overview image: this many times the labels' mpp, at least 2 um/px.
IMAGE_MPP_FACTOR = 4.0
MIN_IMAGE_MPP = 2.0

#: the nucleus table's columns and their Arrow types: centroids in level-0 pixels and in microns, sizes in
#: microns, the mean nucleus probability, type and stuff class names, the bounding box in target pixels, and
#: whether the nucleus touched a tile's halo edge (``cut``)
NUCLEUS_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "uint32"), ("centroid_x", "float64"), ("centroid_y", "float64"), ("centroid_x_um", "float64"),
    ("centroid_y_um", "float64"), ("area_um2", "float64"), ("perimeter_um", "float64"), ("eccentricity", "float64"),
    ("solidity", "float64"), ("circularity", "float64"), ("nucleus_prob", "float64"), ("type", "string"),
    ("type_prob", "float64"), ("stuff_class", "string"), ("bbox_x", "int64"), ("bbox_y", "int64"),
    ("bbox_w", "int64"), ("bbox_h", "int64"), ("cut", "bool"),
)


def nucleus_table_schema():
    """The Arrow schema of :data:`NUCLEUS_TABLE_COLUMNS`."""
    import pyarrow as pa

    types = {"uint32": pa.uint32(), "float64": pa.float64(), "int64": pa.int64(), "string": pa.string(),
             "bool": pa.bool_()}
    return pa.schema([(name, types[kind]) for name, kind in NUCLEUS_TABLE_COLUMNS])


class NucleusTableWriter:
    """Appends batches of nucleus-table rows (column name -> values, :data:`NUCLEUS_TABLE_COLUMNS`)."""

    def __init__(self, writer: Any, schema: Any) -> None:
        self._writer, self._schema = writer, schema
        self.n_rows = 0

    def write(self, columns: Mapping[str, Any]) -> None:
        import pyarrow as pa

        table = pa.table(dict(columns), schema=self._schema)
        if table.num_rows:
            self._writer.write_table(table)
            self.n_rows += table.num_rows


class NucleusTable:
    """The store's nucleus table, read batch by batch (bounded memory, whatever the table's size)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as exc:  # ArrowInvalid: not Parquet, or cut short
            raise StoreError(f"the nucleus table cannot be read: {exc}", path=path,
                             fix="rerun 'histopan segment' with --overwrite to write the store again") from exc

    @property
    def num_rows(self) -> int:
        return int(self._file.metadata.num_rows)

    @property
    def schema(self) -> Any:
        """The file's Arrow schema."""
        return self._file.schema_arrow

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def require(self, columns: Sequence[str]) -> None:
        """Raise :class:`~histopan.errors.StoreError` naming the ``columns`` the table lacks."""
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise StoreError(f"the nucleus table lacks the columns {missing}", path=self.path,
                             fix="use a store written by 'histopan segment' of this histopan version")

    def batches(self, columns: Sequence[str], batch_size: int = 65536) -> Iterator[Any]:
        """Arrow record batches of ``columns`` (all of which the table must have), in row order."""
        self.require(columns)
        yield from self._file.iter_batches(batch_size=batch_size, columns=list(columns))


def _axes(with_channel: bool) -> list[dict[str, str]]:
    axes = [{"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    if with_channel:
        axes.insert(0, {"name": "c", "type": "channel"})
    return axes


def _multiscales(name: str, mpp: float, n_levels: int, with_channel: bool, method: str) -> list[dict]:
    datasets = []
    for level in range(n_levels):
        s = mpp * 2**level
        scale = [1.0, s, s] if with_channel else [s, s]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return [{"name": name, "axes": _axes(with_channel), "datasets": datasets,
             "type": method, "metadata": {"method": method}}]


def n_pyramid_levels(shape: tuple[int, int], smallest: int = 256) -> int:
    """Number of 2x levels until the longer side is at most ``smallest`` pixels."""
    levels = 1
    h, w = shape
    while max(h, w) > smallest:
        h, w = (h + 1) // 2, (w + 1) // 2
        levels += 1
    return levels


class SlideStore:
    """An open histopan store (read or write)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group

    # ---------------------------------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("histopan", {}))

    def update_attrs(self, **changes: Any) -> None:
        """Merge ``changes`` into the store's ``histopan`` attributes (provenance, run state)."""
        attrs = self.attrs
        attrs.update(changes)
        self.group.attrs["histopan"] = attrs

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def classes(self) -> list[ClassSpec]:
        return [ClassSpec(c["name"], tuple(c["color"]), c["kind"], id=c["id"]) for c in self.attrs["classes"]]

    @property
    def mpp(self) -> float:
        return float(self.attrs["mpp"])

    @property
    def semantic(self) -> zarr.Array:
        return self.group["labels/semantic/0"]

    @property
    def nuclei(self) -> zarr.Array:
        return self.group["labels/nuclei/0"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.semantic.shape)  # type: ignore[return-value]

    def tissue_region(self) -> Any:
        """The run's tissue region (:class:`~histopan.slide.tissue.TissueRegion`, its cells read lazily from the
        ``tissue`` array), or None when the run detected no tissue (``--min-tissue 0``): no glass rule."""
        from histopan.slide.tissue import TissueRegion

        if TISSUE_ARRAY not in self.group:
            return None
        array = self.group[TISSUE_ARRAY]
        meta = array.attrs["histopan"]
        return TissueRegion(codes=array, downsample_xy=tuple(meta["downsample_xy"]), base_mpp=float(meta["base_mpp"]),
                            margin_um=float(meta["margin_um"]))

    @property
    def table_path(self) -> Path:
        return self.path / "tables" / "nuclei.parquet"

    @property
    def has_table(self) -> bool:
        return self.table_path.is_file()

    def _require_table(self) -> None:
        if not self.has_table:
            raise StoreError("the store has no nucleus table", path=self.path,
                             fix="run 'histopan segment' to completion (rerun the same command to resume)")

    def read_table(self, columns: Sequence[str] | None = None):
        """The whole nucleus table as a pandas DataFrame (:meth:`nucleus_table` reads it in batches)."""
        import pandas as pd

        self._require_table()
        return pd.read_parquet(self.table_path, columns=list(columns) if columns else None)

    def nucleus_table(self) -> NucleusTable:
        """The nucleus table, for reading in batches; :class:`~histopan.errors.StoreError` when there is none."""
        self._require_table()
        return NucleusTable(self.table_path)

    # ------------------------------------------------------------------------------------- resume state
    @property
    def work_dir(self) -> Path:
        return self.path / "work"

    def _tile_record_path(self, index: int) -> Path:
        return self.work_dir / "tiles" / f"{index:07d}.npz"

    def has_tile(self, index: int) -> bool:
        return self._tile_record_path(index).is_file()

    def save_tile(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Record a finished tile (atomically: a killed run never leaves a half-written record)."""
        target = self._tile_record_path(index)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, target)

    def load_tile(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self._tile_record_path(index)) as data:
            return {k: data[k] for k in data.files}

    def _chunk_marker(self, key: str) -> Path:
        return self.work_dir / "chunks" / f"{key}.done"

    def chunk_done(self, key: str) -> bool:
        return self._chunk_marker(key).is_file()

    def mark_chunk_done(self, key: str) -> None:
        marker = self._chunk_marker(key)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    # ------------------------------------------------------------------------------------------ writing
    def write_labels(self, y: int, x: int, semantic: np.ndarray, nuclei: np.ndarray) -> None:
        """Write one chunk-aligned region of level 0 of both label arrays."""
        h, w = semantic.shape
        self.semantic[y:y + h, x:x + w] = semantic
        self.nuclei[y:y + h, x:x + w] = nuclei

    def write_image_level0(self, y: int, x: int, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        self.group["0"][:, y:y + h, x:x + w] = np.moveaxis(rgb, -1, 0)

    def write_overview(self, reader: Any, block: int = 1024) -> None:
        """Level 0 of the RGB overview image, read from the slide ``reader`` block by block at the store's
        ``image_mpp``."""
        image_mpp = float(self.attrs["image_mpp"])
        arr = self.group["0"]
        _, height, width = arr.shape
        ds = image_mpp / reader.require_mpp()
        w0, h0 = reader.dimensions
        for y in range(0, height, block):
            for x in range(0, width, block):
                h, w = min(block, height - y), min(block, width - x)
                lw, lh = min(w * ds, w0 - x * ds), min(h * ds, h0 - y * ds)
                rgb = reader.read_region(x * ds, y * ds, lw, lh, mpp=image_mpp, out_size=(w, h))
                self.write_image_level0(y, x, rgb)

    @contextmanager
    def nucleus_table_writer(self) -> Iterator[NucleusTableWriter]:
        """Write the nucleus table (:data:`NUCLEUS_TABLE_COLUMNS`) batch by batch; it replaces the store's
        table only once the block ends without an error."""
        import pyarrow.parquet as pq

        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.table_path.with_name("nuclei.parquet.tmp")
        schema = nucleus_table_schema()
        with pq.ParquetWriter(tmp, schema) as writer:
            yield NucleusTableWriter(writer, schema)
        os.replace(tmp, self.table_path)

    def write_table(self, table) -> None:
        """Write a whole nucleus table at once from a pandas DataFrame."""
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.table_path.with_name("nuclei.parquet.tmp")
        table.to_parquet(tmp, index=False)
        os.replace(tmp, self.table_path)

    def build_pyramids(self, block: int = 2048) -> None:
        """Fill levels 1.. of the label and image pyramids from level 0, region by region."""
        for name, method in (("labels/semantic", "majority"), ("labels/nuclei", "nearest"), ("", "mean")):
            grp = self.group[name] if name else self.group
            levels = len(grp.attrs["ome"]["multiscales"][0]["datasets"])
            for level in range(1, levels):
                src = grp[str(level - 1)]
                dst = grp[str(level)]
                _downsample_array(src, dst, method, block)

    def finalize(self, **summary: Any) -> None:
        """Mark the store complete (after everything else is written) and drop the resume state."""
        self.update_attrs(complete=True, summary=summary)
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)


def _majority_2x2(a: np.ndarray) -> np.ndarray:
    """Most frequent value in each 2x2 block (ties: the smallest value); odd edges are padded by edge."""
    h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2)), mode="edge")
    blocks = np.stack([a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2]], axis=0)
    counts = (blocks[:, None] == blocks[None, :]).sum(axis=1)  # votes for each of the 4 candidates
    # highest count, then smallest value: sort key count * 256 - value (values are uint8 classes)
    key = counts.astype(np.int32) * 512 - blocks.astype(np.int32)
    return np.take_along_axis(blocks, key.argmax(axis=0)[None], axis=0)[0]


def _downsample_array(src: zarr.Array, dst: zarr.Array, method: str, block: int) -> None:
    spatial = src.shape[-2:]
    for y in range(0, spatial[0], block):
        for x in range(0, spatial[1], block):
            region = src[..., y:y + block, x:x + block]
            if method == "nearest":
                out = region[..., ::2, ::2]
            elif method == "majority":
                out = _majority_2x2(region)
            else:
                h, w = region.shape[-2:]
                pad = [(0, 0)] * (region.ndim - 2) + [(0, h % 2), (0, w % 2)]
                r = np.pad(region, pad, mode="edge").astype(np.float32)
                out = (r[..., 0::2, 0::2] + r[..., 0::2, 1::2] + r[..., 1::2, 0::2] + r[..., 1::2, 1::2]) / 4
                out = np.round(out).astype(src.dtype)
            if not out.any() and method != "mean":
                continue  # leave empty chunks unwritten
            oy, ox = y // 2, x // 2
            dst[..., oy:oy + out.shape[-2], ox:ox + out.shape[-1]] = out


def overview_geometry(reader: Any, labels_mpp: float) -> tuple[tuple[int, int], float]:
    """Shape ``(height, width)`` and mpp of the RGB overview image of the slide ``reader`` for labels at
    ``labels_mpp`` (:data:`IMAGE_MPP_FACTOR` times coarser, at least :data:`MIN_IMAGE_MPP`)."""
    image_mpp = max(labels_mpp * IMAGE_MPP_FACTOR, MIN_IMAGE_MPP)
    w0, h0 = reader.dimensions
    base_mpp = reader.require_mpp()
    return (max(int(h0 * base_mpp / image_mpp), 1), max(int(w0 * base_mpp / image_mpp), 1)), image_mpp


def slide_attributes(reader: Any) -> dict[str, Any]:
    """What a store records about its slide (the ``slide`` attribute): identity, path, mpp, size, scanner."""
    return {"identity": reader.identity, "path": str(reader.path), "name": reader.path.name,
            "mpp": reader.require_mpp(), "width": int(reader.dimensions[0]), "height": int(reader.dimensions[1]),
            "vendor": reader.vendor, "objective_power": reader.objective_power}


def create_store(
    path: str | os.PathLike[str],
    *,
    shape: tuple[int, int],
    mpp: float,
    chunk: int,
    classes: Sequence[ClassSpec],
    image_shape: tuple[int, int],
    image_mpp: float,
    name: str,
    run: dict[str, Any],
    tissue: Any = None,
) -> SlideStore:
    """Create a new, incomplete store at ``path`` (the caller has checked that it may be written).

    ``tissue`` (a :class:`~histopan.slide.tissue.TissueRegion`) is the run's tissue region: kept as the
    ``tissue`` array, with its areas in the ``tissue`` attribute, so every process of the run reads the same
    region (and QC compares the tissue classes' area with the tissue mask's).

    Creation is atomic: the store is built in a temporary sibling folder (:func:`histopan.outputs.creating_prefix`)
    and renamed to ``path`` once it carries its ``histopan`` attributes, so a kill or a full disk during
    creation never leaves a half-made store under ``path`` (a later run removes the temporary folder).
    """
    path = Path(path)
    tmp = path.with_name(f"{creating_prefix(path)}{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        _build_store(tmp, shape=shape, mpp=mpp, chunk=chunk, classes=classes, image_shape=image_shape,
                     image_mpp=image_mpp, name=name, run=run, tissue=tissue)
        os.rename(tmp, path)
    finally:
        if tmp.exists():  # the build or the rename failed: leave nothing behind (the error propagates)
            shutil.rmtree(tmp)
    return SlideStore(path, zarr.open_group(path, mode="r+", zarr_format=3))


def _build_store(path: Path, *, shape: tuple[int, int], mpp: float, chunk: int, classes: Sequence[ClassSpec],
                 image_shape: tuple[int, int], image_mpp: float, name: str, run: dict[str, Any],
                 tissue: Any = None) -> None:
    root = zarr.open_group(path, mode="w", zarr_format=3)
    # OME-NGFF readers expect the image and its labels to have the same number of pyramid levels; the image
    # pyramid starts coarser (image_mpp), so it simply reaches smaller sizes.
    n_lab = n_pyramid_levels(shape)
    n_img = n_lab
    root.attrs["ome"] = {"version": NGFF_VERSION,
                         "multiscales": _multiscales(name, image_mpp, n_img, True, "mean")}
    for level in range(n_img):
        h, w = (-(-image_shape[0] // 2**level), -(-image_shape[1] // 2**level))
        root.create_array(str(level), shape=(3, h, w), chunks=(3, min(h, 1024), min(w, 1024)), dtype="uint8",
                          fill_value=255, dimension_names=["c", "y", "x"])
    labels = root.create_group("labels")
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": ["semantic", "nuclei"]}
    for label_name, dtype, method in (("semantic", "uint8", "majority"), ("nuclei", "uint32", "nearest")):
        grp = labels.create_group(label_name)
        image_label: dict[str, Any] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
        if label_name == "semantic":
            image_label["colors"] = [{"label-value": c.id, "rgba": [*c.color, 255]} for c in classes]
            image_label["properties"] = [{"label-value": c.id, "class": c.name, "kind": c.kind} for c in classes]
        grp.attrs["ome"] = {"version": NGFF_VERSION,
                            "multiscales": _multiscales(label_name, mpp, n_lab, False, method),
                            "image-label": image_label}
        for level in range(n_lab):
            h, w = (-(-shape[0] // 2**level), -(-shape[1] // 2**level))
            grp.create_array(str(level), shape=(h, w), chunks=(min(chunk, h), min(chunk, w)), dtype=dtype,
                             fill_value=0, dimension_names=["y", "x"])
    attrs = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "histopan_version": __version__,
        "complete": False, "mpp": mpp, "chunk": chunk, "image_mpp": image_mpp,
        "classes": [c.to_json() for c in classes], "run": run,
    }
    if tissue is not None:
        attrs["tissue"] = _write_tissue(root, tissue)
    root.attrs["histopan"] = attrs


def _write_tissue(root: zarr.Group, region: Any) -> dict[str, Any]:
    """Write the tissue region's cells as the ``tissue`` array; returns the store's ``tissue`` attribute."""
    from histopan.slide.tissue import ENCLOSED, GLASS, TISSUE

    codes = np.asarray(region.codes, np.uint8)
    h, w = codes.shape
    array = root.create_array(TISSUE_ARRAY, shape=(h, w), chunks=(min(512, h), min(512, w)), dtype="uint8",
                              fill_value=GLASS, dimension_names=["y", "x"])
    array[:] = codes
    cell_y, cell_x = region.cell_um
    array.attrs["histopan"] = {"codes": {"glass": GLASS, "tissue": TISSUE, "enclosed": ENCLOSED},
                               "downsample_xy": list(region.downsample_xy), "base_mpp": region.base_mpp,
                               "margin_um": region.margin_um, "cell_um": [cell_y, cell_x]}
    return {"mask_area_mm2": region.area_mm2(TISSUE), "enclosed_area_mm2": region.area_mm2(ENCLOSED),
            "margin_um": region.margin_um, "cell_um": [cell_y, cell_x]}


def open_store(path: str | os.PathLike[str], *, partial: bool = False) -> SlideStore:
    """Open an existing store for reading; an incomplete one is refused unless ``partial``."""
    path = Path(path)
    if not path.exists():
        staging = staging_path(path)
        if replaced_path(path).is_dir():
            raise StoreError("a run that was replacing this store was interrupted", path=path,
                             fix="rerun the same 'histopan segment' command to finish the swap")
        if staging.is_dir():
            if partial:
                return open_store(staging, partial=True)
            raise StoreError(f"the store is incomplete (its run was interrupted or is still running; the "
                             f"partial result is {staging.name})", path=path,
                             fix="rerun the same 'histopan segment' command to finish it, or pass --partial")
        raise StoreError("no such store", path=path, fix="check the path, or create it with 'histopan segment'")
    if not (path / "zarr.json").is_file():
        raise StoreError("not a zarr v3 store (no zarr.json)", path=path,
                         fix="pass the OUT.zarr folder written by 'histopan segment'")
    try:
        group = zarr.open_group(path, mode="r+" if partial else "r", zarr_format=3)
    except (ValueError, KeyError, json.JSONDecodeError, FileNotFoundError) as exc:
        raise StoreError(f"cannot open the zarr store: {exc}", path=path,
                         fix="pass the OUT.zarr folder written by 'histopan segment'") from exc
    meta = group.attrs.get("histopan")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError("not a histopan store (no 'histopan' attributes)", path=path,
                         fix="pass a store written by 'histopan segment'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"the store has format version {meta.get('format_version')!r}; this histopan "
                         f"({__version__}) reads version {FORMAT_VERSION}", path=path,
                         value=meta.get("histopan_version"),
                         fix="open it with the histopan version that wrote it, or segment the slide again")
    store = SlideStore(path, group)
    if not store.complete and not partial:
        raise StoreError("the store is incomplete (its run was interrupted or is still running)", path=path,
                         fix="rerun the same 'histopan segment' command to finish it, or pass --partial")
    return store


def open_for_run(path: str | os.PathLike[str], run_key: dict[str, Any], overwrite: bool) -> SlideStore | None:
    """Decide what a run on the output ``path`` may do (call it under :func:`histopan.outputs.output_lock`).

    The run builds its store in ``staging_path(path)`` and swaps it in when complete
    (:func:`histopan.outputs.publish`); first, what a killed run left is finished or undone
    (:func:`histopan.outputs.recover`).  Returns the store of the same run (same ``run_key``) in
    ``staging_path(path)`` to resume (complete, when the run was stopped just before its swap), or None:
    create the store at ``staging_path(path)``.

    - a complete store at ``path``: refused unless ``overwrite`` (then kept until the new one is complete);
    - an unfinished store of another run: refused unless ``overwrite`` (then removed: it holds no result);
    - something at ``path`` that is not a histopan store: always refused (an empty folder is removed).
    """
    path = Path(path)
    staging = staging_path(path)
    attrs = check_output_state(path, overwrite)
    if attrs is None and path.exists():
        path.rmdir()  # an empty folder
    elif attrs is not None and not attrs.get("complete"):  # left by an older histopan, which built in place
        if staging.exists():
            raise StoreError(f"two unfinished stores are in the way ({path.name} and {staging.name})",
                             path=path, fix="delete the one you do not need, then rerun")
        log.info("moving the unfinished store %s to %s to finish it there", path, staging)
        os.rename(path, staging)
    elif attrs is not None:
        log.info("building a new store beside %s; it replaces the old one once complete (--overwrite)", path)
    if not staging.exists():
        return None
    if read_histopan_attrs(staging) is None:
        raise StoreError("this folder is in the way of the run's unfinished store, and it is not a histopan store",
                         path=staging, fix="move it away or delete it, then rerun")
    store = open_store(staging, partial=True)
    if store.attrs.get("run", {}).get("key") == run_key:
        log.info("resuming the unfinished store %s", staging)
        return store
    if overwrite:
        log.info("removing the unfinished store of another run %s (--overwrite)", staging)
        shutil.rmtree(staging)
        return None
    raise StoreError("an unfinished store from a different run (other slide, model or settings) is in the way",
                     path=staging, fix="pass --overwrite to replace it, or choose another output path")
