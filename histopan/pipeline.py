"""Slide-level panoptic segmentation: the orchestration of every stage (the only module that knows paths,
dask, torch and zarr together).

    slide -> tissue tiles at the model's mpp -> batched inference -> watershed per tile
          -> ownership (each nucleus owned by one tile, global ids) -> per-chunk painting + fusion -> store

Two passes keep memory bounded and make the run resumable:

1. *Tiles*: for each tissue tile, read core + halo (dask, threaded, one task per tile), run the network in
   batches, post-process, keep the nuclei the tile owns and its stuff core; the small result is recorded in
   the store's ``work/`` folder.  Batches are fixed slices of the tile list, so a resumed run feeds the
   network exactly the same batches as an uninterrupted one and the arrays come out byte-identical.
2. *Chunks*: every label chunk is painted from the records of the tiles that reach it (its own tile and its
   neighbours), fused (things over stuff) and written once; no two writers share a chunk.

Then the nucleus table, a low-resolution RGB pyramid and the label pyramids are written and the store is
marked complete.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from histopan import __version__
from histopan.config import to_dict
from histopan.checks import check_mpp, check_output
from histopan.errors import ConfigError
from histopan.panoptic import absorb_small_regions, fuse, stuff_argmax
from histopan.stitching import IdScheme, OwnedObjects, deduplicate, own_objects, paint
from histopan.store import SlideStore, create_store, open_for_run
from histopan.tiling import TileGrid

log = logging.getLogger(__name__)

#: Resolution of the store's RGB overview image: this many times the model's mpp, at least 2 um/px.
IMAGE_MPP_FACTOR = 4.0
MIN_IMAGE_MPP = 2.0

#: record arrays with one entry per owned nucleus (filtered by de-duplication before the table is written)
PER_NUCLEUS_KEYS = frozenset({"ids", "local_ids", "bboxes", "centroids", "cut", "area_px", "perimeter_px",
                              "eccentricity", "solidity", "nucleus_prob", "type", "type_prob", "stuff_class"})


@dataclass(frozen=True)
class SegmentOptions:
    """Settings of one ``histopan segment`` run (the model's own config supplies the rest)."""

    model: str = "default"
    mpp: float | None = None  # slide microns per pixel, overriding the file's metadata
    device: str | None = None  # "cuda", "cpu", "cuda:1"; None = cuda when available
    tile: int | None = None  # core size at the model's mpp; None = the model's
    halo: int | None = None  # None = the model's
    batch_size: int = 8
    workers: int = 2  # threads for reading and post-processing
    overwrite: bool = False
    min_tissue: float = 0.01  # minimum tissue fraction of a tile's core (0 = every tile)
    origin: tuple[int, int] = (0, 0)  # grid origin (for seam tests); chunks always start at 0
    tta: bool = False  # test-time augmentation: logits averaged over 8 flips / rotations (8x inference)

    def __post_init__(self) -> None:
        if self.mpp is not None:
            check_mpp(self.mpp, what="--mpp", fix="pass e.g. --mpp 0.25 for a 40x slide or --mpp 0.5 for 20x",
                      error=ConfigError)
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number", value=value,
                                  fix=f"pass e.g. --{name.replace('_', '-')} 4")
        if self.tile is not None and (self.tile < 64 or self.tile % 32):
            raise ConfigError("--tile must be a multiple of 32 and at least 64", value=self.tile,
                              fix="pass e.g. --tile 512")
        if not isinstance(self.tta, bool):
            raise ConfigError("tta must be true or false", value=self.tta, fix="pass --tta to switch it on")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError("the minimum tissue fraction must be in [0, 1]", value=self.min_tissue,
                              fix="use e.g. 0.01")


@dataclass
class SegmentResult:
    """What a finished run reports (also stored as the store's ``summary``)."""

    store: Path
    n_nuclei: int
    n_tiles: int
    n_tissue_tiles: int
    n_cut: int
    stuff_area_mm2: dict[str, float]
    megapixels: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    resumed_tiles: int = 0

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"store": str(self.store), "n_nuclei": self.n_nuclei, "n_tiles": self.n_tiles,
                "n_tissue_tiles": self.n_tissue_tiles, "n_cut": self.n_cut, "stuff_area_mm2": self.stuff_area_mm2,
                "megapixels": self.megapixels, "seconds": self.seconds,
                "megapixels_per_second": self.megapixels_per_second, "timings": self.timings,
                "resumed_tiles": self.resumed_tiles}


Progress = Callable[[str, dict[str, Any]], None]


class _Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


# ----------------------------------------------------------------------------------------- per tile (pure)


def process_tile(maps: Any, tile: Any, grid: TileGrid, model_config: Any, ids: IdScheme) -> dict[str, np.ndarray]:
    """Probability maps of one tile window -> its record: owned nuclei, their measurements, its stuff core."""
    from histopan.postprocess import postprocess_tile, shape_features

    read_sl = tile.read_in_window
    labels = postprocess_tile(maps, grid.mpp, model_config.postprocess, model_config.classes)
    instances = labels.instances[read_sl]
    # The window may stick out of the slide (white padding): what remains of an object after cropping to the
    # slide must still pass the minimum area, or slivers along the slide border would become nuclei.
    if instances.shape != labels.instances.shape:
        area = np.bincount(instances.ravel(), minlength=int(labels.instances.max()) + 1)
        too_small = area < model_config.postprocess.min_area_um2 / grid.mpp**2
        too_small[0] = False
        if too_small.any():
            instances = np.where(too_small[instances], 0, instances).astype(instances.dtype)
    stuff_ids = np.asarray(model_config.stuff_indices, dtype=np.intp)
    stuff = stuff_argmax(maps.semantic[:, read_sl[0], read_sl[1]], stuff_ids)
    stuff = absorb_small_regions(stuff, model_config.postprocess.min_stuff_area_um2, grid.mpp)
    owned = own_objects(instances, tile.read.as_tuple(), tile.core.as_tuple(), grid.shape, tile.index, ids)
    record = owned.to_arrays()
    record["stuff"] = stuff[tile.core.slices_in(tile.read)]
    n = len(owned)
    if n:
        local = owned.local_ids
        shape = shape_features(instances, local)
        rows = labels.nuclei.set_index("id").loc[local.astype(np.uint32)]  # ids of the window = of the read crop
        # majority stuff class under each nucleus
        lab = instances.ravel().astype(np.int64)
        votes = np.zeros((int(lab.max()) + 1, len(model_config.classes)), np.int64)
        fg = lab > 0
        np.add.at(votes, (lab[fg], stuff.ravel()[fg]), 1)
        record.update({
            "area_px": shape["area"].astype(np.int64),
            "perimeter_px": shape["perimeter"],
            "eccentricity": shape["eccentricity"],
            "solidity": shape["solidity"],
            "nucleus_prob": rows["nucleus_prob"].to_numpy(np.float64),
            "type": rows["type"].to_numpy(np.int64),
            "type_prob": rows["type_prob"].to_numpy(np.float64),
            "stuff_class": votes[local].argmax(axis=1).astype(np.int64),
        })
    return record


def _timed_process_tile(*args: Any) -> tuple[dict[str, np.ndarray], float]:
    t = time.perf_counter()
    record = process_tile(*args)
    return record, time.perf_counter() - t


# --------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class ModelRef:
    """A loaded model without its network: where it lives, its weights' sha256 and its config.

    What a pickled :class:`RunPlan` carries instead of the :class:`~histopan.model.checkpoint.LoadedModel`,
    so shipping a plan to another process never copies the weights; that process loads the network from
    ``path`` itself (and should check ``weights_sha256``).
    """

    path: Path
    weights_sha256: str
    config: Any  # ModelConfig


@dataclass
class RunPlan:
    """Everything one slide's run needs, decided once before any tile is read (see :func:`plan_run`).

    Plain data (paths, the grid, tile indices): it pickles, so a distributed batch can ship it to workers,
    which reopen the slide and the store by path.  Pickling replaces the model by its :class:`ModelRef`.
    """

    slide: Path
    slide_mpp: float | None  # the user's override, if any (workers reopen the slide with it)
    out: Path
    model: Any  # LoadedModel (a ModelRef once the plan has been pickled)
    grid: TileGrid
    selected: np.ndarray  # tissue tiles, row-major indices
    batches: list[np.ndarray]  # fixed slices of ``selected``: the network always sees the same batches
    ids: IdScheme
    base_mpp: float
    tissue_seconds: float

    @property
    def config(self) -> Any:
        return self.model.config

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        model = state["model"]
        if not isinstance(model, ModelRef):
            state["model"] = ModelRef(Path(model.path), model.weights_sha256, model.config)
        return state

    def pending_batches(self, store: SlideStore) -> list[np.ndarray]:
        """Batches with at least one tile not yet recorded (a resumed run recomputes whole batches)."""
        return [b for b in self.batches if not all(store.has_tile(int(t)) for t in b)]


def plan_run(slide: str | PathLike[str], out: str | PathLike[str], options: SegmentOptions,
             model: Any = None) -> tuple[RunPlan, SlideStore]:
    """Open the slide and the model, lay the grid, find the tissue tiles, and create or resume the store.

    ``model`` (a LoadedModel) may be passed to reuse one already loaded; else ``options.model`` is loaded.
    """
    from histopan.model.checkpoint import load_model
    from histopan.slide import open_slide
    from histopan.slide.tissue import select_tiles, tissue_mask

    out = check_output(out, folder=True, suffixes=(".zarr",))
    with open_slide(slide, mpp=options.mpp) as reader:
        base_mpp = reader.require_mpp()
        model = model if model is not None else load_model(options.model)
        model = model.for_tta(options.tta)  # TTA runs use the thresholds tuned on TTA maps, where the model has them
        cfg = model.config
        tile_size = options.tile or cfg.tile
        halo = cfg.halo if options.halo is None else options.halo
        if (tile_size + 2 * halo) % 32:
            raise ConfigError("tile + 2 * halo must be a multiple of 32", value=(tile_size, halo),
                              fix="use a halo that is a multiple of 16, e.g. 64")
        work_mpp = reader.snap_mpp(cfg.mpp)
        grid = TileGrid.for_slide(reader, work_mpp, tile_size, halo, tuple(options.origin))
        classes = list(cfg.classes)  # numbered by the model config: id = pixel value
        min_area_px = max(cfg.postprocess.min_area_um2 / work_mpp**2, 1.0)
        ids = IdScheme.for_grid(len(grid), (tile_size + 2 * halo) ** 2, min_area_px)

        t0 = time.perf_counter()
        boxes = grid.boxes("core", level0=True)
        selected = (np.arange(len(grid)) if options.min_tissue <= 0
                    else select_tiles(tissue_mask(reader), boxes, min_fraction=options.min_tissue))
        tissue_seconds = time.perf_counter() - t0

        run_key = {"slide": reader.identity, "model": model.weights_sha256, "mpp": work_mpp, "tile": tile_size,
                   "halo": halo, "origin": list(grid.origin), "min_tissue": options.min_tissue,
                   "postprocess": to_dict(cfg.postprocess), "tta": options.tta, "histopan": __version__}
        store = open_for_run(out, run_key, options.overwrite)
        if store is None:
            image_mpp = max(work_mpp * IMAGE_MPP_FACTOR, MIN_IMAGE_MPP)
            w0, h0 = reader.dimensions
            image_shape = (max(int(h0 * base_mpp / image_mpp), 1), max(int(w0 * base_mpp / image_mpp), 1))
            store = create_store(
                out, shape=grid.shape, mpp=work_mpp, chunk=tile_size, classes=classes, image_shape=image_shape,
                image_mpp=image_mpp, name=reader.path.name,
                run={"key": run_key, "model": {"name": cfg.name, "path": str(model.path),
                                               "weights_sha256": model.weights_sha256, "config": to_dict(cfg)},
                     "options": to_dict(options), "tiles": [int(t) for t in selected]},
            )
            store.update_attrs(
                slide={"identity": reader.identity, "path": str(reader.path), "name": reader.path.name,
                       "mpp": base_mpp, "width": int(reader.dimensions[0]), "height": int(reader.dimensions[1]),
                       "vendor": reader.vendor, "objective_power": reader.objective_power},
                downsample=grid.downsample,
                tiling={"tile": tile_size, "halo": halo, "origin": list(grid.origin), "n_tiles": len(grid),
                        "n_tissue_tiles": int(len(selected)), "id_stride": ids.stride},
            )
        batches = [selected[i:i + options.batch_size] for i in range(0, len(selected), options.batch_size)]
        plan = RunPlan(slide=reader.path, slide_mpp=options.mpp, out=out, model=model, grid=grid,
                       selected=selected, batches=batches, ids=ids, base_mpp=base_mpp,
                       tissue_seconds=tissue_seconds)
    return plan, store


def read_windows(reader: Any, grid: TileGrid, batch: Sequence[int], workers: int = 1) -> np.ndarray:
    """The core + halo windows of the tiles ``batch`` as one (N, T, T, 3) uint8 array (dask, in this process:
    ``workers`` threads, the synchronous scheduler for one)."""
    from histopan.tiling import compute_local, tile_stack

    return compute_local(tile_stack(reader, grid, [int(i) for i in batch]), workers)


def finish_run(plan: RunPlan, store: SlideStore, emit: Progress, timer: _Timer, t_start: float,
               resumed: int) -> SegmentResult:
    """Pass 2 (paint, fuse, write every chunk), the nucleus table, the overview image and the pyramids;
    then mark the store complete."""
    from histopan.slide import open_slide

    cfg = plan.config
    grid = plan.grid
    t = time.perf_counter()
    recorded = np.zeros(len(grid), bool)
    recorded[plan.selected] = True
    classes = store.classes
    keep = _deduplicate_all(store, grid, recorded)
    stuff_px, n_cut = _paint_chunks(store, grid, recorded, keep, cfg.nucleus_index, len(classes), emit, timer)
    timer.add("stitch_write", time.perf_counter() - t)
    if n_cut:
        log.warning("%d object(s) touched the edge of a tile's halo and may be larger than the halo (%d px); they "
                    "are kept as seen and flagged 'cut' in the nucleus table (a larger --tile halo avoids this)",
                    n_cut, grid.halo)

    t = time.perf_counter()
    n_nuclei = _write_table(store, grid, plan.selected, keep, cfg, plan.base_mpp)
    with open_slide(plan.slide, mpp=plan.slide_mpp) as reader:
        _write_overview(store, reader, store.attrs["image_mpp"])
    store.build_pyramids()
    timer.add("table_pyramid", time.perf_counter() - t)

    px_area_mm2 = (grid.mpp * 1e-3) ** 2
    stuff_area = {c.name: float(stuff_px[c.id]) * px_area_mm2 for c in classes}
    tile = grid.tile
    result = SegmentResult(store=plan.out, n_nuclei=n_nuclei, n_tiles=len(grid),
                           n_tissue_tiles=int(len(plan.selected)), n_cut=n_cut, stuff_area_mm2=stuff_area,
                           megapixels=float(len(plan.selected)) * tile * tile / 1e6,
                           seconds=time.perf_counter() - t_start, timings=dict(timer.totals), resumed_tiles=resumed)
    store.finalize(**result.to_json())
    emit("done", result.to_json())
    return result


def segment_slide(slide: str | PathLike[str], out: str | PathLike[str], options: SegmentOptions = SegmentOptions(),
                  progress: Progress | None = None) -> SegmentResult:
    """Segment one slide into the store ``out`` (see the module docstring).  Resumes an unfinished store of
    the same run; refuses to replace a complete one unless ``options.overwrite``."""
    import torch

    from histopan.inference import TileInferencer
    from histopan.slide import open_slide

    t_start = time.perf_counter()
    timer = _Timer()
    emit = progress or (lambda event, data: None)
    plan, store = plan_run(slide, out, options)
    timer.add("tissue", plan.tissue_seconds)
    grid, cfg, ids, selected = plan.grid, plan.config, plan.ids, plan.selected
    emit("start", {"n_tiles": int(len(selected)), "grid": len(grid), "mpp": grid.mpp, "shape": grid.shape})

    # ---------------------------------------------------------------------------- pass 1: tiles
    todo = plan.pending_batches(store)
    resumed = int(len(selected) - sum(len(b) for b in todo))
    if resumed:
        log.info("resuming: %d of %d tissue tiles already done", resumed, len(selected))
    emit("tiles_done", {"done": resumed, "nuclei": 0})
    inferencer = TileInferencer(plan.model, device=options.device, batch_size=options.batch_size, tta=options.tta)
    n_nuclei_pass1 = 0
    with open_slide(plan.slide, mpp=plan.slide_mpp) as reader, \
            ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="histopan-post") as post_pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="histopan-read") as read_pool:

        def read(batch: np.ndarray) -> tuple[np.ndarray, float]:
            t = time.perf_counter()
            windows = read_windows(reader, grid, batch, options.workers)
            return windows, time.perf_counter() - t

        done = resumed
        in_flight: list[tuple[np.ndarray, list[Future]]] = []

        def collect(batch: np.ndarray, futures: list[Future]) -> None:
            nonlocal done, n_nuclei_pass1
            for i, fut in zip(batch, futures):
                record, seconds = fut.result()
                store.save_tile(int(i), record)
                n_nuclei_pass1 += int(record["ids"].size)
                timer.add("postprocess", seconds)
            done += len(batch)
            emit("tiles_done", {"done": done, "nuclei": n_nuclei_pass1})

        # Reading runs one batch ahead and post-processing one batch behind the network, so on a GPU
        # node the accelerator does not wait for the CPU stages.
        pending: Future | None = read_pool.submit(read, todo[0]) if todo else None
        for k, batch in enumerate(todo):
            windows, t_read = pending.result()  # type: ignore[union-attr]
            timer.add("read", t_read)
            pending = read_pool.submit(read, todo[k + 1]) if k + 1 < len(todo) else None
            t = time.perf_counter()
            maps = inferencer.predict(windows)
            if inferencer.device.type == "cuda":
                torch.cuda.synchronize(inferencer.device)
            timer.add("model", time.perf_counter() - t)
            in_flight.append((batch, [post_pool.submit(_timed_process_tile, m, grid[int(i)], grid, cfg, ids)
                                      for m, i in zip(maps, batch)]))
            del maps, windows
            while len(in_flight) > 1:
                collect(*in_flight.pop(0))
        while in_flight:
            collect(*in_flight.pop(0))

    # --------------------------------------------------------------- pass 2, table, pyramids
    return finish_run(plan, store, emit, timer, t_start, resumed)


class _RecordCache:
    """Tile records loaded from the store, least recently used dropped first (bounded memory).

    ``get`` returns the tile's owned nuclei (only those kept by de-duplication once ``keep`` has an entry
    for the tile) and its stuff core.
    """

    def __init__(self, store: SlideStore, capacity: int, keep: dict[int, np.ndarray] | None = None) -> None:
        self.store = store
        self.capacity = capacity
        self.keep = keep if keep is not None else {}
        self.items: OrderedDict[int, tuple[OwnedObjects, np.ndarray]] = OrderedDict()

    def get(self, index: int) -> tuple[OwnedObjects, np.ndarray]:
        if index in self.items:
            self.items.move_to_end(index)
            objs, stuff = self.items[index]
        else:
            arrays = self.store.load_tile(index)
            objs, stuff = OwnedObjects.from_arrays(arrays), arrays["stuff"]
            self.items[index] = (objs, stuff)
            if len(self.items) > self.capacity:
                self.items.popitem(last=False)
        if index in self.keep:
            objs = objs.subset(self.keep[index])
        return objs, stuff


def _neighbours(grid: TileGrid, tile: Any) -> list[Any]:
    """The tiles around ``tile`` whose read boxes can overlap its own (halo < tile: the 8 neighbours)."""
    out = []
    for r in range(max(tile.row - 1, 0), min(tile.row + 2, grid.n_rows)):
        for c in range(max(tile.col - 1, 0), min(tile.col + 2, grid.n_cols)):
            if (r, c) != (tile.row, tile.col):
                out.append(grid.tile_at(r, c))
    return out


def _deduplicate_all(store: SlideStore, grid: TileGrid, recorded: np.ndarray) -> dict[int, np.ndarray]:
    """Keep flags of every recorded tile's nuclei, decided in ascending tile (= id) order."""
    keep: dict[int, np.ndarray] = {}
    cache = _RecordCache(store, capacity=4 * (grid.n_cols + 2), keep=keep)
    for index in np.flatnonzero(recorded):
        tile = grid[int(index)]
        objs, _ = cache.get(int(index))
        earlier = [cache.get(t.index)[0] for t in _neighbours(grid, tile) if t.index < index and recorded[t.index]]
        keep[int(index)] = deduplicate(objs, earlier)
    n_dropped = sum(int((~k).sum()) for k in keep.values())
    if n_dropped:
        log.info("dropped %d duplicate nuclei seen by two neighbouring tiles", n_dropped)
    return keep


def _paint_chunks(store: SlideStore, grid: TileGrid, recorded: np.ndarray, keep: dict[int, np.ndarray],
                  thing_id: int, n_classes: int, emit: Progress, timer: _Timer) -> tuple[np.ndarray, int]:
    """Pass 2: paint, fuse and write every chunk that any recorded tile reaches. Returns stuff pixel counts."""
    chunk = int(store.attrs["chunk"])
    height, width = grid.shape
    cache = _RecordCache(store, capacity=4 * (grid.n_cols + 2), keep=keep)
    counts = np.zeros(max(n_classes, thing_id + 1), np.int64)
    n_cut = 0
    counted_cut: set[int] = set()
    halo = grid.halo
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            h, w = min(chunk, height - y), min(chunk, width - x)
            # tiles whose read box can reach this chunk: cores within one halo of it
            r0, c0 = grid.owner_of(max(y - halo, 0), max(x - halo, 0))
            r1, c1 = grid.owner_of(min(y + h + halo, height) - 1, min(x + w + halo, width) - 1)
            near = [grid.tile_at(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
            near = [t for t in near if recorded[t.index]]
            if not near:
                continue
            key = f"{y // chunk}_{x // chunk}"
            records = {t.index: cache.get(t.index) for t in near}
            for t in near:
                if t.index not in counted_cut:
                    counted_cut.add(t.index)
                    n_cut += int(records[t.index][0].cut.sum())
            if store.chunk_done(key):
                sem = store.semantic[y:y + h, x:x + w]
                counts += np.bincount(sem.ravel(), minlength=counts.size)[:counts.size]
                continue
            stuff = np.zeros((h, w), np.uint8)  # background where no tile was processed
            for t in near:
                core = t.core
                oy0, ox0 = max(core.y, y), max(core.x, x)
                oy1, ox1 = min(core.y1, y + h), min(core.x1, x + w)
                if oy0 < oy1 and ox0 < ox1:
                    src = records[t.index][1]
                    stuff[oy0 - y:oy1 - y, ox0 - x:ox1 - x] = src[oy0 - core.y:oy1 - core.y,
                                                                  ox0 - core.x:ox1 - core.x]
            nuclei = paint((x, y, w, h), [records[t.index][0] for t in near])
            semantic = fuse(stuff, nuclei, thing_id)
            t0 = time.perf_counter()
            store.write_labels(y, x, semantic, nuclei)
            timer.add("write", time.perf_counter() - t0)
            store.mark_chunk_done(key)
            counts += np.bincount(semantic.ravel(), minlength=counts.size)[:counts.size]
        emit("chunks_row", {"row": y // chunk, "rows": -(-height // chunk)})
    return counts, n_cut


def _write_table(store: SlideStore, grid: TileGrid, selected: Sequence[int], keep: dict[int, np.ndarray], cfg: Any,
                 base_mpp: float) -> int:
    """The nucleus table (Parquet), streamed tile by tile in tile order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = grid.downsample
    mpp = grid.mpp
    class_names = list(cfg.class_names)
    type_names = list(cfg.type_names)
    schema = pa.schema([
        ("id", pa.uint32()), ("centroid_x", pa.float64()), ("centroid_y", pa.float64()),
        ("centroid_x_um", pa.float64()), ("centroid_y_um", pa.float64()), ("area_um2", pa.float64()),
        ("perimeter_um", pa.float64()), ("eccentricity", pa.float64()), ("solidity", pa.float64()),
        ("circularity", pa.float64()), ("nucleus_prob", pa.float64()), ("type", pa.string()),
        ("type_prob", pa.float64()), ("stuff_class", pa.string()), ("bbox_x", pa.int64()), ("bbox_y", pa.int64()),
        ("bbox_w", pa.int64()), ("bbox_h", pa.int64()), ("cut", pa.bool_()),
    ])
    store.table_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.table_path.with_name("nuclei.parquet.tmp")
    total = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for index in selected:
            rec = store.load_tile(int(index))
            kept = keep[int(index)]
            rec = {k: (v[kept] if k in PER_NUCLEUS_KEYS else v) for k, v in rec.items()}
            n = int(rec["ids"].size)
            if n == 0:
                continue
            cy, cx = rec["centroids"][:, 0], rec["centroids"][:, 1]
            x0_level0 = (cx + 0.5) * ds
            y0_level0 = (cy + 0.5) * ds
            area_um2 = rec["area_px"] * mpp * mpp
            perim_um = rec["perimeter_px"] * mpp
            with np.errstate(divide="ignore", invalid="ignore"):
                circ = np.where(perim_um > 0, 4 * np.pi * area_um2 / perim_um**2, np.nan)
            circ = np.minimum(circ, 1.0)
            types = rec["type"]
            bb = rec["bboxes"]
            columns = {
                "id": rec["ids"].astype(np.uint32), "centroid_x": x0_level0, "centroid_y": y0_level0,
                "centroid_x_um": x0_level0 * base_mpp, "centroid_y_um": y0_level0 * base_mpp,
                "area_um2": area_um2, "perimeter_um": perim_um, "eccentricity": rec["eccentricity"],
                "solidity": rec["solidity"], "circularity": circ, "nucleus_prob": rec["nucleus_prob"],
                "type": [type_names[t] if 0 <= t < len(type_names) else None for t in types],
                "type_prob": rec["type_prob"],
                "stuff_class": [class_names[s] for s in rec["stuff_class"]],
                "bbox_x": bb[:, 1], "bbox_y": bb[:, 0], "bbox_w": bb[:, 3] - bb[:, 1], "bbox_h": bb[:, 2] - bb[:, 0],
                "cut": rec["cut"].astype(bool),
            }
            writer.write_table(pa.table(columns, schema=schema))
            total += n
    tmp.replace(store.table_path)
    return total


def _write_overview(store: SlideStore, reader: Any, image_mpp: float, block: int = 1024) -> None:
    """Level 0 of the store's RGB overview image, read block by block at ``image_mpp``."""
    arr = store.group["0"]
    _, height, width = arr.shape
    ds = image_mpp / reader.require_mpp()
    w0, h0 = reader.dimensions
    for y in range(0, height, block):
        for x in range(0, width, block):
            h, w = min(block, height - y), min(block, width - x)
            lw, lh = min(w * ds, w0 - x * ds), min(h * ds, h0 - y * ds)
            rgb = reader.read_region(x * ds, y * ds, lw, lh, mpp=image_mpp, out_size=(w, h))
            store.write_image_level0(y, x, rgb)
