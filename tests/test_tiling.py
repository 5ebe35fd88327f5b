"""Tile grid geometry, ownership and the lazy dask arrays, compared against direct reads."""

from __future__ import annotations

import pickle
import time

import dask
import distributed
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histopan import tiling
from histopan.errors import ConfigError, HistopanError, MppError
from histopan.slide import open_slide
from histopan.slide.tissue import select_tiles, tissue_mask
from histopan.testing import write_test_slide
from histopan.tiling import TileGrid, mosaic, tile_stack, to_dask


@pytest.fixture(scope="module")
def cmu(slides_dir):
    return open_slide(slides_dir / "cmu_small_region.svs")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small generated SVS (1536 x 1280 at 0.25 mpp, 3 levels)."""
    path = tmp_path_factory.mktemp("tiling") / "synthetic.svs"
    write_test_slide(path, 1536, 1280, mpp=0.25, seed=5, truth=False)
    return open_slide(path)


def _whole(reader, grid):
    ds = grid.downsample
    return reader.read_region(0, 0, grid.width * ds, grid.height * ds, mpp=grid.mpp,
                              out_size=(grid.width, grid.height))


# ------------------------------------------------------------------------------------------- geometry


def test_grid_geometry_halo_clipped_at_borders():
    g = TileGrid(1000, 700, 0.25, 0.5, tile=128, halo=16)
    assert (g.width, g.height) == (500, 350)
    assert (g.n_rows, g.n_cols, len(g)) == (3, 4, 12)
    assert g.row_chunks == (128, 128, 94) and g.col_chunks == (128, 128, 128, 116)
    first, last = g[0], g[-1]
    assert (first.row, first.col, last.row, last.col) == (0, 0, 2, 3)
    assert [t.index for t in g] == list(range(12))  # row-major
    assert g.tile_at(1, 2).index == 6
    # top-left tile: halo clipped on the top and left only
    assert first.core.as_tuple() == (0, 0, 128, 128)
    assert first.read.as_tuple() == (0, 0, 144, 144)
    assert first.window.as_tuple() == (-16, -16, 160, 160)
    # an inner tile has the full halo
    assert g.tile_at(1, 1).read.as_tuple() == (112, 112, 160, 160)
    # bottom-right: partial core, halo only towards the inside
    assert last.core.as_tuple() == (384, 256, 116, 94)
    assert last.read.as_tuple() == (368, 240, 132, 110)
    assert last.core_in_read == (slice(16, 110), slice(16, 132))
    assert last.core_level0 == (768.0, 512.0, 232.0, 188.0)
    assert last.read_level0 == (736.0, 480.0, 264.0, 220.0)
    np.testing.assert_array_equal(g.boxes("core")[-1], last.core_level0)
    np.testing.assert_array_equal(g.boxes("read", level0=False)[-1], last.read.as_tuple())


def test_grid_size_floors_with_float_tolerance():
    # 2220 px at 0.499 mpp is 2220 px at 0.499 mpp, not 2219
    assert TileGrid(2220, 2967, 0.499, 0.499, 256, 0).shape == (2967, 2220)
    assert TileGrid(2220, 2967, 0.499, 1.0, 256, 0).shape == (1480, 1107)


def test_shifted_origin_gives_partial_first_cores():
    g = TileGrid(300, 200, 1.0, 1.0, tile=100, halo=10, origin=(30, 160))
    assert g.origin == (30, 60)  # taken modulo the tile
    assert g.col_chunks == (30, 100, 100, 70)
    assert g.row_chunks == (60, 100, 40)
    assert g[0].cell.as_tuple() == (-70, -40, 100, 100)
    assert g[0].core.as_tuple() == (0, 0, 30, 60)
    assert g[0].read.as_tuple() == (0, 0, 40, 70)
    assert g.owner_of(59, 29) == (0, 0) and g.owner_of(60, 30) == (1, 1)


@settings(max_examples=60, deadline=None)
@given(
    w0=st.integers(1, 600), h0=st.integers(1, 600),
    base=st.sampled_from([0.25, 0.2527, 0.499, 0.5, 1.0]),
    factor=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.7]),
    tile=st.integers(6, 200), halo_frac=st.floats(0, 0.99),
    ox=st.integers(-500, 500), oy=st.integers(-500, 500),
)
def test_every_pixel_owned_by_exactly_one_core(w0, h0, base, factor, tile, halo_frac, ox, oy):
    mpp = base * factor
    halo = min(int(halo_frac * tile), tile - 1)
    try:
        g = TileGrid(w0, h0, base, mpp, tile, halo, origin=(ox, oy))
    except ConfigError as exc:  # only a slide smaller than one target pixel may be refused
        assert int(w0 * base / mpp + 1e-9) == 0 or int(h0 * base / mpp + 1e-9) == 0, exc
        return
    count = np.zeros(g.shape, dtype=np.int32)
    for t in g:
        count[t.core.slices] += 1
        # the read box is the core grown by the halo, clipped at the slide borders
        assert t.read.x == max(t.core.x - halo, 0) and t.read.y == max(t.core.y - halo, 0)
        assert t.read.x1 == min(t.core.x1 + halo, g.width) and t.read.y1 == min(t.core.y1 + halo, g.height)
        assert t.window.w == t.window.h == tile + 2 * halo
        rows, cols = t.core_in_read
        assert (rows.stop - rows.start, cols.stop - cols.start) == (t.core.h, t.core.w)
        assert t.core.w >= 1 and t.core.h >= 1
    assert (count == 1).all()
    assert sum(g.row_chunks) == g.height and sum(g.col_chunks) == g.width
    # owner_of agrees with owns and with the rasterised cores
    rng = np.random.default_rng(w0 * 1000 + h0)
    ys = rng.integers(0, g.height, 20)
    xs = rng.integers(0, g.width, 20)
    rows, cols = g.owner_of(ys, xs)
    cores = g.boxes("core", level0=False)
    for y, x, r, c in zip(ys, xs, rows, cols):
        assert g.owns(g.tile_at(int(r), int(c)), y, x)
        hits = ((cores[:, 0] <= x) & (x < cores[:, 0] + cores[:, 2]) & (cores[:, 1] <= y) & (y < cores[:, 1] + cores[:, 3]))
        assert np.flatnonzero(hits).tolist() == [r * g.n_cols + c]
    np.testing.assert_array_equal(g.boxes("core", level0=False)[:, 2:].prod(axis=1).sum(), g.width * g.height)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(tile=0, halo=0), ConfigError, "tile size must be >= 1"),
        (dict(tile=256, halo=-1), ConfigError, "halo must be >= 0"),
        (dict(tile=256, halo=256), ConfigError, "halo must be smaller than the tile size"),
        (dict(tile=256.0, halo=0), ConfigError, "whole number"),
        (dict(tile=256, halo=0, mpp=0.0), ConfigError, "target mpp must be a positive"),
        (dict(tile=256, halo=0, mpp=float("nan")), ConfigError, "target mpp"),
        (dict(tile=256, halo=0, base_mpp=-0.25), MppError, "slide's mpp"),
        (dict(tile=256, halo=0, mpp=1e6), ConfigError, "smaller than one pixel"),
        (dict(tile=256, halo=0, origin=(1.5, 0)), ConfigError, "origin"),
    ],
)
def test_bad_grid_parameters_raise_clear_errors(kwargs, error, words):
    args = dict(level0_width=1000, level0_height=800, base_mpp=0.25, mpp=0.5) | kwargs
    with pytest.raises(error, match=words) as info:
        TileGrid(**args)
    assert isinstance(info.value, HistopanError) and info.value.fix


@settings(max_examples=40, deadline=None)
@given(w0=st.integers(200, 1500), h0=st.integers(200, 1500), tile=st.sampled_from([64, 96, 128]),
       halo=st.integers(0, 32), ox=st.integers(0, 127), oy=st.integers(0, 127),
       bx=st.floats(0, 0.9), by=st.floats(0, 0.9), bw=st.integers(1, 200), bh=st.integers(1, 200))
def test_neighbours_and_tiles_reaching_a_box_match_the_read_boxes(w0, h0, tile, halo, ox, oy, bx, by, bw, bh):
    grid = TileGrid(w0, h0, 0.5, 0.5, tile, halo, (ox, oy))
    reads = grid.boxes("read", level0=False)
    x, y = int(bx * grid.width), int(by * grid.height)
    box = tiling.Box(x, y, min(bw, grid.width - x), min(bh, grid.height - y))
    overlap = ((reads[:, 0] < box.x1) & (reads[:, 0] + reads[:, 2] > box.x)
               & (reads[:, 1] < box.y1) & (reads[:, 1] + reads[:, 3] > box.y))
    assert [t.index for t in grid.tiles_reaching(box)] == np.flatnonzero(overlap).tolist()
    tile_ = grid[len(grid) // 2]
    read = tile_.read
    touching = ((reads[:, 0] < read.x1) & (reads[:, 0] + reads[:, 2] > read.x)
                & (reads[:, 1] < read.y1) & (reads[:, 1] + reads[:, 3] > read.y))
    touching[tile_.index] = False
    # with halo <= tile / 2, every tile whose read box overlaps this one's is a neighbour
    assert set(np.flatnonzero(touching).tolist()) <= {t.index for t in grid.neighbours(tile_)}
    assert len(grid.neighbours(tile_)) <= 8 and tile_.index not in {t.index for t in grid.neighbours(tile_)}


def test_owner_of_outside_slide_is_an_error():
    g = TileGrid(100, 100, 1.0, 1.0, 32, 4)
    with pytest.raises(ConfigError, match="outside"):
        g.owner_of(100, 5)
    with pytest.raises(ConfigError, match="out of range"):
        g[len(g)]


# ------------------------------------------------------------------------------------------- dask


def test_mosaic_equals_one_read_of_the_whole_slide(cmu):
    arr, grid = to_dask(cmu, 2.0, 128, 16, origin=(37, 5), view="mosaic")
    assert arr.shape == (grid.height, grid.width, 3) and arr.dtype == np.uint8
    assert arr.chunks[:2] == (grid.row_chunks, grid.col_chunks)
    np.testing.assert_array_equal(arr.compute(scheduler="threads"), _whole(cmu, grid))


def test_stack_windows_hold_core_and_halo(synthetic):
    arr, grid = to_dask(synthetic, 0.5, 160, 24, fill=255)  # reads pyramid level 1
    assert arr.shape == (len(grid), 208, 208, 3) and arr.numblocks == (len(grid), 1, 1, 1)
    stack = arr.compute(scheduler="threads")
    whole = _whole(synthetic, grid)
    for t in grid:
        win = stack[t.index]
        np.testing.assert_array_equal(win[t.read_in_window], whole[t.read.slices])
        np.testing.assert_array_equal(win[t.core_in_window], whole[t.core.slices])
        outside = np.ones(win.shape[:2], dtype=bool)
        outside[t.read_in_window] = False
        assert (win[outside] == 255).all()


def test_stack_of_selected_tissue_tiles(synthetic):
    grid = TileGrid.for_slide(synthetic, 0.5, 128, 16)
    keep = select_tiles(tissue_mask(synthetic), grid.boxes("core"), min_fraction=0.5)
    assert 0 < len(keep) < len(grid)  # the synthetic slide has tissue and background
    sub = tile_stack(synthetic, grid, tiles=keep).compute(scheduler="threads")
    full = tile_stack(synthetic, grid).compute(scheduler="threads")
    np.testing.assert_array_equal(sub, full[np.asarray(keep)])
    with pytest.raises(ConfigError, match="out of range"):
        tile_stack(synthetic, grid, tiles=[len(grid)])


def test_one_task_per_tile_and_nothing_read_while_building(synthetic, monkeypatch):
    calls = []
    real = synthetic.read_region

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "read_region", counting)
    arr, grid = to_dask(synthetic, 0.5, 64, 8)
    mos = mosaic(synthetic, grid)
    assert calls == []
    assert len(dict(arr.__dask_graph__())) == len(grid) == len(dict(mos.__dask_graph__()))
    arr[3:5].compute(scheduler="sync")
    assert len(calls) == 2


def test_building_a_huge_graph_reads_nothing_and_is_quick(synthetic):
    # a 100k x 100k slide at 0.25 mpp tiled at 0.5 mpp: 38k tiles, geometry only
    g = TileGrid(100_000, 100_000, 0.25, 0.5, 256, 32)
    start = time.perf_counter()
    boxes = g.boxes("core")
    assert boxes.shape == (len(g), 4) == (196 * 196, 4)
    assert time.perf_counter() - start < 1.0
    # and the graph of the real slide is built without a single read (timing: far below one read per tile)
    start = time.perf_counter()
    arr, grid = to_dask(synthetic, 0.25, 32, 4)
    assert len(grid) == 48 * 40 and time.perf_counter() - start < 2.0


def test_reader_reference_pickles_small_and_reopens(synthetic):
    ref = tiling._reader_ref(synthetic)
    blob = pickle.dumps(ref)
    assert len(blob) < 1000
    back = pickle.loads(blob)
    assert back.get().identity == synthetic.identity
    np.testing.assert_array_equal(back.get().read_region(0, 0, 64, 64), synthetic.read_region(0, 0, 64, 64))


def test_distributed_scheduler_matches_threaded(synthetic):
    arr, grid = to_dask(synthetic, 1.0, 128, 16)
    expected = arr.compute(scheduler="threads")
    with dask.config.set({"distributed.worker.daemon": True}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=40) as cluster:
            with distributed.Client(cluster) as client:
                got = client.compute(arr).result()
    np.testing.assert_array_equal(got, expected)


def test_compute_local_one_worker_is_synchronous_and_matches_threads(synthetic):
    arr, _ = to_dask(synthetic, 0.5, 128, 16)
    threaded = arr.compute(scheduler="threads", num_workers=2)
    main_thread = []

    def where(block):
        import threading

        main_thread.append(threading.current_thread() is threading.main_thread())
        return block

    one = tiling.compute_local(arr.map_blocks(where, dtype=arr.dtype), 1)
    np.testing.assert_array_equal(one, threaded)
    assert main_thread and all(main_thread)  # no thread pool with one worker
    np.testing.assert_array_equal(tiling.compute_local(arr, 2), threaded)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="workers"):
            tiling.compute_local(arr, bad)
