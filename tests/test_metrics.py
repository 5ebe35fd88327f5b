"""Tests of histopan.metrics: hand-computed cases, properties, torchmetrics cross-check, edge cases, points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.draw import disk
from torchmetrics.detection import PanopticQuality

from histopan.errors import DataError
from histopan.metrics import (
    ClassSpec,
    JointHistogram,
    PQStats,
    aji,
    aji_plus,
    binary_pq,
    classification_f1,
    dice,
    evaluate_histogram,
    panoptic_quality,
    point_detection,
    summarize,
    summarize_points,
)

CLASSES = (
    ClassSpec("background", (128, 128, 128), "stuff", id=0),
    ClassSpec("stroma", (128, 128, 128), "stuff", id=1),
    ClassSpec("tumour", (128, 128, 128), "thing", id=2),
    ClassSpec("lymphocyte", (128, 128, 128), "thing", id=3),
)
VOID = 9


def square(shape, y, x, s, value=1, out=None):
    a = np.zeros(shape, np.uint16) if out is None else out
    a[y : y + s, x : x + s] = value
    return a


# ----------------------------------------------------------------------------------------- hand cases


def test_identical_maps_give_pq_one():
    t = square((16, 16), 2, 2, 5, 1)
    square((16, 16), 9, 9, 4, 7, out=t)
    s = binary_pq(t, t.copy())
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.pq == s.sq == s.rq == 1.0


def test_one_nucleus_as_four_quadrants_scores_zero():
    t = square((20, 20), 2, 2, 8, 1)
    p = np.zeros_like(t)
    for k, (y, x) in enumerate([(2, 2), (2, 6), (6, 2), (6, 6)], start=1):
        square(p.shape, y, x, 4, k, out=p)
    s = binary_pq(t, p)
    assert (s.tp, s.fp, s.fn) == (0, 4, 1)
    assert s.pq == 0.0 and s.rq == 0.0
    # AJI: the truth pairs with one quadrant (16 of 64 pixels); the three others add their area to the union
    assert aji(t, p) == pytest.approx(16 / (64 + 48))
    assert dice(t, p) == 1.0


def test_two_touching_nuclei_merged_into_one():
    t = np.zeros((10, 20), np.uint16)
    t[2:8, 2:8] = 1  # 36 px
    t[2:8, 8:12] = 2  # 24 px, touching
    p = (t > 0).astype(np.uint16) * 5  # one merged prediction, 60 px
    s = binary_pq(t, p)
    # IoU with the first nucleus 36/60 = 0.6 > 0.5: matched; the second is missed
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert s.sq == pytest.approx(0.6)
    assert s.rq == pytest.approx(1 / 1.5)
    assert s.pq == pytest.approx(0.6 / 1.5)
    # AJI: both truths pick the merged prediction: C = 36 + 24, U = 60 + 60
    assert aji(t, p) == pytest.approx(60 / 120)
    # AJI+: one-to-one, the second truth is unpaired: C = 36, U = 60 + 24
    assert aji_plus(t, p) == pytest.approx(36 / 84)


def test_squares_offset_by_one_pixel_do_not_match():
    t = square((10, 10), 1, 1, 4)
    p = square((10, 10), 2, 2, 4)
    s = binary_pq(t, p)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1) and s.pq == 0.0
    # with a lower threshold they match, with IoU 9 / 23
    low = binary_pq(t, p, iou_threshold=0.3)
    assert low.tp == 1 and low.iou_sum == pytest.approx(9 / 23)


def test_hungarian_below_half_maximises_total_iou():
    # truth A overlaps preds X (IoU 0.45) and Y (0.4); truth B overlaps only X (0.42).
    # Greedy best-for-A would take X and leave B unmatched; the assignment takes A-Y and B-X.
    t = np.zeros((1, 200), np.uint16)
    p = np.zeros_like(t)
    t[0, 0:100] = 1
    p[0, 55:100] = 2  # X: inter with A 45 -> iou 45/100
    t[0, 100:140] = 2
    p[0, 100:119] = 2  # X also covers 19 px of B
    p[0, 0:40] = 3  # Y: inter with A 40 -> 40/100
    ious = {
        "A-X": 45 / (100 + 64 - 45),
        "B-X": 19 / (40 + 64 - 19),
        "A-Y": 40 / 100,
    }
    s = binary_pq(t, p, iou_threshold=0.2)
    assert s.tp == 2
    assert s.iou_sum == pytest.approx(ious["A-Y"] + ious["B-X"])
    assert s.iou_sum > ious["A-X"]


def test_void_pixels_are_excluded_and_mostly_void_prediction_is_not_fp():
    ts = np.zeros((20, 20), np.uint8)
    ts[:, 10:] = VOID
    ti = square((20, 20), 2, 2, 6, 1)
    ps = np.zeros_like(ts)
    pi = np.zeros_like(ti)
    # prediction covers the truth nucleus plus 6x6 of void: IoU = 36 / (72 - 36 + 36 - 36) = 1 after removal
    pi[2:8, 2:8] = 1
    pi[2:8, 10:16] = 1
    ps[pi > 0] = 2
    ts[ti > 0] = 2
    # a second prediction lies 2/3 on void: not a false positive
    pi[12:15, 8:17] = 2
    ps[12:15, 8:17] = 2
    r = panoptic_quality(ts, ti, ps, pi, CLASSES, void_label=VOID)
    thing = r.per_class[2]
    assert (thing.tp, thing.fp, thing.fn) == (1, 0, 0)
    assert thing.iou_sum == pytest.approx(36 / (36 + 72 - 36 - 36))
    # stuff "background": the truth background segment (non-void, non-nucleus) vs the prediction background
    bg = r.per_class[0]
    assert bg.tp == 1


def test_instance_class_is_majority_thing_class():
    ts = np.zeros((10, 10), np.uint8)
    ti = square((10, 10), 1, 1, 4, 3)
    ts[ti > 0] = 2
    ps = ts.copy()
    pi = ti.copy()
    ps[1, 1:4] = 3  # 3 of 16 pixels say lymphocyte: the instance stays tumour
    r = panoptic_quality(ts, ti, ps, pi, CLASSES)
    assert r.per_class[2].tp == 1 and r.per_class[3].fp == 0


# ------------------------------------------------------------------------------------------ edge cases


def test_empty_truth_empty_pred_both_empty():
    z = np.zeros((8, 8), np.uint16)
    n = square((8, 8), 1, 1, 3)
    s = binary_pq(z, n)
    assert (s.tp, s.fp, s.fn) == (0, 1, 0) and s.pq == 0.0 and s.sq == 0.0
    s = binary_pq(n, z)
    assert (s.tp, s.fp, s.fn) == (0, 0, 1) and s.pq == 0.0
    s = binary_pq(z, z)
    assert (s.tp, s.fp, s.fn) == (0, 0, 0) and math.isnan(s.pq) and not s.defined
    assert math.isnan(aji(z, z)) and math.isnan(dice(z, z))
    assert aji(z, n) == 0.0 and dice(n, z) == 0.0


def test_class_present_in_only_one_map():
    ts = np.zeros((12, 12), np.uint8)
    ti = square((12, 12), 1, 1, 4, 1)
    ts[ti > 0] = 2
    ps, pi = ts.copy(), ti.copy()
    square(pi.shape, 7, 7, 3, 2, out=pi)
    ps[7:10, 7:10] = 3  # a lymphocyte only in the prediction
    r = panoptic_quality(ts, ti, ps, pi, CLASSES)
    assert r.per_class[3] == PQStats(0, 1, 0, 0.0)
    assert math.isnan(r.per_class[1].pq)  # stroma absent from both: undefined
    summ = summarize([r], "dataset")
    assert summ["classes"]["lymphocyte"]["pq"] == 0.0
    assert summ["classes"]["stroma"]["pq"] is None
    # things: mean of tumour (1) and lymphocyte (0); stuff: background only
    assert summ["things"]["pq"] == pytest.approx(0.5)
    assert summ["stuff"]["pq"] == pytest.approx(r.per_class[0].pq)
    # PanNuke's rule skips the lymphocyte of this image (no truth lymphocyte)
    pan = summarize([r], "per-image", skip="truth-absent")
    assert pan["classes"]["lymphocyte"]["pq"] is None
    assert pan["things"]["pq"] == pytest.approx(1.0)


def test_errors_are_specific():
    a = np.zeros((4, 4), np.uint8)
    with pytest.raises(DataError, match="shape"):
        binary_pq(a, np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match="integer"):
        binary_pq(a.astype(float), a)
    ts = np.full((4, 4), 7, np.uint8)
    with pytest.raises(DataError, match="not among the classes") as exc:
        panoptic_quality(ts, a, a, a, CLASSES)
    assert exc.value.value == [7]
    with pytest.raises(DataError, match="thing class"):
        panoptic_quality(a, square((4, 4), 0, 0, 2), a, a, CLASSES)  # an instance on stuff pixels only
    with pytest.raises(DataError, match="threshold"):
        binary_pq(a, a, iou_threshold=1.0)


# ----------------------------------------------------------------------------------------- properties

label_maps = arrays(np.uint8, (12, 12), elements=st.integers(0, 5))


@settings(max_examples=40, deadline=None)
@given(label_maps, label_maps, st.permutations(list(range(1, 6))))
def test_relabelling_invariance(t, p, perm):
    lut = np.array([0, *perm], np.uint8)
    a, b, c = binary_pq(t, p), binary_pq(lut[t], p), binary_pq(t, lut[p])
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn) == (c.tp, c.fp, c.fn)
    # other ids sum the matched IoUs in another order: equal up to the last bits
    assert a.iou_sum == pytest.approx(b.iou_sum, rel=1e-12) and a.iou_sum == pytest.approx(c.iou_sum, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(label_maps)
def test_identical_maps_pq_one(t):
    s = binary_pq(t, t)
    if t.any():
        assert s.pq == pytest.approx(1.0) and s.fp == s.fn == 0
    else:
        assert not s.defined


@settings(max_examples=40, deadline=None)
@given(label_maps, label_maps)
def test_rq_symmetric_under_swap(t, p):
    a, b = binary_pq(t, p), binary_pq(p, t)
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fn, b.fp)
    assert a.iou_sum == pytest.approx(b.iou_sum)
    assert a.rq == pytest.approx(b.rq, nan_ok=True)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_dataset_equals_per_image_for_one_image(seed):
    r = panoptic_quality(*random_panoptic(seed, size=24), CLASSES, void_label=VOID)
    d, i = summarize([r], "dataset"), summarize([r], "per-image")
    blocks_d = [d["all"], d["things"], d["stuff"], *d["classes"].values()]
    blocks_i = [i["all"], i["things"], i["stuff"], *i["classes"].values()]
    for bd, bi in zip(blocks_d, blocks_i, strict=True):
        for k in ("pq", "sq", "rq", "tp", "fp", "fn"):
            assert (bd[k] is None and bi[k] is None) or bd[k] == pytest.approx(bi[k])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 23), st.integers(1, 23))
def test_region_accumulation_is_exact(seed, cy, cx):
    ts, ti, ps, pi = random_panoptic(seed, size=24)
    whole = panoptic_quality(ts, ti, ps, pi, CLASSES, void_label=VOID)
    hist = JointHistogram()
    for ys in (slice(0, cy), slice(cy, 24)):
        for xs in (slice(0, cx), slice(cx, 24)):
            hist.add(ti[ys, xs], pi[ys, xs], ts[ys, xs], ps[ys, xs])
    tiled = evaluate_histogram(hist, CLASSES, VOID)
    assert tiled.per_class == whole.per_class
    assert (tiled.aji, tiled.aji_plus, tiled.dice) == (whole.aji, whole.aji_plus, whole.dice)


# --------------------------------------------------------------------------------- torchmetrics check


def random_panoptic(seed: int, size: int = 48, void: bool = True):
    """Truth and prediction (class map, instance map): stuff halves, disc nuclei of two classes, void in truth.

    Each instance id carries one thing class; stuff pixels have instance 0; the prediction has no void.
    """
    rng = np.random.default_rng(seed)
    maps = []
    n = int(rng.integers(0, 10))
    centres = rng.uniform(0, size, (n, 2))
    radii = rng.uniform(1.5, size / 6, n)
    kinds = rng.integers(2, 4, n)
    for is_pred in (False, True):
        sem = np.zeros((size, size), np.uint8)
        sem[: int(rng.integers(0, size)), :] = 1
        inst = np.zeros((size, size), np.uint32)
        for i in range(n):
            if is_pred and rng.random() < 0.2:
                continue
            jitter = rng.normal(0, 1.5, 2) if is_pred else 0
            rr, cc = disk(tuple(centres[i] + jitter), radii[i] * (rng.uniform(0.7, 1.3) if is_pred else 1), shape=sem.shape)
            k = kinds[i] if not (is_pred and rng.random() < 0.2) else 5 - kinds[i]
            inst[rr, cc] = i + 1 + (100 if is_pred else 0) + (1000 if k == 3 else 0)
            sem[rr, cc] = k
        if is_pred and rng.random() < 0.5:  # a spurious extra prediction
            rr, cc = disk((rng.uniform(0, size), rng.uniform(0, size)), 3, shape=sem.shape)
            inst[rr, cc] = 999
            sem[rr, cc] = 2
        if not is_pred and void:
            y = int(rng.integers(0, size))
            band = slice(y, min(size, y + int(rng.integers(0, 8))))
            sem[band, :] = VOID
        maps += [sem, inst]
    ts, ti, ps, pi = maps
    return ts, ti, ps, pi


def test_matches_torchmetrics_panoptic_quality():
    metric = PanopticQuality(things={2, 3}, stuffs={0, 1}, return_sq_and_rq=True, return_per_class=True)
    results = []
    batch_p, batch_t = [], []
    for seed in range(12):
        ts, ti, ps, pi = random_panoptic(seed)
        results.append(panoptic_quality(ts, ti, ps, pi, CLASSES, void_label=VOID))
        # torchmetrics: (category, instance) per pixel; stuff instance ids are ignored by it
        batch_t.append(np.stack([ts, np.where(ti > 0, ti, 0)], -1).astype(np.int64))
        batch_p.append(np.stack([ps, pi], -1).astype(np.int64))
    metric.update(torch.from_numpy(np.stack(batch_p)), torch.from_numpy(np.stack(batch_t)))
    tm = metric.compute().numpy().reshape(-1, 3)  # rows: things sorted (2, 3), then stuffs (0, 1)
    ours = summarize(results, "dataset")
    order = [(2, "tumour"), (3, "lymphocyte"), (0, "background"), (1, "stroma")]
    total = {cid: sum((r.per_class[cid] for r in results), PQStats()) for cid, _ in order}
    for k, (cid, name) in enumerate(order):
        # exact: the tp / fp / fn counts torchmetrics accumulates
        assert total[cid].tp == int(metric.true_positives[k])
        assert total[cid].fp == int(metric.false_positives[k])
        assert total[cid].fn == int(metric.false_negatives[k])
        # (torchmetrics rounds each IoU to float32 before summing in double)
        assert total[cid].iou_sum == pytest.approx(float(metric.iou_sum[k]), rel=1e-7)
        assert total[cid].tp + total[cid].fp + total[cid].fn > 0
        # torchmetrics returns float32 scores
        c = ours["classes"][name]
        assert [c["pq"], c["sq"], c["rq"]] == pytest.approx(tm[k].tolist(), rel=1e-6)
    # and the average over classes
    avg = PanopticQuality(things={2, 3}, stuffs={0, 1})
    avg.update(torch.from_numpy(np.stack(batch_p)), torch.from_numpy(np.stack(batch_t)))
    assert ours["all"]["pq"] == pytest.approx(float(avg.compute()), rel=1e-6)


def test_matches_torchmetrics_per_image():
    for seed in range(12, 24):
        ts, ti, ps, pi = random_panoptic(seed)
        r = panoptic_quality(ts, ti, ps, pi, CLASSES, void_label=VOID)
        m = PanopticQuality(things={2, 3}, stuffs={0, 1}, return_sq_and_rq=True, return_per_class=True)
        m.update(
            torch.from_numpy(np.stack([ps, pi], -1)[None].astype(np.int64)),
            torch.from_numpy(np.stack([ts, ti], -1)[None].astype(np.int64)),
        )
        tm = m.compute().numpy().reshape(-1, 3)
        for row, cid in zip(tm, [2, 3, 0, 1], strict=True):
            s = r.per_class[cid]
            expect = [s.pq, s.sq, s.rq] if s.defined else [0.0, 0.0, 0.0]
            assert expect == pytest.approx(row.tolist(), rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------- points


def test_point_detection_counts_and_hungarian():
    true = [[0, 0], [10, 0]]
    # pred 0 is near both truths: greedy nearest would pair it with truth 0 and leave truth 1 alone
    pred = [[6, 0], [-3, 0], [100, 100]]
    r = point_detection(true, pred, radius_px=5)
    assert (r.tp, r.fp, r.fn) == (2, 1, 0)
    assert sorted(map(tuple, r.pairs.tolist())) == [(0, 1), (1, 0)]
    assert r.precision == pytest.approx(2 / 3) and r.recall == 1.0 and r.f1 == pytest.approx(0.8)


def test_point_detection_empty_and_coincident():
    r = point_detection([], [[1, 1]], 3)
    assert (r.tp, r.fp, r.fn) == (0, 1, 0) and r.f1 == 0.0
    r = point_detection([[2, 2]], [[2, 2]], 3)
    assert r.tp == 1
    r = point_detection(np.zeros((0, 2)), np.zeros((0, 2)), 3)
    assert math.isnan(r.f1)
    with pytest.raises(DataError):
        point_detection([[0, 0]], [[0, 0]], 0)


def test_typed_f1_follows_the_crc_convention():
    true = [[0, 0], [20, 0], [40, 0], [60, 0], [80, 0]]
    t_cls = ["epi", "epi", "fib", None, "epi"]
    pred = [[1, 0], [21, 0], [41, 0], [61, 0], [200, 0]]
    p_cls = ["epi", "fib", "fib", "epi", "epi"]
    r = point_detection(true, pred, 3, t_cls, p_cls)
    epi, fib = r.per_class["epi"], r.per_class["fib"]
    # epi: TP 1 (pair 0), FN_class 1 (pair 1), FP_class 0 (pair 3 has an untyped truth: ignored),
    #      FP_det 1 (pred at 200), FN_det 1 (truth at 80)
    assert (epi.tp, epi.fp_class, epi.fn_class, epi.fp_det, epi.fn_det) == (1, 0, 1, 1, 1)
    assert epi.f1 == pytest.approx(2 / (2 + 2 + 1 + 1))
    assert (fib.tp, fib.fp_class, fib.fn_class) == (1, 1, 0)
    assert fib.f1 == pytest.approx(2 / (2 + 2))
    assert r.type_accuracy == pytest.approx(2 / 3)
    s = summarize_points([r, r], "dataset")
    assert s["classes"]["epi"]["tp"] == 2 and s["all"]["f1"] == pytest.approx(r.f1)


def test_classification_f1_counts_per_class_and_weights_by_support():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", None, "a"]
    out = classification_f1(truth, pred)
    # a: tp 2, fp 1 (the c), fn 1 -> 4/6; b: tp 1, fp 1, fn 1 -> 2/4; c: tp 0 -> 0
    assert out["f1"] == pytest.approx({"a": 4 / 6, "b": 0.5, "c": 0.0})
    assert out["weighted_f1"] == pytest.approx((3 * 4 / 6 + 2 * 0.5) / 6)
    assert out["accuracy"] == pytest.approx(3 / 6) and out["points"] == 6


def test_semantic_confusion_and_scores_by_hand():
    from histopan.metrics import semantic_confusion, semantic_scores
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = semantic_confusion(truth, pred, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]  # the 255 pixel (unknown truth) is not counted
    s = semantic_scores(conf, ["background", "stroma", "tumour"])
    assert s["iou"]["background"] == pytest.approx(1 / 3)
    assert s["iou"]["stroma"] == pytest.approx(3 / 4)
    assert s["iou"]["tumour"] == pytest.approx(1 / 2)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["mean_iou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    # an ignore mask drops pixels; disjoint parts add up to the whole
    ign = np.zeros_like(truth, bool)
    ign[:, 2:] = True
    left = semantic_confusion(truth, pred, 3, ignore=ign)
    right = semantic_confusion(truth, pred, 3, ignore=~ign)
    assert (left + right).tolist() == conf.tolist()
    with pytest.raises(ValueError):
        semantic_confusion(truth, pred + 5, 3)
