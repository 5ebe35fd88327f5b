"""Stitching: tiled ownership + painting reproduces the whole-image labels exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.draw import ellipse

from histopan.errors import HistopanError
from histopan.stitching import IdScheme, OwnedObjects, TileRecord, own_objects, paint
from histopan.tiling import TileGrid


def _nuclei_image(height: int, width: int, n: int, seed: int, max_radius: int = 7) -> np.ndarray:
    """A label image of non-overlapping ellipses (some touching), ids 1..k."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    k = 0
    for _ in range(n):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(2, max_radius), rng.uniform(2, max_radius)
        rr, cc = ellipse(cy, cx, ry, rx, shape=labels.shape, rotation=rng.uniform(0, np.pi))
        free = labels[rr, cc] == 0
        if free.sum() < 6:
            continue
        k += 1
        labels[rr[free], cc[free]] = k
    return labels


def _relabel_random(labels: np.ndarray, seed: int) -> np.ndarray:
    """Shuffle ids inside a crop, as an independent per-tile segmentation would."""
    ids = np.unique(labels[labels > 0])
    perm = np.random.default_rng(seed).permutation(ids.size) + 1
    lut = np.zeros(labels.max() + 1, np.int32)
    lut[ids] = perm
    return lut[labels]


def _stitch(labels: np.ndarray, tile: int, halo: int, origin=(0, 0), chunk: int | None = None):
    h, w = labels.shape
    grid = TileGrid(w, h, 0.5, 0.5, tile, halo, origin)
    scheme = IdScheme.for_grid(len(grid), (tile + 2 * halo) ** 2, min_area_px=1)
    owned = []
    for t in grid:
        crop = labels[t.read.slices]
        owned.append(own_objects(_relabel_random(crop, t.index), t.read.as_tuple(), t.core.as_tuple(),
                                 (h, w), t.index, scheme))
    if chunk is None:
        return paint((0, 0, w, h), owned), owned
    out = np.zeros((h, w), np.uint32)
    for y in range(0, h, chunk):
        for x in range(0, w, chunk):
            cw, chh = min(chunk, w - x), min(chunk, h - y)
            out[y:y + chh, x:x + cw] = paint((x, y, cw, chh), owned)
    return out, owned


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b are the same labelling up to a one-to-one renaming of ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return (np.unique(pairs[0]).size == pairs.shape[1]) and (np.unique(pairs[1]).size == pairs.shape[1])


def test_tiled_equals_whole_image():
    labels = _nuclei_image(300, 410, 400, seed=1)
    stitched, owned = _stitch(labels, tile=64, halo=16)
    assert _same_partition(labels, stitched)
    n_true = np.unique(labels[labels > 0]).size
    assert sum(len(o) for o in owned) == n_true  # every nucleus owned exactly once
    assert not any(o.cut.any() for o in owned)


@settings(max_examples=25, deadline=None)
@given(
    tile=st.integers(24, 96),
    halo=st.integers(16, 23),
    ox=st.integers(0, 95),
    oy=st.integers(0, 95),
    chunk=st.sampled_from([None, 50, 128]),
    seed=st.integers(0, 10_000),
)
def test_seam_free_for_any_grid(tile, halo, ox, oy, chunk, seed):
    labels = _nuclei_image(150, 170, 120, seed=seed, max_radius=6)
    stitched, owned = _stitch(labels, tile=tile, halo=halo, origin=(ox, oy), chunk=chunk)
    assert _same_partition(labels, stitched)
    ids = np.concatenate([o.ids for o in owned])
    assert np.unique(ids).size == ids.size  # global ids unique


def test_ids_deterministic_and_independent_of_order():
    labels = _nuclei_image(200, 200, 150, seed=3)
    a, owned = _stitch(labels, tile=64, halo=16)
    b = paint((0, 0, 200, 200), list(reversed(owned)))
    assert np.array_equal(a, b)
    a2, _ = _stitch(labels, tile=64, halo=16)
    assert np.array_equal(a, a2)
    scheme = IdScheme.for_grid(16, 96 * 96, 1)
    for objs in owned:
        if len(objs):
            assert set(scheme.tile_of(objs.ids)) == {objs.tile_index}


def test_object_larger_than_halo_is_flagged_not_dropped():
    labels = np.zeros((128, 128), np.int32)
    labels[10:118, 60:70] = 1  # a 108 px tall object; tiles of 64 with a halo of 8 cannot see it whole
    stitched, owned = _stitch(labels, tile=64, halo=8)
    pieces = [o for o in owned if len(o)]
    assert len(pieces) >= 1
    assert all(o.cut.all() for o in pieces)  # every piece of it is reported as cut
    assert np.array_equal(stitched > 0, labels > 0)  # nothing of it is dropped


def test_serialisation_round_trip():
    labels = _nuclei_image(100, 100, 60, seed=5)
    _, owned = _stitch(labels, tile=50, halo=16)
    objs = next(o for o in owned if len(o))
    back = OwnedObjects.from_arrays({k: np.asarray(v) for k, v in objs.to_arrays().items()})
    assert np.array_equal(back.ids, objs.ids)
    assert np.array_equal(back.masks, objs.masks)
    assert np.array_equal(paint((0, 0, 100, 100), [back]), paint((0, 0, 100, 100), [objs]))


def test_id_overflow_is_a_clear_error():
    with pytest.raises(HistopanError, match="uint32"):
        IdScheme.for_grid(n_tiles=10_000_000, window_px=1024 * 1024, min_area_px=4)


def test_duplicate_seen_by_two_tiles_is_kept_once():
    """Two tiles segment one nucleus slightly differently and both place its centroid in their own core."""
    from histopan.stitching import deduplicate

    h, w = 64, 128
    grid = TileGrid(w, h, 0.5, 0.5, 64, 16)
    scheme = IdScheme.for_grid(len(grid), 96 * 96, 1)
    left, right = grid[0], grid[1]
    a = np.zeros((h, w), np.int32)
    a[20:30, 56:68] = 1  # tile 0 sees the nucleus a little to the left: centroid x 61.5, in its core
    b = np.zeros((h, w), np.int32)
    b[20:30, 58:71] = 1  # tile 1 sees it a little to the right: centroid x 64, in its core
    own_a = own_objects(a[left.read.slices], left.read.as_tuple(), left.core.as_tuple(), (h, w), 0, scheme)
    own_b = own_objects(b[right.read.slices], right.read.as_tuple(), right.core.as_tuple(), (h, w), 1, scheme)
    assert len(own_a) == 1 and len(own_b) == 1  # both tiles own "their" copy
    assert deduplicate(own_a, []).all()
    keep_b = deduplicate(own_b, [own_a])
    assert not keep_b.any()  # the copy with the higher id is a duplicate
    painted = paint((0, 0, w, h), [own_a, own_b.subset(keep_b)])
    assert np.unique(painted[painted > 0]).tolist() == [int(own_a.ids[0])]


def test_neighbours_that_only_touch_are_both_kept():
    from histopan.stitching import deduplicate

    h, w = 64, 128
    grid = TileGrid(w, h, 0.5, 0.5, 64, 16)
    scheme = IdScheme.for_grid(len(grid), 96 * 96, 1)
    labels = np.zeros((h, w), np.int32)
    labels[20:30, 54:64] = 1
    labels[20:30, 64:74] = 2
    own = [own_objects(labels[t.read.slices], t.read.as_tuple(), t.core.as_tuple(), (h, w), t.index, scheme)
           for t in (grid[0], grid[1])]
    assert deduplicate(own[1], [own[0]]).all()


def test_tile_record_round_trips_through_arrays_and_subsets_every_field():
    labels = _nuclei_image(96, 96, 30, seed=3)
    grid = TileGrid(96, 96, 0.5, 0.5, 64, 16)
    ids = IdScheme.for_tiles(grid, 1.0)
    tile = grid[0]
    owned = own_objects(labels[tile.read.slices], tile.read.as_tuple(), tile.core.as_tuple(), grid.shape, 0, ids)
    n = len(owned)
    assert n > 5
    rng = np.random.default_rng(0)
    record = TileRecord(owned, np.full((tile.core.h, tile.core.w), 2, np.uint8),
                        area_px=rng.integers(5, 50, n), perimeter_px=rng.random(n), eccentricity=rng.random(n),
                        solidity=rng.random(n), nucleus_prob=rng.random(n), type=rng.integers(-1, 3, n),
                        type_prob=rng.random(n), stuff_class=rng.integers(0, 4, n))
    back = TileRecord.from_arrays(dict(np.load(_saved(record))))
    keep = np.arange(n) % 3 != 0
    for a, b in ((record, back), (record.subset(keep), back.subset(keep))):
        assert len(a) == len(b)
        assert np.array_equal(a.objects.ids, b.objects.ids) and np.array_equal(a.objects.masks, b.objects.masks)
        for name in ("stuff", "area_px", "perimeter_px", "eccentricity", "solidity", "nucleus_prob", "type",
                     "type_prob", "stuff_class"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(record.subset(keep).type, record.type[keep])
    columns = record.subset(keep).table_columns(2.0, 0.5, 0.25, ["bg", "a", "b", "c"], ["x", "y", "z"])
    assert all(len(v) == int(keep.sum()) for v in columns.values())
    assert np.allclose(columns["area_um2"], record.area_px[keep] * 0.25)
    empty = TileRecord.from_arrays(TileRecord.without_nuclei(OwnedObjects.empty(1), record.stuff).to_arrays())
    assert len(empty) == 0 and empty.area_px.shape == (0,)
    with pytest.raises(ValueError, match="solidity"):
        TileRecord(owned, record.stuff, **{**{k: getattr(record, k) for k in ("area_px", "perimeter_px",
                   "eccentricity", "nucleus_prob", "type", "type_prob", "stuff_class")}, "solidity": np.zeros(n + 1)})


def _saved(record: TileRecord):
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **record.to_arrays())
    buffer.seek(0)
    return buffer
