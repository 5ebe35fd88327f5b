"""The pass-1 engine's guard against a slow window: reported by name while it runs."""

from __future__ import annotations

import logging
import time

import numpy as np

from histopan.engine import SlowWatch, describe_tile, record_tile
from histopan.model.config import ClassSpec
from histopan.postprocess import PostprocessConfig, ProbabilityMaps
from histopan.stitching import IdScheme
from histopan.tiling import TileGrid


def test_slow_work_is_reported_while_it_runs_and_fast_work_is_not(caplog):
    caplog.set_level(logging.WARNING, logger="histopan")
    with SlowWatch("tile 7 (somewhere)", after=0.05) as watch:
        time.sleep(0.4)
        during = [r.getMessage() for r in caplog.records]
    assert watch.reports >= 2  # repeated while it runs
    assert during and all("tile 7 (somewhere)" in m and "still running" in m for m in during)
    assert "finished after" in caplog.records[-1].getMessage()
    caplog.clear()
    with SlowWatch("tile 8", after=5.0) as quick:
        pass
    assert quick.reports == 0 and not caplog.records
    time.sleep(0.1)  # a cancelled watch stays silent
    assert not caplog.records


def test_describe_tile_names_the_tile_and_its_level0_box():
    grid = TileGrid(1000, 600, 0.25, 0.5, 128, 16)  # level 0 at 0.25 um/px, tiles of 128 at 0.5
    text = describe_tile(grid, 5)
    tile = grid[5]
    assert text.startswith("tile 5 (row 1, column 1;")
    assert f"x {int(round(tile.core_level0[0]))}-" in text and "level-0 pixels" in text


def test_record_tile_reports_a_window_slower_than_its_limit(caplog):
    classes = (ClassSpec("background", (255, 255, 255)), ClassSpec("nucleus", (0, 0, 255), "thing"))

    class Config:  # what process_tile reads of a model config
        postprocess = PostprocessConfig()

    Config.classes = classes
    Config.stuff_indices = (0,)
    n = 512  # a window of random blobs: its post-processing takes far longer than the 1 ms limit
    grid = TileGrid(n, n, 0.5, 0.5, n, 0)
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    p = ndi.gaussian_filter(rng.random((n, n)), 3)
    p = ((p - p.min()) / np.ptp(p)).astype(np.float32)
    maps = ProbabilityMaps(np.stack([1 - p, p]), p.copy(), np.zeros((n, n), np.float32))
    caplog.set_level(logging.WARNING, logger="histopan")
    record, seconds = record_tile(maps, grid, 0, Config, IdScheme.for_tiles(grid, 8.0), slow_after=0.001)
    assert len(record) > 0 and seconds > 0.001
    messages = [r.getMessage() for r in caplog.records]
    assert any("tile 0 (row 0, column 0;" in m and "still running" in m for m in messages)
