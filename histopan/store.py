"""The slide-level output store: zarr v3 following OME-NGFF 0.5 (OME-Zarr).

Layout of ``OUT.zarr``::

    zarr.json                 OME image metadata (multiscales of the low-resolution RGB pyramid) and the
                              ``histopan`` attributes: classes, provenance, run state (``complete``)
    0, 1, ...                 RGB image pyramid (c, y, x) uint8, a low-resolution overview of the slide
    labels/zarr.json          {"ome": {"labels": ["semantic", "nuclei"]}}
    labels/semantic/0, 1, ... uint8 class per pixel at the model's mpp (nucleus class included),
                              pyramid by 2x2 majority; ``image-label`` colours and class names
    labels/nuclei/0, 1, ...   uint32 nucleus instance ids (0 = none), pyramid by nearest (top-left) sampling
    tables/nuclei.parquet     one row per nucleus
    work/                     resume state while a run is incomplete (per-tile records, finished chunks);
                              removed when the store is marked complete

Axes are ``y, x`` (and ``c`` for the image) in micrometres, so OME-Zarr readers and napari place the labels
over the image.  Label chunks are square and all-background chunks are not stored (zarr's fill value).
The store is marked ``complete`` only at the very end; :func:`open_store` refuses an incomplete store unless
asked for a partial one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histopan import __version__
from histopan.classes import ClassSpec
from histopan.errors import StoreError

log = logging.getLogger(__name__)

FORMAT = "histopan-store"
FORMAT_VERSION = 1
NGFF_VERSION = "0.5"


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

    @property
    def table_path(self) -> Path:
        return self.path / "tables" / "nuclei.parquet"

    def read_table(self, columns: Sequence[str] | None = None):
        import pandas as pd

        if not self.table_path.is_file():
            raise StoreError("the store has no nucleus table", path=self.path,
                             fix="run 'histopan segment' to completion (rerun the same command to resume)")
        return pd.read_parquet(self.table_path, columns=list(columns) if columns else None)

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

    def write_table(self, table) -> None:
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
) -> SlideStore:
    """Create a new, incomplete store (the caller has checked that ``path`` may be written)."""
    path = Path(path)
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
    root.attrs["histopan"] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "histopan_version": __version__,
        "complete": False, "mpp": mpp, "chunk": chunk, "image_mpp": image_mpp,
        "classes": [c.to_json() for c in classes], "run": run,
    }
    return SlideStore(path, root)


def open_store(path: str | os.PathLike[str], *, partial: bool = False) -> SlideStore:
    """Open an existing store for reading; an incomplete one is refused unless ``partial``."""
    path = Path(path)
    if not path.exists():
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
    store = SlideStore(path, group)
    if not store.complete and not partial:
        raise StoreError("the store is incomplete (its run was interrupted or is still running)", path=path,
                         fix="rerun the same 'histopan segment' command to finish it, or pass --partial")
    return store


def open_for_run(path: str | os.PathLike[str], run_key: dict[str, Any], overwrite: bool) -> SlideStore | None:
    """Decide what a run may do with ``path``: resume it (returns the store), or start fresh (None).

    - no store: None (create it);
    - an incomplete store of the same run (same ``run_key``): resume;
    - a complete store, or an incomplete one of another run: refused unless ``overwrite`` (then removed).
    """
    path = Path(path)
    if not path.exists():
        return None
    if not (path / "zarr.json").is_file() and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return None
    if not (path / "zarr.json").is_file():
        if overwrite:
            raise StoreError("refusing to overwrite something that is not a histopan store", path=path,
                             fix="choose another output path or delete it yourself")
        raise StoreError("the output path exists and is not a histopan store", path=path,
                         fix="choose another output path")
    store = open_store(path, partial=True)
    if overwrite:
        log.info("removing the existing store %s (--overwrite)", path)
        shutil.rmtree(path)
        return None
    if store.complete:
        raise StoreError("the store already exists and is complete", path=path,
                         fix="pass --overwrite to replace it, or choose another output path")
    previous = store.attrs.get("run", {}).get("key")
    if previous != run_key:
        raise StoreError("an unfinished store from a different run (other slide, model or settings) is in the way",
                         path=path, fix="pass --overwrite to replace it, or choose another output path")
    log.info("resuming the unfinished store %s", path)
    return store
