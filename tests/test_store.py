"""The OME-Zarr output store: layout, OME-NGFF 0.5 validity, pyramids, resume decisions, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from histopan.errors import StoreError
from histopan.classes import ClassSpec
from histopan.outputs import publish, staging_path
from histopan.store import _majority_2x2, create_store, n_pyramid_levels, open_for_run, open_store

CLASSES = [ClassSpec("background", (255, 255, 255), "stuff", id=0), ClassSpec("stroma", (255, 160, 200), "stuff", id=1),
           ClassSpec("nucleus", (40, 40, 200), "thing", id=2)]


def _make(path, shape=(700, 900), chunk=256, run=None):
    return create_store(path, shape=shape, mpp=0.5, chunk=chunk, classes=CLASSES,
                        image_shape=(shape[0] // 4, shape[1] // 4), image_mpp=2.0, name="slide",
                        run=run or {"key": {"slide": "abc"}})


def _fill(store):
    sem = np.zeros(store.shape, np.uint8)
    sem[100:600, 100:800] = 1
    nuc = np.zeros(store.shape, np.uint32)
    for i, (y, x) in enumerate([(150, 150), (300, 420), (520, 700)], start=1):
        nuc[y - 6:y + 6, x - 5:x + 5] = i * 1000
    sem[nuc > 0] = 2
    for y in range(0, store.shape[0], 256):
        for x in range(0, store.shape[1], 256):
            store.write_labels(y, x, sem[y:y + 256, x:x + 256], nuc[y:y + 256, x:x + 256])
    store.write_image_level0(0, 0, np.full((*store.group["0"].shape[1:], 3), 200, np.uint8))
    return sem, nuc


def test_round_trip_and_pyramid(tmp_path):
    store = _make(tmp_path / "s.zarr")
    sem, nuc = _fill(store)
    store.write_table(pd.DataFrame({"id": np.array([1000, 2000, 3000], np.uint32)}))
    store.build_pyramids()
    store.finalize(nuclei=3)
    back = open_store(tmp_path / "s.zarr")
    assert back.complete
    assert np.array_equal(back.semantic[:], sem)
    assert np.array_equal(back.nuclei[:], nuc)
    assert [c.name for c in back.classes] == ["background", "stroma", "nucleus"]
    assert back.read_table()["id"].tolist() == [1000, 2000, 3000]
    assert not back.work_dir.exists()
    # level 1: nearest for ids (top-left sample), majority for classes
    lvl1 = back.group["labels/nuclei/1"][:]
    assert np.array_equal(lvl1, nuc[::2, ::2])
    assert set(np.unique(back.group["labels/semantic/1"][:])) == {0, 1, 2}
    assert len(back.group["labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"]) == n_pyramid_levels((700, 900))


def test_empty_chunks_not_stored(tmp_path):
    store = _make(tmp_path / "s.zarr", shape=(512, 512))
    store.write_labels(0, 0, np.zeros((256, 256), np.uint8), np.zeros((256, 256), np.uint32))
    store.write_labels(256, 256, np.ones((256, 256), np.uint8), np.zeros((256, 256), np.uint32))
    stored = [p for p in (tmp_path / "s.zarr" / "labels" / "semantic" / "0").rglob("*") if p.is_file()
              and p.name != "zarr.json"]
    assert len(stored) == 1


def test_ome_ngff_metadata_is_valid(tmp_path):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    store = _make(tmp_path / "s.zarr")
    _fill(store)
    store.build_pyramids()
    store.finalize()
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    for name in ("semantic", "nuclei"):
        ImageLabel.from_zarr(root["labels"][name])
    scale = root["labels/semantic"].attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert scale[0]["scale"] == [1.0, 1.0]  # 0.5 um/px * 2


def test_readable_by_ome_zarr_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    store = _make(tmp_path / "s.zarr")
    _fill(store)
    store.build_pyramids()
    store.finalize()
    nodes = list(Reader(parse_url(str(tmp_path / "s.zarr")))())
    assert nodes, "ome-zarr found no image"
    image = nodes[0]
    assert image.data[0].shape == store.group["0"].shape
    label_paths = [str(n.zarr.path) for n in nodes]
    assert any("semantic" in p for p in label_paths) and any("nuclei" in p for p in label_paths)


def test_incomplete_store_refused_unless_partial(tmp_path):
    _make(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s.zarr")
    assert not open_store(tmp_path / "s.zarr", partial=True).complete


def test_open_for_run_decisions(tmp_path):
    path = tmp_path / "s.zarr"
    partial = staging_path(path)
    assert open_for_run(path, {"slide": "abc"}, overwrite=False) is None  # nothing there: create (beside it)
    store = _make(partial, run={"key": {"slide": "abc"}})
    store.save_tile(3, {"a": np.arange(4)})
    resumed = open_for_run(path, {"slide": "abc"}, overwrite=False)
    assert resumed is not None and resumed.path == partial and resumed.has_tile(3) and not resumed.has_tile(4)
    assert np.array_equal(resumed.load_tile(3)["a"], np.arange(4))
    with pytest.raises(StoreError, match="different run"):
        open_for_run(path, {"slide": "other"}, overwrite=False)
    store.finalize()
    publish(path)  # complete: swapped in
    assert open_store(path).complete and not partial.exists()
    with pytest.raises(StoreError, match="--overwrite"):
        open_for_run(path, {"slide": "abc"}, overwrite=False)
    assert open_for_run(path, {"slide": "abc"}, overwrite=True) is None
    assert open_store(path).complete  # the old store stays until the new one is complete


def test_an_unfinished_store_of_an_older_histopan_is_moved_beside_and_resumed(tmp_path):
    path = tmp_path / "s.zarr"
    _make(path, run={"key": {"slide": "abc"}}).save_tile(3, {"a": np.arange(4)})  # built in place, as before
    resumed = open_for_run(path, {"slide": "abc"}, overwrite=False)
    assert resumed is not None and resumed.path == staging_path(path) and resumed.has_tile(3)
    assert not path.exists()


def test_store_creation_is_atomic(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(TypeError):  # fails half way through (an unserialisable attribute): nothing is left
        _make(path, run={"key": {"slide": object()}})
    assert list(tmp_path.iterdir()) == []
    store = _make(path)
    assert store.attrs["format"] == "histopan-store" and [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_refuses_to_touch_a_foreign_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a histopan store"):
            open_for_run(folder, {}, overwrite=overwrite)
    assert (folder / "notes.txt").exists()


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="zarr.json"):
        open_store(tmp_path / "plain")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not a histopan store"):
        open_store(tmp_path / "other.zarr")


def test_majority_downsampling():
    a = np.array([[1, 1, 2, 3], [1, 2, 3, 2], [0, 0, 5, 5], [4, 4, 6, 6]], np.uint8)
    out = _majority_2x2(a)
    assert out.tolist() == [[1, 2], [0, 5]]  # 2-2 ties go to the smaller value


def test_tissue_region_round_trip_and_ome_validity(tmp_path):
    """The run's tissue region kept in the store (the ``tissue`` array) samples exactly as the region it was made
    from, read lazily; the extra array leaves the OME-NGFF metadata valid."""
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.labels import Labels

    from histopan.slide.tissue import TISSUE, TissueMask, tissue_region

    cells = np.zeros((44, 56), bool)
    cells[5:40, 8:50] = True
    cells[15:25, 20:30] = False  # enclosed glass
    mask = TissueMask(mask=cells, downsample=16.0, downsample_xy=(16.0, 16.0), slide_dimensions=(896, 704), mpp=8.0)
    region = tissue_region(mask)
    store = create_store(tmp_path / "s.zarr", shape=(700, 900), mpp=0.5, chunk=256, classes=CLASSES,
                         image_shape=(175, 225), image_mpp=2.0, name="slide", run={"key": {"slide": "abc"}},
                         tissue=region)
    _fill(store)
    store.build_pyramids()
    store.finalize()
    back = open_store(tmp_path / "s.zarr").tissue_region()
    assert isinstance(back.codes, zarr.Array)
    np.testing.assert_array_equal(back.codes[:], region.codes)
    np.testing.assert_array_equal(back.sample_box(100, 50, 500, 400, 1.0), region.sample_box(100, 50, 500, 400, 1.0))
    attrs = open_store(tmp_path / "s.zarr").attrs["tissue"]
    assert attrs["mask_area_mm2"] == pytest.approx(region.area_mm2(TISSUE)) and attrs["margin_um"] == 8.0
    assert attrs["enclosed_area_mm2"] == pytest.approx(100 * 64e-6)
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    assert _make(tmp_path / "none.zarr").tissue_region() is None
