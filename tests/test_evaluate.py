"""Tests of histopan.evaluation and ``histopan evaluate``: real label folders, real zarr stores, point files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from histopan.store import create_store
from skimage.morphology import disk, erosion

from histopan.cli import main
from histopan.errors import DataError, StoreError
from histopan.evaluation import evaluate, evaluate_stores, instance_centroids, read_points_geojson
from histopan.metrics import ClassSpec, binary_pq, instance_scores, panoptic_quality, summarize

N_IMAGES = 3
CLASSES = (
    ClassSpec("background", (128, 128, 128), "stuff", id=0),
    ClassSpec("stroma", (128, 128, 128), "stuff", id=1),
    ClassSpec("tumour", (128, 128, 128), "thing", id=2),
    ClassSpec("lymphocyte", (128, 128, 128), "thing", id=3),
)


@pytest.fixture(scope="module")
def monuseg_pair(data_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A truth folder (copies of 3 MoNuSeg label maps) and a prediction folder of eroded copies."""
    root = tmp_path_factory.mktemp("monuseg")
    truth, pred = root / "truth", root / "pred"
    truth.mkdir()
    pred.mkdir()
    for f in sorted((data_dir / "monuseg_train" / "labels").glob("*.tif"))[:N_IMAGES]:
        lab = tifffile.imread(f)
        tifffile.imwrite(truth / f.name, lab)
        tifffile.imwrite(pred / f.name, erosion(lab, disk(2)))
    return pred, truth


def test_cli_on_monuseg_vs_eroded(monuseg_pair, tmp_path, capsys):
    pred, truth = monuseg_pair
    out = tmp_path / "res.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "nucleus" in table and "aji" in table
    res = json.loads(out.read_text())
    assert set(res) >= {"aggregate", "all", "things", "stuff", "classes", "aji", "images"}
    assert res["aggregate"] == "dataset"
    assert set(res["all"]) == {"pq", "sq", "rq", "tp", "fp", "fn"}
    assert list(res["classes"]) == ["nucleus"] and len(res["images"]) == N_IMAGES
    # "all" is the binary nucleus PQ: the dataset sum of per-image binary counts
    total = None
    for f in sorted(truth.glob("*.tif")):
        s = binary_pq(tifffile.imread(f), tifffile.imread(pred / f.name))
        total = s if total is None else total + s
    assert (res["all"]["tp"], res["all"]["fp"], res["all"]["fn"]) == (total.tp, total.fp, total.fn)
    assert res["all"]["pq"] == pytest.approx(total.pq)
    # erosion by 2 px keeps most nuclei matched but lowers SQ well below 1
    assert 0.8 < res["all"]["rq"] < 1.0
    assert 0.5 < res["all"]["sq"] < 0.9
    assert res["stuff"]["pq"] is None
    assert 0 < res["aji"] < 1


def test_cli_per_image_aggregate_and_identity(monuseg_pair, tmp_path):
    pred, truth = monuseg_pair
    out = tmp_path / "per.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--aggregate", "per-image",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    per = [instance_scores(tifffile.imread(f), tifffile.imread(pred / f.name)) for f in sorted(truth.glob("*.tif"))]
    assert res["all"]["pq"] == pytest.approx(np.mean([r.per_class[1].pq for r in per]))
    assert res["aji"] == pytest.approx(np.mean([r.aji.value for r in per]))
    same = evaluate(truth, truth)
    assert same["all"]["pq"] == 1.0 and same["aji"] == 1.0 and same["dice"] == 1.0


def test_folder_errors(monuseg_pair, tmp_path):
    pred, truth = monuseg_pair
    partial = tmp_path / "partial"
    partial.mkdir()
    first = sorted(pred.glob("*.tif"))[0]
    tifffile.imwrite(partial / first.name, tifffile.imread(first))
    with pytest.raises(DataError, match="no prediction"):
        evaluate(partial, truth)
    small = tmp_path / "small"
    small.mkdir()
    for f in sorted(truth.glob("*.tif")):
        tifffile.imwrite(small / f.name, tifffile.imread(f)[:100, :100])
    with pytest.raises(DataError, match="differ in size") as exc:
        evaluate(small, truth)
    assert first.stem in str(exc.value) or "small" in str(exc.value)
    # through the CLI: a clear message and exit code 2
    assert main(["evaluate", "--pred", str(partial), "--truth", str(truth)]) == 2


# ------------------------------------------------------------------------------------------------ stores


def panoptic_maps(seed: int, size: int = 300) -> tuple[np.ndarray, ...]:
    from skimage.draw import disk as draw_disk

    rng = np.random.default_rng(seed)
    out = []
    n = 60
    centres = rng.uniform(0, size, (n, 2))
    radii = rng.uniform(3, 9, n)
    kinds = rng.integers(2, 4, n)
    for is_pred in (False, True):
        sem = np.zeros((size, size), np.uint8)
        sem[:, : size // 3] = 1
        inst = np.zeros((size, size), np.uint32)
        for i in range(n):
            c = centres[i] + (rng.normal(0, 1.5, 2) if is_pred else 0)
            rr, cc = draw_disk(tuple(c), radii[i], shape=sem.shape)
            inst[rr, cc] = 100_000 + i if is_pred else 5_000_000 + i  # large, store-like global ids
            sem[rr, cc] = kinds[i]
        out += [sem, inst]
    return tuple(out)


def write_store(path: Path, sem: np.ndarray, inst: np.ndarray, complete: bool = True) -> Path:
    """A real histopan store (histopan.store) holding the given label maps, 64-px chunks."""
    store = create_store(path, shape=sem.shape, mpp=0.5, chunk=64,
                         classes=[ClassSpec(c.name, (1, 2, 3), c.kind, id=c.id) for c in CLASSES],
                         image_shape=(8, 8), image_mpp=4.0, name="test", run={"key": {}})
    store.write_labels(0, 0, sem, inst)
    if complete:
        store.finalize()
    return path


def test_store_evaluation_region_wise_equals_in_memory(tmp_path):
    ts, ti, ps, pi = panoptic_maps(1)
    truth = write_store(tmp_path / "truth.zarr", ts, ti)
    pred = write_store(tmp_path / "pred.zarr", ps, pi)
    whole = panoptic_quality(ts, ti, ps, pi, CLASSES)
    # regions of 64 and 128 px: many regions, nuclei cut across region borders
    for region in (64, 128, 10_000):
        res = evaluate_stores(pred, truth, region_px=region)
        assert res.per_class == whole.per_class
        assert res.aji == whole.aji and res.dice == whole.dice
    assert whole.per_class[2].tp > 10 and whole.per_class[3].tp > 10
    out = tmp_path / "store.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    expect = summarize([whole], "dataset")
    assert res["all"] == pytest.approx(expect["all"])
    assert set(res["classes"]) == {"background", "stroma", "tumour", "lymphocyte"}
    assert res["things"]["tp"] == whole.per_class[2].tp + whole.per_class[3].tp


def test_store_refusals(tmp_path):
    ts, ti, ps, pi = panoptic_maps(2, size=64)
    truth = write_store(tmp_path / "truth.zarr", ts, ti)
    pred = write_store(tmp_path / "pred.zarr", ps, pi, complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        evaluate(pred, truth)
    small = write_store(tmp_path / "small.zarr", ps[:32], pi[:32])
    with pytest.raises(DataError, match="differ in size"):
        evaluate(small, truth)
    folder = tmp_path / "labels"
    folder.mkdir()
    with pytest.raises(DataError, match="store with a store"):
        evaluate(folder, truth)


# ------------------------------------------------------------------------------------------------ points


def test_cli_points_on_crc(data_dir, tmp_path):
    truth = data_dir / "crc_points" / "val" / "points"
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(0)
    n_true = n_kept = 0
    for f in sorted(truth.glob("*.geojson")):
        data = json.loads(f.read_text())
        feats = []
        for feat in data["features"]:
            n_true += 1
            if rng.random() < 0.1:  # drop 10 %
                continue
            x, y = feat["geometry"]["coordinates"]
            feat = json.loads(json.dumps(feat))
            feat["geometry"]["coordinates"] = [x + rng.uniform(-2, 2), y + rng.uniform(-2, 2)]  # within 3 um = 6 px
            feats.append(feat)
            n_kept += 1
        feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [-50.0, -50.0]},
                      "properties": {"objectType": "annotation"}})
        (pred / f.name).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "points.json"
    assert main(["evaluate", "--points", "--pred", str(pred), "--truth", str(truth), "--radius-um", "3",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    n_images = len(list(truth.glob("*.geojson")))
    assert res["mpp"] == 0.5 and res["radius_px"] == 6.0
    assert res["all"]["tp"] == n_kept and res["all"]["fn"] == n_true - n_kept and res["all"]["fp"] == n_images
    assert set(res["classes"]) == {"epithelial", "fibroblast", "inflammatory", "others"}
    # types were kept: only jitter can pair a point with a close neighbour of another type, rarely
    assert res["type_accuracy"] > 0.99
    assert sum(c["fp_class"] for c in res["classes"].values()) <= 0.01 * n_kept
    assert all(0.85 < c["f1"] < 1.0 for c in res["classes"].values())


def test_points_from_instance_maps(data_dir):
    labels = sorted((data_dir / "monuseg_train" / "labels").glob("*.tif"))[0]
    inst = tifffile.imread(labels)
    xy = instance_centroids(inst)
    assert len(xy) == len(np.unique(inst)) - 1
    ys, xs = np.nonzero(inst == inst.max())
    assert xy[-1] == pytest.approx([xs.mean() + 0.5, ys.mean() + 0.5])
    res = evaluate_points_same(labels)
    assert res["all"]["f1"] == 1.0 and res["all"]["tp"] == len(xy)


def evaluate_points_same(path: Path) -> dict:
    from histopan.evaluation import evaluate_points

    return evaluate_points(path, path, radius_um=3.0)  # mpp from monuseg meta.json


def test_geojson_reader_errors(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 1], [0, 0]]]},
         "properties": {}}]}))
    with pytest.raises(DataError, match="not a point"):
        read_points_geojson(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        read_points_geojson(bad)
