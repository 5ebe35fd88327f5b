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
from histopan.evaluation import evaluate, evaluate_semantic, evaluate_stores, instance_centroids, read_points_geojson
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


# ------------------------------------------------------------------------------------------- tissue maps


def _write_png(path: Path, labels: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(labels.astype(np.uint8)).save(path)
    return path


def test_semantic_label_images_by_hand(tmp_path, capsys):
    """A 2 x 6 truth in the user's values (0 background, 128 stroma, 255 tumour, 7 not in the map) against a
    prediction in histopan's class ids, with a map for each side: counts and scores worked out by hand."""
    truth = np.array([[0, 0, 128, 128, 255, 7],
                      [255, 255, 128, 0, 7, 7]])
    pred = np.array([[0, 1, 1, 1, 3, 3],
                     [3, 0, 1, 9, 1, 3]])  # 9: not in the prediction's map
    t = _write_png(tmp_path / "truth.png", truth)
    p = _write_png(tmp_path / "pred.png", pred)
    (tmp_path / "pred-map.yaml").write_text("0: background\n1: stroma\n2: necrosis\n3: tumour\n")
    (tmp_path / "truth-map.json").write_text(json.dumps({"0": "background", "128": "stroma", "255": "tumour"}))
    out = tmp_path / "scores.json"
    for truth_map in ("0=background,128=stroma,255=tumour", str(tmp_path / "truth-map.json")):
        assert main(["evaluate", "--pred", str(p), "--truth", str(t), "--semantic-map", truth_map,
                     "--pred-map", str(tmp_path / "pred-map.yaml"), "--json", str(out)]) == 0
        res = json.loads(out.read_text())
        # counted: the 9 pixels whose truth is listed, less the one predicted 9 (truth background at [1, 3])
        assert res["pixels"] == 8
        assert res["ignored"] == {"truth_pixels": 3, "pred_pixels": 1}
        names = res["confusion"]["classes"]
        assert names == ["background", "stroma", "necrosis", "tumour"]
        # rows truth, columns prediction: background 0,0 -> bg, stroma; stroma x3 -> stroma; tumour 255 x3 ->
        # tumour, tumour, bg
        assert res["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0], [1, 0, 0, 2]]
        assert res["classes"]["background"]["iou"] == pytest.approx(1 / 3)
        assert res["classes"]["stroma"]["iou"] == pytest.approx(3 / 4)
        assert res["classes"]["tumour"]["iou"] == pytest.approx(2 / 3)
        assert res["classes"]["tumour"]["recall"] == pytest.approx(2 / 3)
        assert res["classes"]["necrosis"]["iou"] is None
        assert res["mean_iou"] == pytest.approx((1 / 3 + 3 / 4 + 2 / 3) / 3)
        assert res["pixel_accuracy"] == pytest.approx(6 / 8)
        assert res["class_maps"]["truth"] == {"0": "background", "128": "stroma", "255": "tumour"}
    table = capsys.readouterr().out
    assert "mean_iou" in table and "confusion matrix" in table and "stroma" in table


def test_semantic_folders_and_aggregation(tmp_path):
    """Two images paired by stem: the dataset aggregate scores the summed confusion, per-image the mean."""
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    a_truth = np.zeros((8, 8), np.uint8)
    a_truth[:, 4:] = 2
    a_pred = a_truth.copy()
    a_pred[:, 4] = 0  # 8 tumour pixels called background
    b_truth = np.full((4, 4), 2, np.uint8)
    _write_png(tmp_path / "t" / "a.png", a_truth)
    _write_png(tmp_path / "p" / "a.png", a_pred)
    _write_png(tmp_path / "t" / "b.png", b_truth)
    _write_png(tmp_path / "p" / "b.png", b_truth)
    spec = "0=background,2=tumour"
    whole = evaluate_semantic(tmp_path / "p", tmp_path / "t", spec)
    assert whole["confusion"]["matrix"] == [[32, 0], [8, 40]]
    assert whole["classes"]["tumour"]["iou"] == pytest.approx(40 / 48)
    assert whole["pixel_accuracy"] == pytest.approx(72 / 80)
    per = evaluate_semantic(tmp_path / "p", tmp_path / "t", spec, aggregate="per-image")
    assert per["classes"]["tumour"]["iou"] == pytest.approx((24 / 32 + 1.0) / 2)
    assert per["classes"]["background"]["iou"] == pytest.approx(32 / 40)  # defined in image a only
    assert per["pixel_accuracy"] == pytest.approx((56 / 64 + 1.0) / 2)
    assert [i["name"] for i in per["images"]] == ["a", "b"]


def test_semantic_store_against_a_truth_image(tmp_path):
    """A store's tissue map against the truth as a user would draw it (own values, nuclei inside their tissue):
    a store equal to the truth scores 1, nucleus pixels counting as the tissue under them (the table's
    stuff_class); a block drawn tumour where the store has stroma, and a block of an unlisted value, give the
    counts expected; a truth at pyramid level 1 is read against level 1."""
    from histopan.testing_store import build_test_store

    store = build_test_store(tmp_path / "s.zarr", shape=(300, 400), chunk=128, seed=5)
    sem, nuc = store.semantic[:], store.nuclei[:]
    table = store.read_table(columns=["id", "stuff_class"])
    class_id = {c.name: c.id for c in store.classes}
    under = dict(zip(table["id"].tolist(), (class_id[n] for n in table["stuff_class"])))
    stuff = sem.copy()
    stuff[nuc > 0] = [under[i] for i in nuc[nuc > 0].tolist()]
    assert (nuc > 0).sum() > 500 and set(np.unique(stuff)) == {0, 1, 2, 3}
    user = np.array([10, 20, 30, 40], np.uint8)  # background, stroma, necrosis, tumour as the user writes them
    spec = "10=background,20=stroma,30=necrosis,40=tumour"
    truth = user[stuff]
    _write_png(tmp_path / "same.png", truth)
    same = evaluate_semantic(tmp_path / "s.zarr", tmp_path / "same.png", spec)
    assert same["pixel_accuracy"] == 1.0 and same["mean_iou"] == 1.0
    assert same["pixels"] == truth.size and same["ignored"] == {"truth_pixels": 0, "pred_pixels": 0}
    assert same["confusion"]["classes"] == ["background", "stroma", "necrosis", "tumour"]  # no nucleus class

    drawn = truth.copy()
    block = (slice(40, 140), slice(60, 200))
    moved = int((stuff[block] == 1).sum())
    drawn[block] = np.where(stuff[block] == 1, 40, drawn[block])  # stroma drawn as tumour
    drawn[200:230, 300:360] = 99  # not in the map
    _write_png(tmp_path / "drawn.png", drawn)
    res = evaluate_semantic(tmp_path / "s.zarr", tmp_path / "drawn.png", spec)
    counted = (drawn != 99)
    expected = np.zeros((4, 4), np.int64)
    np.add.at(expected, ((np.searchsorted(user, drawn[counted])), stuff[counted]), 1)
    assert res["confusion"]["matrix"] == expected.tolist()
    assert res["confusion"]["matrix"][3][1] == moved > 1000
    assert res["ignored"]["truth_pixels"] == 1800
    assert res["pixel_accuracy"] == pytest.approx(1 - moved / counted.sum())

    # the store's own class ids as the truth's values (no map), at pyramid level 1
    _write_png(tmp_path / "level1.png", stuff[::2, ::2])
    low = evaluate_semantic(tmp_path / "s.zarr", tmp_path / "level1.png")
    # at level 1 the label pyramids are a 2 x 2 majority (classes) and a sample (nuclei): a few nucleus-class
    # pixels have no nucleus id there, so no tissue class under them, and are not counted
    assert low["pixels"] + low["ignored"]["pred_pixels"] == 150 * 200 and low["ignored"]["pred_pixels"] < 300
    assert low["pixel_accuracy"] > 0.9
    assert low["class_maps"]["truth"] == "the store's tissue class ids"
    # the truth names the nucleus class: the store's nucleus pixels are scored as nuclei
    with_nuclei = np.where(nuc > 0, 50, truth).astype(np.uint8)
    _write_png(tmp_path / "nuclei.png", with_nuclei)
    res = evaluate_semantic(tmp_path / "s.zarr", tmp_path / "nuclei.png", spec + ",50=nucleus")
    assert res["classes"]["nucleus"]["iou"] == 1.0 and res["pixel_accuracy"] == 1.0
