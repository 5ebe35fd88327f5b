"""Slide-level panoptic segmentation: the orchestration of every stage (the only module that knows paths,
dask, torch and zarr together).

    slide -> tissue tiles at the model's mpp -> batched inference -> watershed per tile
          -> ownership (each nucleus owned by one tile, global ids) -> per-chunk painting + fusion -> store

Two passes keep memory bounded and make the run resumable:

1. *Tiles* (:mod:`histopan.engine`, shared with ``histopan batch``): for each tissue tile, read core + halo
   (dask, threaded, one task per tile), run the network in batches, post-process into the tile's record
   (:func:`histopan.postprocess.process_tile`: the nuclei the tile owns, their measurements, its stuff core,
   background outside the tissue region that the tissue detector's mask gives and the store keeps);
   the small record is saved in the store's ``work/`` folder.  Batches are fixed slices of the tile list, so
   a resumed run feeds the network exactly the same batches as an uninterrupted one and the arrays come out
   byte-identical.
2. *Chunks* (:mod:`histopan.stitching`): duplicates seen by two neighbouring tiles are dropped, then every
   label chunk is painted from the records of the tiles that reach it, fused (things over stuff) and written
   once; no two writers share a chunk.

Then the nucleus table, a low-resolution RGB pyramid and the label pyramids are written and the store is
marked complete.  The slide is opened once per run.

The store is built beside the output, in ``OUT.zarr.partial``, and swapped in as ``OUT.zarr`` only once
complete, under an exclusive lock on the output (:mod:`histopan.outputs`): a killed, failed or ``--overwrite``
run never damages a complete store, and the same command resumes an interrupted one.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from histopan import __version__
from histopan.config import to_dict
from histopan.engine import Timer, cached_inferencer, cached_model, infer_batch, read_batch, record_tile
from histopan.checks import check_output
from histopan.errors import ConfigError, OutputError
from histopan.outputs import output_lock, publish, staging_path
from histopan.run import RunPlan, SegmentOptions, SegmentResult
from histopan.stitching import ChunkPainter, IdScheme, TileRecord, deduplicate_tiles
from histopan.store import SlideStore, create_store, open_for_run, overview_geometry, \
    slide_attributes
from histopan.tiling import TileGrid

log = logging.getLogger(__name__)

__all__ = ["Progress", "RunPlan", "SegmentOptions", "SegmentResult", "finish_run", "plan_run", "segment_slide"]


Progress = Callable[[str, dict[str, Any]], None]


def plan_run(reader: Any, out: str | PathLike[str], options: SegmentOptions,
             model: Any = None) -> tuple[RunPlan, SlideStore]:
    """Lay the grid over the open slide ``reader``, find the tissue tiles, and create or resume the store
    (in ``staging_path(out)``; :func:`finish_run` swaps it in as ``out``).  The caller holds the output's lock.

    ``model`` (a LoadedModel) may be passed to reuse one already loaded; else ``options.model`` is loaded
    (once per process, :func:`~histopan.engine.cached_model`).
    """
    from histopan.slide.tissue import TissueParams, select_region_tiles, tissue_mask, tissue_region

    out = check_output(out, folder=True, suffixes=(".zarr",))
    base_mpp = reader.require_mpp()
    reader.require_segmentable()  # colour, and a pyramid if it is huge
    model = model if model is not None else cached_model(options.model)
    model = model.for_tta(options.tta)  # TTA runs use the thresholds tuned on TTA maps, where the model has them
    cfg = model.config
    tile_size = options.tile or cfg.tile
    halo = cfg.halo if options.halo is None else options.halo
    if (tile_size + 2 * halo) % 32:
        raise ConfigError("tile + 2 * halo must be a multiple of 32", value=(tile_size, halo),
                          fix="use a halo that is a multiple of 16, e.g. 64")
    if options.batch_size is None:  # fit the device; the store's options record the size used
        from histopan.inference import auto_batch_size

        options = dataclasses.replace(options, batch_size=auto_batch_size(options.device, tile_size + 2 * halo))
    work_mpp = reader.snap_mpp(cfg.mpp)
    grid = TileGrid.for_slide(reader, work_mpp, tile_size, halo, tuple(options.origin))
    classes = list(cfg.classes)  # numbered by the model config: id = pixel value
    ids = IdScheme.for_tiles(grid, cfg.postprocess.min_area_um2)

    t0 = time.perf_counter()
    region = None
    if options.min_tissue <= 0:  # no tissue detection: every tile is processed and the model decides everywhere
        selected = np.arange(len(grid))
    else:
        mask = tissue_mask(reader)
        region = tissue_region(mask)  # the glass rule: tissue classes only inside it
        selected = select_region_tiles(mask, region, grid, options.min_tissue)
    tissue_seconds = time.perf_counter() - t0
    if len(selected) == 0:
        log.warning("%s: no tile has at least %.0f %% tissue, so the store will hold no nuclei; if the slide does "
                    "show tissue, pass --min-tissue 0 to process every tile", reader.path, 100 * options.min_tissue)

    run_key = {"slide": reader.identity, "model": model.weights_sha256, "mpp": work_mpp, "tile": tile_size,
               "halo": halo, "origin": list(grid.origin), "min_tissue": options.min_tissue,
               "tissue": None if region is None else to_dict(TissueParams()),
               "postprocess": to_dict(cfg.postprocess), "tta": options.tta, "histopan": __version__}
    store = open_for_run(out, run_key, options.overwrite)
    if store is None:
        image_shape, image_mpp = overview_geometry(reader, work_mpp)
        store = create_store(
            staging_path(out), shape=grid.shape, mpp=work_mpp, chunk=tile_size, classes=classes,
            image_shape=image_shape, image_mpp=image_mpp, name=reader.path.name,
            run={"key": run_key, "model": {"name": cfg.name, "path": str(model.path),
                                           "weights_sha256": model.weights_sha256, "config": to_dict(cfg)},
                 "options": to_dict(options), "tiles": [int(t) for t in selected]},
            tissue=region,
        )
        store.update_attrs(
            slide=slide_attributes(reader), downsample=grid.downsample,
            tiling={"tile": tile_size, "halo": halo, "origin": list(grid.origin), "n_tiles": len(grid),
                    "n_tissue_tiles": int(len(selected)), "id_stride": ids.stride},
        )
    batch_size = options.batch_size
    batches = [selected[i:i + batch_size] for i in range(0, len(selected), batch_size)]
    plan = RunPlan(slide=reader.path, slide_mpp=options.mpp, out=out, model=model, grid=grid, selected=selected,
                   batches=batches, ids=ids, base_mpp=base_mpp, tissue_seconds=tissue_seconds,
                   batch_size=batch_size)
    return plan, store


def finish_run(plan: RunPlan, store: SlideStore, reader: Any, emit: Progress, timer: Timer, t_start: float,
               resumed: int) -> SegmentResult:
    """Pass 2 (de-duplicate, then paint, fuse and write every chunk), the nucleus table, the overview image
    (read from the open slide ``reader``) and the pyramids; then mark the store complete and swap it in as
    ``plan.out`` (an old store there, kept so far, is deleted only then)."""
    cfg, grid, classes = plan.config, plan.grid, store.classes
    t = time.perf_counter()
    recorded = np.zeros(len(grid), bool)
    recorded[plan.selected] = True

    def load(index: int) -> TileRecord:
        return TileRecord.from_arrays(store.load_tile(index))

    keep, n_cut = deduplicate_tiles(grid, recorded, load)
    painter = ChunkPainter(grid, recorded, keep, load, int(store.attrs["chunk"]), cfg.nucleus_index)
    stuff_px = np.zeros(max(len(classes), cfg.nucleus_index + 1), np.int64)
    for k, row in enumerate(painter.rows()):
        for chunk in row:
            if store.chunk_done(chunk.key):
                semantic = store.semantic[chunk.box.slices]
            else:
                semantic, nuclei = painter.paint(chunk)
                t0 = time.perf_counter()
                store.write_labels(chunk.box.y, chunk.box.x, semantic, nuclei)
                timer.add("write", time.perf_counter() - t0)
                store.mark_chunk_done(chunk.key)
            stuff_px += np.bincount(semantic.ravel(), minlength=stuff_px.size)[:stuff_px.size]
        emit("chunks_row", {"row": k, "rows": painter.n_rows})
    timer.add("stitch_write", time.perf_counter() - t)
    if n_cut:
        log.warning("%d object(s) touched the edge of a tile's halo and may be larger than the halo (%d px); they "
                    "are kept as seen and flagged 'cut' in the nucleus table (a larger --tile halo avoids this)",
                    n_cut, grid.halo)

    t = time.perf_counter()
    with store.nucleus_table_writer() as table:  # streamed tile by tile, in tile (= id) order
        for index in plan.selected:
            record = load(int(index)).subset(keep[int(index)])
            if len(record):
                table.write(record.table_columns(grid.downsample, grid.mpp, plan.base_mpp, list(cfg.class_names),
                                                 list(cfg.type_names)))
    store.write_overview(reader)
    store.build_pyramids()
    timer.add("table_pyramid", time.perf_counter() - t)

    px_area_mm2 = (grid.mpp * 1e-3) ** 2
    stuff_area = {c.name: float(stuff_px[c.id]) * px_area_mm2 for c in classes}
    mask_area = store.attrs.get("tissue", {}).get("mask_area_mm2")
    result = SegmentResult(store=plan.out, n_nuclei=table.n_rows, n_tiles=len(grid),
                           n_tissue_tiles=int(len(plan.selected)), n_cut=n_cut, stuff_area_mm2=stuff_area,
                           tissue_mask_mm2=mask_area,
                           megapixels=float(len(plan.selected)) * grid.tile * grid.tile / 1e6,
                           seconds=time.perf_counter() - t_start, timings=dict(timer.totals), resumed_tiles=resumed)
    store.finalize(**result.to_json())
    publish(plan.out)
    emit("done", result.to_json())
    return result


def segment_slide(slide: str | PathLike[str], out: str | PathLike[str], options: SegmentOptions = SegmentOptions(),
                  progress: Progress | None = None) -> SegmentResult:
    """Segment one slide into the store ``out`` (see the module docstring).  Resumes an unfinished store of
    the same run; refuses to replace a complete one unless ``options.overwrite``, and even then keeps it
    until the new one is complete.  Another run holding ``out`` is refused (:func:`histopan.outputs.output_lock`)."""
    from histopan.inference import resolve_device
    from histopan.slide import open_slide

    t_start = time.perf_counter()
    timer = Timer()
    emit = progress or (lambda event, data: None)
    out = check_output(out, folder=True, suffixes=(".zarr",))
    with output_lock(out), _store_write_errors(out):
        resolve_device(options.device)  # a device that is not there fails before any store is made
        with open_slide(slide, mpp=options.mpp) as reader:
            plan, store = plan_run(reader, out, options)
            if store.complete:  # this run finished before, but was stopped before its store was swapped in
                publish(out)
                return SegmentResult.from_json(store.attrs["summary"])
            timer.add("tissue", plan.tissue_seconds)
            grid, selected = plan.grid, plan.selected
            emit("start", {"n_tiles": int(len(selected)), "grid": len(grid), "mpp": grid.mpp, "shape": grid.shape})
            resumed = _pass1(plan, store, reader, options, emit, timer)
            return finish_run(plan, store, reader, emit, timer, t_start, resumed)


#: errors of the filesystem holding a store that a user fixes, reported in one line: space, quota and file size
#: limits (whatever file they concern), permissions (when they concern the store's own files)
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_PERMISSION_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def _store_write_errors(out: Path) -> Iterator[None]:
    """Turn a full disk, a quota or a read-only / forbidden folder met while writing the store ``out`` into an
    :class:`~histopan.errors.OutputError` (what is written is resumable: rerunning the command goes on)."""
    try:
        yield
    except OSError as exc:
        ours = exc.filename is not None and os.path.abspath(exc.filename).startswith(os.path.abspath(out))
        if not (exc.errno in _SPACE_ERRNOS or (exc.errno in _PERMISSION_ERRNOS and ours)):
            raise
        raise OutputError(f"cannot write the store: {exc.strerror}", path=exc.filename or staging_path(out),
                          fix="free disk space or fix the folder's permissions, then rerun the same command "
                              "(it resumes; a complete store already there is kept)") from exc


def _pass1(plan: RunPlan, store: SlideStore, reader: Any, options: SegmentOptions, emit: Progress,
           timer: Timer) -> int:
    """Pass 1 in this process: reading runs one batch ahead and post-processing (``options.workers``
    threads) one batch behind the network, so on a GPU node the accelerator does not wait for the CPU stages.
    Returns the number of tiles an earlier run had already recorded."""
    todo, resumed = plan.pending_batches(store)
    if resumed:
        log.info("resuming: %d of %d tissue tiles already done", resumed, len(plan.selected))
    emit("tiles_done", {"done": resumed, "nuclei": 0})
    inferencer = cached_inferencer(plan.model, options.device, plan.batch_size, options.tta)
    tissue = store.tissue_region()  # the glass rule's region, as the store keeps it (also on resume)
    done, nuclei = resumed, 0
    in_flight: list[tuple[np.ndarray, list[Future]]] = []

    def collect(batch: np.ndarray, futures: list[Future]) -> None:
        nonlocal done, nuclei
        for index, future in zip(batch, futures):
            record, seconds = future.result()
            store.save_tile(int(index), record.to_arrays())
            nuclei += len(record)
            timer.add("postprocess", seconds)
        done += len(batch)
        emit("tiles_done", {"done": done, "nuclei": nuclei})

    with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="histopan-post") as post_pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="histopan-read") as read_pool:
        pending = read_pool.submit(read_batch, reader, plan.grid, todo[0], options.workers) if todo else None
        for k, batch in enumerate(todo):
            windows, seconds = pending.result()  # type: ignore[union-attr]
            timer.add("read", seconds)
            if k + 1 < len(todo):
                pending = read_pool.submit(read_batch, reader, plan.grid, todo[k + 1], options.workers)
            maps, seconds = infer_batch(inferencer, windows)
            timer.add("model", seconds)
            in_flight.append((batch, [post_pool.submit(record_tile, m, plan.grid, int(i), plan.config, plan.ids,
                                                          tissue=tissue)
                                      for m, i in zip(maps, batch)]))
            del maps, windows
            while len(in_flight) > 1:
                collect(*in_flight.pop(0))
        while in_flight:
            collect(*in_flight.pop(0))
    return resumed
