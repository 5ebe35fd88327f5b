"""Segmentation and detection quality: matching, PQ / SQ / RQ, AJI, Dice, point F1 (pure numpy / scipy).

Everything here works on arrays; nothing opens files (see :mod:`histopan.evaluation` for that).

Matching from a joint histogram
-------------------------------
Every pixel carries a truth tuple ``(instance id, class id)`` and a prediction tuple.  One sparse joint histogram
of the two tuples (:class:`JointHistogram`, built with ``bincount`` / ``unique`` on combined integer keys, never a
loop over segment pairs) holds everything the metrics need: segment areas, each instance's class, pair
intersections and overlaps with void.  Histograms of disjoint regions simply add, so a whole slide is evaluated
region by region with the exact same result as in one piece.

Segments (the panoptic convention)
----------------------------------
* a *thing* segment is an instance id > 0; its class is the majority class among its pixels that carry a thing
  class (ties go to the smaller class id);
* a *stuff* segment is, per image and stuff class, all pixels of that class outside every instance (COCO: one
  segment per stuff class per image);
* pixels whose truth class is ``void_label`` are void: excluded from every truth segment and from IoU unions
  (the part of a prediction lying on void is removed from its area), and a prediction lying more than half on
  void is not a false positive (COCO panopticapi's rule).  Prediction pixels of class ``void_label`` are simply
  unlabelled (they belong to no predicted segment);
* pixels of a thing class outside every instance belong to no segment.

A truth and a predicted segment of the same class match when ``IoU > iou_threshold``.  For thresholds >= 0.5 the
match is unique by construction (for the void-corrected IoU too); below 0.5, a maximum-total-IoU assignment
(Hungarian, :func:`scipy.optimize.linear_sum_assignment`, per connected group of candidate pairs) is used among
pairs above the threshold.  Since ``tp + fp/2 + fn/2`` equals half the number of segments, maximising the summed
IoU maximises PQ.

Per class ``SQ = iou_sum / tp``, ``RQ = tp / (tp + fp/2 + fn/2)``, ``PQ = SQ * RQ``.  A class with
``tp + fp + fn == 0`` is undefined (NaN) and left out of every average (panopticapi, torchmetrics); with
``tp == 0`` but errors present, SQ, RQ and PQ are 0.

Aggregations
------------
``"dataset"`` (COCO panopticapi, CoNIC mPQ+, torchmetrics): tp, fp, fn and the IoU sum of each class are summed
over all images, then divided; "all" / "things" / "stuff" are means over the defined classes of that kind.

``"per-image"`` (HoVer-Net, PanNuke): PQ, SQ and RQ are computed per image and class.  A class is skipped in an
image where it is absent from both truth and prediction (``skip="absent"``, the default) or, as in PanNuke's
official script, wherever the truth has no segment of it (``skip="truth-absent"``; predictions of that class in
such an image are then not counted at all).  A class's score is the mean over the images that were not skipped;
"all" / "things" / "stuff" are means over images of each image's mean over its scored classes of that kind
(PanNuke's mPQ; with one nucleus class, "all" is bPQ).  For a single image both aggregations agree.

Nucleus conventions
-------------------
bPQ: PQ of the instance maps alone (:func:`binary_pq`); mPQ: per-image mean over nucleus classes; mPQ+: dataset
aggregation over nucleus classes (CoNIC).  AJI (Kumar et al. 2017) pairs each truth nucleus with its highest-IoU
prediction (a prediction may be reused); AJI+ (Graham et al. 2019) uses a one-to-one maximum-IoU assignment.
Dice is the foreground Dice of the instance maps (HoVer-Net's DICE1).

Points
------
:func:`point_detection` pairs true and predicted centres within a radius with a maximum-cardinality,
minimum-total-distance assignment and reports precision / recall / F1.  For typed points it reports, per class
``t``, the typed F1 of the CRC / CoNSeP nucleus-classification literature (Graham et al. 2019, used for
CRCHistoPhenotypes of Sirinukunwattana et al. 2016)::

    F1_t = 2 TP_t / (2 TP_t + 2 FP_t + 2 FN_t + FPd_t + FNd_t)

where, among matched pairs, ``TP_t`` have both types ``t``, ``FP_t`` predicted ``t`` but truth another type,
``FN_t`` truth ``t`` but predicted another type; ``FPd_t`` / ``FNd_t`` are unmatched predictions / truths of type
``t``.  Matched pairs whose truth point has no type are ignored for typed scores (the truth is not exhaustively
typed, as in CRCHistoPhenotypes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from histopan.classes import ClassSpec
from histopan.errors import DataError

log = logging.getLogger(__name__)

Aggregate = Literal["dataset", "per-image"]
AGGREGATES: tuple[str, ...] = ("dataset", "per-image")

#: Class id of the single nucleus class used for plain instance maps.
NUCLEUS_CLASS_ID = 1

# Above this many distinct keys a dense bincount would waste memory; np.unique is used instead.
_DENSE_LIMIT = 1 << 22

# ------------------------------------------------------------------------------------------------ classes


NUCLEUS_CLASSES: tuple[ClassSpec, ...] = (ClassSpec("nucleus", (40, 40, 220), "thing", id=NUCLEUS_CLASS_ID),)


def parse_classes(classes: Iterable[ClassSpec | Mapping[str, object]]) -> tuple[ClassSpec, ...]:
    """Class specs from :class:`~histopan.classes.ClassSpec` objects with ids or dicts ``{"id", "name", "kind",
    "color"}`` (the store layout)."""
    out: list[ClassSpec] = []
    for item in classes:
        if isinstance(item, ClassSpec):
            if item.id is None:
                raise DataError(f"class {item.name!r} has no id (its pixel value in the label maps)",
                                fix="give each ClassSpec its id, e.g. ClassSpec('tumour', (200, 40, 40), id=3)")
            out.append(item)
            continue
        if not isinstance(item, Mapping) or not {"id", "name", "kind", "color"} <= set(item):
            raise DataError(
                "a class description needs the keys id, name, kind and color",
                value=item,
                fix='describe each class as {"id": 1, "name": "tumour", "kind": "stuff", "color": [200, 40, 40]}',
            )
        try:
            out.append(ClassSpec(str(item["name"]), tuple(item["color"]), item["kind"],  # type: ignore[arg-type]
                                 id=item["id"]))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise DataError(f"invalid class description: {exc}", value=item,
                            fix='describe each class as {"id": 1, "name": "tumour", "kind": "stuff", '
                                '"color": [200, 40, 40]}') from exc
    ids = [c.id for c in out]
    names = [c.name for c in out]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise DataError("class ids and names must be unique", value=[(c.id, c.name) for c in out])
    if not out:
        raise DataError("no classes given", fix="describe at least one stuff or thing class")
    return tuple(out)


# ------------------------------------------------------------------------------------------------ PQ stats


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


@dataclass(frozen=True)
class PQStats:
    """Counts of one class (or of binary nuclei); add two to aggregate over images the "dataset" way.

    ``pq``, ``sq`` and ``rq`` are NaN when ``tp + fp + fn == 0`` (nothing to score) and 0 when ``tp == 0``
    otherwise.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: PQStats) -> PQStats:
        if not isinstance(other, PQStats):
            return NotImplemented
        return PQStats(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    @property
    def defined(self) -> bool:
        return self.tp + self.fp + self.fn > 0

    @property
    def sq(self) -> float:
        if not self.defined:
            return math.nan
        return self.iou_sum / self.tp if self.tp else 0.0

    @property
    def rq(self) -> float:
        return _ratio(self.tp, self.tp + 0.5 * self.fp + 0.5 * self.fn)

    @property
    def pq(self) -> float:
        return self.sq * self.rq

    def to_dict(self) -> dict[str, float | int | None]:
        """``{"pq", "sq", "rq", "tp", "fp", "fn"}`` with NaN written as ``None`` (JSON ``null``)."""
        return {
            "pq": _none_if_nan(self.pq),
            "sq": _none_if_nan(self.sq),
            "rq": _none_if_nan(self.rq),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True)
class AJIStats:
    """Summed intersection and union of AJI (or AJI+); add over images, ``value = intersection / union``.

    Both empty gives NaN.
    """

    intersection: int = 0
    union: int = 0

    def __add__(self, other: AJIStats) -> AJIStats:
        if not isinstance(other, AJIStats):
            return NotImplemented
        return AJIStats(self.intersection + other.intersection, self.union + other.union)

    @property
    def value(self) -> float:
        return _ratio(self.intersection, self.union)


@dataclass(frozen=True)
class DiceStats:
    """Foreground overlap counts; ``value = 2 |T & P| / (|T| + |P|)`` (NaN when both are empty)."""

    intersection: int = 0
    total: int = 0

    def __add__(self, other: DiceStats) -> DiceStats:
        if not isinstance(other, DiceStats):
            return NotImplemented
        return DiceStats(self.intersection + other.intersection, self.total + other.total)

    @property
    def value(self) -> float:
        return _ratio(2 * self.intersection, self.total)


# --------------------------------------------------------------------------------------- joint histogram


def _check_pair(truth: np.ndarray, pred: np.ndarray, what: str) -> None:
    if truth.shape != pred.shape:
        raise DataError(
            f"truth and prediction {what} differ in shape",
            value=(truth.shape, pred.shape),
            fix="compare label maps of the same image at the same resolution",
        )


def _as_labels(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise DataError(f"{what} must hold integer labels", value=str(a.dtype), fix="pass an integer label map")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise DataError(f"{what} holds negative labels", value=int(a.min()), fix="use labels >= 0")
    return a


def _compact(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``code`` (sorted) and each element's index among them."""
    top = int(code.max()) if code.size else 0
    if top < max(_DENSE_LIMIT, 2 * code.size):
        present = np.bincount(code, minlength=top + 1)
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(ids.size)
        return ids, lut[code]
    ids, inv = np.unique(code, return_inverse=True)
    return ids, inv.reshape(-1)


def _codes(inst: np.ndarray, sem: np.ndarray | None, n_sem: int) -> np.ndarray:
    code = inst.reshape(-1).astype(np.int64)
    if sem is not None:
        code *= n_sem
        code += sem.reshape(-1)
    return code


class JointHistogram:
    """Sparse joint histogram of (truth instance, truth class, predicted instance, predicted class) per pixel.

    Add regions (or whole images) with :meth:`add`; regions of one image add up exactly.  With ``sem=None``
    every pixel gets class :data:`NUCLEUS_CLASS_ID` (plain instance maps).  Memory: the region being added plus
    one row per distinct tuple (about the number of segments), never the image.
    """

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []  # (n, 5) int64: t_inst, t_sem, p_inst, p_sem, count
        self._rows = 0
        self.pixels = 0

    def add(
        self,
        truth_inst: np.ndarray,
        pred_inst: np.ndarray,
        truth_sem: np.ndarray | None = None,
        pred_sem: np.ndarray | None = None,
    ) -> None:
        """Count the pixels of one region (all arrays of one shape; class maps optional, both or neither)."""
        truth_inst = _as_labels(truth_inst, "truth instance map")
        pred_inst = _as_labels(pred_inst, "predicted instance map")
        _check_pair(truth_inst, pred_inst, "instance maps")
        if (truth_sem is None) != (pred_sem is None):
            raise DataError(
                "give class maps for both truth and prediction or for neither",
                fix="pass both class maps, or evaluate the instance maps alone",
            )
        n_sem = 1
        if truth_sem is not None and pred_sem is not None:
            truth_sem = _as_labels(truth_sem, "truth class map")
            pred_sem = _as_labels(pred_sem, "predicted class map")
            _check_pair(truth_inst, truth_sem, "instance and class maps")
            _check_pair(pred_inst, pred_sem, "instance and class maps")
            if truth_sem.size:
                n_sem = int(max(truth_sem.max(), pred_sem.max())) + 1
        if truth_inst.size == 0:
            return
        t_ids, t_idx = _compact(_codes(truth_inst, truth_sem, n_sem))
        p_ids, p_idx = _compact(_codes(pred_inst, pred_sem, n_sem))
        n_p = p_ids.size
        key = t_idx * n_p
        key += p_idx
        if t_ids.size * n_p <= max(_DENSE_LIMIT, 2 * key.size):
            counts = np.bincount(key, minlength=t_ids.size * n_p)
            keys = np.flatnonzero(counts)
            counts = counts[keys]
        else:
            keys, counts = np.unique(key, return_counts=True)
        t_code = t_ids[keys // n_p]
        p_code = p_ids[keys % n_p]
        if truth_sem is None:
            t_inst, t_sem = t_code, np.full_like(t_code, NUCLEUS_CLASS_ID)
            p_inst, p_sem = p_code, np.full_like(p_code, NUCLEUS_CLASS_ID)
        else:
            t_inst, t_sem = np.divmod(t_code, n_sem)
            p_inst, p_sem = np.divmod(p_code, n_sem)
        self._parts.append(np.stack([t_inst, t_sem, p_inst, p_sem, counts.astype(np.int64)], axis=1))
        self._rows += keys.size
        self.pixels += truth_inst.size
        if len(self._parts) > 1 and self._rows > 4 * 1_000_000:
            self._reduce()

    def _reduce(self) -> np.ndarray:
        if not self._parts:
            return np.zeros((0, 5), dtype=np.int64)
        rows = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        if len(self._parts) > 1:
            uniq, inv = np.unique(rows[:, :4], axis=0, return_inverse=True)
            counts = np.bincount(inv.reshape(-1), weights=rows[:, 4], minlength=len(uniq)).astype(np.int64)
            rows = np.concatenate([uniq, counts[:, None]], axis=1)
        self._parts = [rows]
        self._rows = len(rows)
        return rows

    def rows(self) -> np.ndarray:
        """The histogram as an ``(n, 5)`` int64 array: truth inst, truth class, pred inst, pred class, pixels."""
        return self._reduce()

    def __iadd__(self, other: JointHistogram) -> JointHistogram:
        self._parts.extend(other._parts)
        self._rows += other._rows
        self.pixels += other.pixels
        return self


# ------------------------------------------------------------------------------------------------ segments


@dataclass(frozen=True)
class _Side:
    seg: np.ndarray  # per histogram row: segment index or -1
    void: np.ndarray  # per histogram row: pixel is void (truth side only)
    cls: np.ndarray  # per segment: class id
    is_thing: np.ndarray  # per segment
    area: np.ndarray  # per segment: pixel count (void excluded)


def _segments(
    inst: np.ndarray,
    sem: np.ndarray,
    count: np.ndarray,
    classes: tuple[ClassSpec, ...],
    void_label: int | None,
    side: str,
) -> _Side:
    known = np.array(sorted(c.id for c in classes), dtype=np.int64)
    thing_ids = np.array(sorted(c.id for c in classes if c.kind == "thing"), dtype=np.int64)
    stuff_ids = np.array(sorted(c.id for c in classes if c.kind == "stuff"), dtype=np.int64)
    void = (sem == void_label) if void_label is not None else np.zeros(sem.shape, dtype=bool)
    unknown = ~void & ~np.isin(sem, known)
    if unknown.any():
        raise DataError(
            f"the {side} class map holds class ids that are not among the classes",
            value=sorted(set(np.unique(sem[unknown]).tolist())),
            fix=f"describe every class id in the class list (known: {known.tolist()}) or pass it as void_label",
        )
    is_thing_px = np.isin(sem, thing_ids)
    in_inst = (inst > 0) & ~void
    # things: group rows by instance id; class = majority thing class among its pixels
    inst_ids, inst_idx = np.unique(inst[in_inst], return_inverse=True)
    n_inst = inst_ids.size
    seg = np.full(inst.shape, -1, dtype=np.int64)
    seg[in_inst] = inst_idx
    cls_inst = np.zeros(n_inst, dtype=np.int64)
    if n_inst:
        sel = in_inst & is_thing_px
        thing_pos = np.searchsorted(thing_ids, sem[sel])
        votes = np.zeros((n_inst, thing_ids.size), dtype=np.int64)
        np.add.at(votes, (seg[sel], thing_pos), count[sel])
        has_thing = votes.sum(axis=1) > 0
        if not has_thing.all():
            bad = inst_ids[~has_thing]
            raise DataError(
                f"{side} instances cover no pixel of a thing class, so their class is unknown",
                value=bad[:10].tolist(),
                fix="fuse the maps (things over stuff) so nucleus pixels carry a thing class",
            )
        cls_inst = thing_ids[np.argmax(votes, axis=1)]
    # stuff: one segment per stuff class, pixels outside instances
    stuff_rows = ~in_inst & ~void & np.isin(sem, stuff_ids)
    stuff_present = np.unique(sem[stuff_rows])
    seg[stuff_rows] = n_inst + np.searchsorted(stuff_present, sem[stuff_rows])
    cls = np.concatenate([cls_inst, stuff_present]).astype(np.int64)
    is_thing = np.concatenate([np.ones(n_inst, bool), np.zeros(stuff_present.size, bool)])
    ok = seg >= 0
    area = np.bincount(seg[ok], weights=count[ok], minlength=cls.size).astype(np.int64)
    return _Side(seg=seg, void=void, cls=cls, is_thing=is_thing, area=area)


@dataclass(frozen=True)
class _Pairs:
    t: np.ndarray  # truth segment index
    p: np.ndarray  # predicted segment index
    inter: np.ndarray  # intersection (pixels)
    iou: np.ndarray


def _pairs(truth: _Side, pred: _Side, count: np.ndarray, same_class: bool) -> tuple[_Pairs, np.ndarray]:
    """Overlapping segment pairs with their void-corrected IoU, and each prediction's area on truth void."""
    n_p = pred.cls.size
    on_void = truth.void & (pred.seg >= 0)
    pred_void = np.bincount(pred.seg[on_void], weights=count[on_void], minlength=n_p).astype(np.int64)
    both = (truth.seg >= 0) & (pred.seg >= 0)
    key = truth.seg[both] * n_p + pred.seg[both]
    keys, inv = np.unique(key, return_inverse=True)
    inter = np.bincount(inv.reshape(-1), weights=count[both], minlength=keys.size).astype(np.int64)
    t, p = np.divmod(keys, n_p) if n_p else (keys, keys)
    if same_class:
        keep = truth.cls[t] == pred.cls[p]
        t, p, inter = t[keep], p[keep], inter[keep]
    union = truth.area[t] + pred.area[p] - pred_void[p] - inter
    iou = inter / np.maximum(union, 1)
    return _Pairs(t=t, p=p, inter=inter, iou=iou), pred_void


def _groups(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected-component label of each candidate pair (bipartite graph of truth and predicted segments)."""
    tu, ti = np.unique(t, return_inverse=True)
    pu, pi = np.unique(p, return_inverse=True)
    n = tu.size + pu.size
    graph = sparse.coo_matrix((np.ones(t.size), (ti.reshape(-1), tu.size + pi.reshape(-1))), shape=(n, n))
    n_comp, labels = connected_components(graph, directed=False)
    return labels[ti.reshape(-1)], n_comp


def _assign(t: np.ndarray, p: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """One-to-one assignment maximising summed ``weight`` over candidate pairs; boolean mask of chosen pairs.

    Pairs are split into connected groups; a group of one pair is taken as is, larger groups are solved
    with :func:`scipy.optimize.linear_sum_assignment`.
    """
    chosen = np.zeros(t.size, dtype=bool)
    if t.size == 0:
        return chosen
    comp, n_comp = _groups(t, p)
    size = np.bincount(comp, minlength=n_comp)
    single = size[comp] == 1
    chosen[single] = True
    multi = np.flatnonzero(~single)
    if multi.size:
        order = multi[np.argsort(comp[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        for grp in np.split(order, bounds):
            tu, ti = np.unique(t[grp], return_inverse=True)
            pu, pi = np.unique(p[grp], return_inverse=True)
            mat = np.zeros((tu.size, pu.size))
            mat[ti, pi] = weight[grp]
            rows, cols = linear_sum_assignment(mat, maximize=True)
            picked = np.zeros((tu.size, pu.size), dtype=bool)
            picked[rows, cols] = True
            chosen[grp] = picked[ti, pi]
    return chosen


def _match(pairs: _Pairs, iou_threshold: float) -> np.ndarray:
    cand = pairs.iou > iou_threshold
    if iou_threshold >= 0.5:
        return cand
    chosen = np.zeros(cand.shape, dtype=bool)
    idx = np.flatnonzero(cand)
    chosen[idx] = _assign(pairs.t[idx], pairs.p[idx], pairs.iou[idx])
    return chosen


# ------------------------------------------------------------------------------------------ image results


@dataclass(frozen=True)
class ImageResult:
    """Everything measured on one image (or slide): per-class PQ counts, AJI, AJI+ and Dice of the things.

    ``truth_present`` lists class ids with at least one truth segment (for PanNuke's skip rule).
    """

    classes: tuple[ClassSpec, ...]
    per_class: Mapping[int, PQStats]
    truth_present: frozenset[int] = frozenset()
    aji: AJIStats = field(default_factory=AJIStats)
    aji_plus: AJIStats = field(default_factory=AJIStats)
    dice: DiceStats = field(default_factory=DiceStats)
    name: str = ""

    def summary(self) -> dict[str, object]:
        """Per-class and averaged PQ of this image alone."""
        return summarize([self], "dataset")


def _validate_threshold(iou_threshold: float) -> None:
    if not 0.0 <= iou_threshold < 1.0:
        raise DataError(
            "the IoU threshold must lie in [0, 1)", value=iou_threshold, fix="use 0.5 (the PQ definition)"
        )


def evaluate_histogram(
    hist: JointHistogram,
    classes: Iterable[ClassSpec | Mapping[str, object]] = NUCLEUS_CLASSES,
    void_label: int | None = None,
    iou_threshold: float = 0.5,
    name: str = "",
) -> ImageResult:
    """PQ counts per class, AJI, AJI+ and Dice from the joint histogram of one image (or slide)."""
    _validate_threshold(iou_threshold)
    specs = parse_classes(classes)
    if void_label is not None and any(c.id == void_label for c in specs):
        raise DataError("void_label is also a class id", value=void_label, fix="pick a void label no class uses")
    rows = hist.rows()
    t_inst, t_sem, p_inst, p_sem, count = (rows[:, i] for i in range(5))
    truth = _segments(t_inst, t_sem, count, specs, void_label, "truth")
    pred = _segments(p_inst, p_sem, count, specs, void_label, "prediction")
    pairs, pred_void = _pairs(truth, pred, count, same_class=True)
    matched = _match(pairs, iou_threshold)

    t_matched = np.zeros(truth.cls.size, dtype=bool)
    p_matched = np.zeros(pred.cls.size, dtype=bool)
    t_matched[pairs.t[matched]] = True
    p_matched[pairs.p[matched]] = True
    fp_mask = ~p_matched & (pred_void * 2 <= pred.area)  # more than half on void: not a false positive
    fn_mask = ~t_matched
    per_class: dict[int, PQStats] = {}
    for spec in specs:
        m = pairs.t[matched]
        sel = truth.cls[m] == spec.id
        per_class[spec.id] = PQStats(
            tp=int(sel.sum()),
            fp=int((fp_mask & (pred.cls == spec.id)).sum()),
            fn=int((fn_mask & (truth.cls == spec.id)).sum()),
            iou_sum=float(pairs.iou[matched][sel].sum()),
        )
    aji, aji_plus, dice = _instance_scores(truth, pred, count)
    return ImageResult(
        classes=specs,
        per_class=per_class,
        truth_present=frozenset(int(c) for c in np.unique(truth.cls)),
        aji=aji,
        aji_plus=aji_plus,
        dice=dice,
        name=name,
    )


def _instance_scores(truth: _Side, pred: _Side, count: np.ndarray) -> tuple[AJIStats, AJIStats, DiceStats]:
    """AJI, AJI+ and foreground Dice over thing segments, class-agnostic, void pixels excluded."""
    t_ok = (truth.seg >= 0) & np.append(truth.is_thing, False)[truth.seg]
    p_ok = (pred.seg >= 0) & np.append(pred.is_thing, False)[pred.seg] & ~truth.void
    t_area = np.bincount(truth.seg[t_ok], weights=count[t_ok], minlength=truth.cls.size).astype(np.int64)
    p_area = np.bincount(pred.seg[p_ok], weights=count[p_ok], minlength=pred.cls.size).astype(np.int64)
    t_area[~truth.is_thing] = 0
    p_area[~pred.is_thing] = 0
    both = t_ok & p_ok
    dice = DiceStats(int(count[both].sum()), int(t_area.sum() + p_area.sum()))
    n_p = pred.cls.size
    keys, inv = np.unique(truth.seg[both] * n_p + pred.seg[both], return_inverse=True)
    inter = np.bincount(inv.reshape(-1), weights=count[both], minlength=keys.size).astype(np.int64)
    t, p = np.divmod(keys, n_p) if n_p else (keys, keys)
    union = t_area[t] + p_area[p] - inter
    iou = inter / np.maximum(union, 1)
    t_things = np.flatnonzero(truth.is_thing)
    p_things = np.flatnonzero(pred.is_thing)

    # AJI: each truth nucleus takes its best prediction (highest IoU, then lowest id); predictions may repeat
    order = np.lexsort((p, -iou, t))
    first = np.ones(order.size, dtype=bool)
    first[1:] = t[order][1:] != t[order][:-1]
    best = order[first]
    used = np.zeros(n_p, dtype=bool)
    used[p[best]] = True
    paired_t = np.zeros(truth.cls.size, dtype=bool)
    paired_t[t[best]] = True
    aji_i = int(inter[best].sum())
    aji_u = int(union[best].sum() + t_area[t_things[~paired_t[t_things]]].sum() + p_area[p_things[~used[p_things]]].sum())

    # AJI+: one-to-one assignment maximising the summed IoU
    chosen = _assign(t, p, iou)
    tp_ = np.zeros(truth.cls.size, dtype=bool)
    pp_ = np.zeros(n_p, dtype=bool)
    tp_[t[chosen]] = True
    pp_[p[chosen]] = True
    plus_i = int(inter[chosen].sum())
    plus_u = int(
        union[chosen].sum() + t_area[t_things[~tp_[t_things]]].sum() + p_area[p_things[~pp_[p_things]]].sum()
    )
    return AJIStats(aji_i, aji_u), AJIStats(plus_i, plus_u), dice


# ------------------------------------------------------------------------------------------- public API


def panoptic_quality(
    truth_sem: np.ndarray,
    truth_inst: np.ndarray,
    pred_sem: np.ndarray,
    pred_inst: np.ndarray,
    classes: Iterable[ClassSpec | Mapping[str, object]],
    void_label: int | None = None,
    iou_threshold: float = 0.5,
    name: str = "",
) -> ImageResult:
    """Panoptic quality of one image from class maps and instance maps (see the module docstring).

    ``classes`` describes every class id that occurs (ids, names, ``"stuff"`` / ``"thing"``); ``void_label``
    is a class id (not in ``classes``) marking unannotated truth pixels.  Use :func:`summarize` for averages
    over classes and images, or ``result.summary()`` for this image alone.
    """
    hist = JointHistogram()
    hist.add(truth_inst, pred_inst, truth_sem, pred_sem)
    return evaluate_histogram(hist, classes, void_label, iou_threshold, name)


def binary_pq(truth_inst: np.ndarray, pred_inst: np.ndarray, iou_threshold: float = 0.5) -> PQStats:
    """PQ counts of two instance maps, all nuclei one class (bPQ); 0 is background."""
    hist = JointHistogram()
    hist.add(truth_inst, pred_inst)
    return evaluate_histogram(hist, NUCLEUS_CLASSES, None, iou_threshold).per_class[NUCLEUS_CLASS_ID]


def instance_scores(truth_inst: np.ndarray, pred_inst: np.ndarray) -> ImageResult:
    """All binary nucleus scores of two instance maps at once (PQ counts, AJI, AJI+, Dice)."""
    hist = JointHistogram()
    hist.add(truth_inst, pred_inst)
    return evaluate_histogram(hist, NUCLEUS_CLASSES)


def aji(truth_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017); NaN when both maps are empty."""
    return instance_scores(truth_inst, pred_inst).aji.value


def aji_plus(truth_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """AJI+ (Graham et al. 2019): AJI with a one-to-one maximum-IoU pairing; NaN when both maps are empty."""
    return instance_scores(truth_inst, pred_inst).aji_plus.value


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the foregrounds (label > 0) of two maps; NaN when both are empty."""
    _check_pair(np.asarray(truth), np.asarray(pred), "maps")
    t = np.asarray(truth) > 0
    p = np.asarray(pred) > 0
    return _ratio(2 * int(np.count_nonzero(t & p)), int(np.count_nonzero(t)) + int(np.count_nonzero(p)))


# ------------------------------------------------------------------------------------------- aggregation


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _kind_ids(classes: tuple[ClassSpec, ...], kind: str | None) -> list[int]:
    return [c.id for c in classes if kind is None or c.kind == kind]


def summarize(
    results: Sequence[ImageResult],
    aggregate: Aggregate = "dataset",
    skip: Literal["absent", "truth-absent"] = "absent",
) -> dict[str, object]:
    """Average image results: ``{"aggregate", "all", "things", "stuff", "classes", "aji", "aji_plus", "dice",
    "images"}`` (JSON-ready, NaN as ``None``).

    ``"all"`` / ``"things"`` / ``"stuff"`` / each class hold ``pq, sq, rq, tp, fp, fn`` (tp / fp / fn are sums
    over images in both aggregations).  ``skip`` is the per-image rule for absent classes (module docstring).
    """
    if aggregate not in AGGREGATES:
        raise DataError("unknown aggregation", value=aggregate, fix=f"use one of {list(AGGREGATES)}")
    if skip not in ("absent", "truth-absent"):
        raise DataError("unknown skip rule", value=skip, fix='use "absent" or "truth-absent"')
    if not results:
        raise DataError("nothing to evaluate: no images", fix="give at least one pair of label maps")
    classes = results[0].classes
    for r in results[1:]:
        if r.classes != classes:
            raise DataError("images were evaluated with different class lists", value=r.name)
    totals = {c.id: sum((r.per_class[c.id] for r in results), PQStats()) for c in classes}

    def counts(ids: list[int]) -> dict[str, int]:
        return {k: int(sum(getattr(totals[i], k) for i in ids)) for k in ("tp", "fp", "fn")}

    def scored(r: ImageResult, cid: int) -> bool:
        s = r.per_class[cid]
        return s.defined and (skip == "absent" or cid in r.truth_present)

    out: dict[str, object] = {"aggregate": aggregate}
    if aggregate == "dataset":
        class_scores = {c.id: {m: getattr(totals[c.id], m) for m in ("pq", "sq", "rq")} for c in classes}

        def group(ids: list[int]) -> dict[str, float]:
            return {m: _mean(class_scores[i][m] for i in ids) for m in ("pq", "sq", "rq")}

        aji_v = sum((r.aji for r in results), AJIStats()).value
        plus_v = sum((r.aji_plus for r in results), AJIStats()).value
        dice_v = sum((r.dice for r in results), DiceStats()).value
    else:
        class_scores = {
            c.id: {
                m: _mean(getattr(r.per_class[c.id], m) for r in results if scored(r, c.id)) for m in ("pq", "sq", "rq")
            }
            for c in classes
        }

        def group(ids: list[int]) -> dict[str, float]:
            return {
                m: _mean(_mean(getattr(r.per_class[i], m) for i in ids if scored(r, i)) for r in results)
                for m in ("pq", "sq", "rq")
            }

        aji_v = _mean(r.aji.value for r in results)
        plus_v = _mean(r.aji_plus.value for r in results)
        dice_v = _mean(r.dice.value for r in results)

    def block(ids: list[int], scores: Mapping[str, float]) -> dict[str, object]:
        return {**{m: _none_if_nan(scores[m]) for m in ("pq", "sq", "rq")}, **counts(ids)}

    for key, kind in (("all", None), ("things", "thing"), ("stuff", "stuff")):
        ids = _kind_ids(classes, kind)
        out[key] = block(ids, group(ids))
    out["classes"] = {c.name: {**block([c.id], class_scores[c.id]), "kind": c.kind} for c in classes}
    out["aji"] = _none_if_nan(aji_v)
    out["aji_plus"] = _none_if_nan(plus_v)
    out["dice"] = _none_if_nan(dice_v)
    out["images"] = [_image_entry(r) for r in results]
    return out


def _image_entry(r: ImageResult) -> dict[str, object]:
    entry: dict[str, object] = {"name": r.name}
    for key, kind in (("all", None), ("things", "thing"), ("stuff", "stuff")):
        ids = _kind_ids(r.classes, kind)
        tot = sum((r.per_class[i] for i in ids), PQStats())
        entry[key] = {
            **{m: _none_if_nan(_mean(getattr(r.per_class[i], m) for i in ids)) for m in ("pq", "sq", "rq")},
            "tp": tot.tp,
            "fp": tot.fp,
            "fn": tot.fn,
        }
    entry["classes"] = {c.name: r.per_class[c.id].to_dict() for c in r.classes}
    entry["aji"] = _none_if_nan(r.aji.value)
    entry["aji_plus"] = _none_if_nan(r.aji_plus.value)
    entry["dice"] = _none_if_nan(r.dice.value)
    return entry


# ------------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class TypedCounts:
    """Typed-F1 counts of one class (see the module docstring); add over images."""

    tp: int = 0
    fp_class: int = 0
    fn_class: int = 0
    fp_det: int = 0
    fn_det: int = 0

    def __add__(self, other: TypedCounts) -> TypedCounts:
        if not isinstance(other, TypedCounts):
            return NotImplemented
        return TypedCounts(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple[int, ...]:
        return (self.tp, self.fp_class, self.fn_class, self.fp_det, self.fn_det)

    @property
    def f1(self) -> float:
        den = 2 * self.tp + 2 * self.fp_class + 2 * self.fn_class + self.fp_det + self.fn_det
        return _ratio(2 * self.tp, den)

    def to_dict(self) -> dict[str, object]:
        return {
            "f1": _none_if_nan(self.f1),
            "tp": self.tp,
            "fp_class": self.fp_class,
            "fn_class": self.fn_class,
            "fp_det": self.fp_det,
            "fn_det": self.fn_det,
        }


@dataclass(frozen=True)
class PointResult:
    """Point detection counts of one image (add over images for dataset aggregation).

    ``per_class`` maps class names to :class:`TypedCounts`; ``type_correct`` / ``type_total`` count matched pairs
    with a typed truth and their agreeing types (type accuracy).
    """

    tp: int
    fp: int
    fn: int
    per_class: Mapping[str, TypedCounts] = field(default_factory=dict)
    type_correct: int = 0
    type_total: int = 0
    name: str = ""
    pairs: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def type_accuracy(self) -> float:
        return _ratio(self.type_correct, self.type_total)

    def __add__(self, other: PointResult) -> PointResult:
        if not isinstance(other, PointResult):
            return NotImplemented
        names = list(dict.fromkeys([*self.per_class, *other.per_class]))
        return PointResult(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            {n: self.per_class.get(n, TypedCounts()) + other.per_class.get(n, TypedCounts()) for n in names},
            self.type_correct + other.type_correct,
            self.type_total + other.type_total,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "precision": _none_if_nan(self.precision),
            "recall": _none_if_nan(self.recall),
            "f1": _none_if_nan(self.f1),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


def _points(xy: np.ndarray | Sequence[Sequence[float]], what: str) -> np.ndarray:
    a = np.asarray(xy, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2))
    if a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all():
        raise DataError(f"{what} must be an (n, 2) array of finite x, y", value=a.shape)
    return a


def match_points(true_xy: np.ndarray, pred_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """Pairs ``(i_true, j_pred)`` within ``radius_px``: most pairs, then least total distance (Hungarian)."""
    t = _points(true_xy, "true points")
    p = _points(pred_xy, "predicted points")
    if not radius_px > 0:
        raise DataError("the matching radius must be positive", value=radius_px, fix="e.g. --radius-um 3")
    if len(t) == 0 or len(p) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # explicit entries for every pair within the radius, coincident points (distance 0) included
    near = cKDTree(t).sparse_distance_matrix(cKDTree(p), radius_px, output_type="ndarray")
    ti, pj, d = near["i"].astype(np.int64), near["j"].astype(np.int64), near["v"]
    # weight: one unit per pair (cardinality first) minus a distance term smaller than any unit
    weight = 1.0 + (radius_px - d) / (radius_px * (min(len(t), len(p)) + 1))
    chosen = _assign(ti, pj, weight)
    pairs = np.stack([ti[chosen], pj[chosen]], axis=1)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def point_detection(
    true_xy: np.ndarray | Sequence[Sequence[float]],
    pred_xy: np.ndarray | Sequence[Sequence[float]],
    radius_px: float,
    true_classes: Sequence[str | None] | None = None,
    pred_classes: Sequence[str | None] | None = None,
    name: str = "",
) -> PointResult:
    """Detection P / R / F1 of point sets matched within ``radius_px`` and, with types, per-class typed F1.

    ``true_classes`` / ``pred_classes`` give a class name per point (``None`` = untyped).  Per-class counts
    cover every class name seen in either set.  Convert a radius in microns with ``radius_um / mpp``.
    """
    t = _points(true_xy, "true points")
    p = _points(pred_xy, "predicted points")
    pairs = match_points(t, p, radius_px)
    tp = len(pairs)
    res_fp, res_fn = len(p) - tp, len(t) - tp
    per_class: dict[str, TypedCounts] = {}
    correct = total = 0
    if true_classes is not None and pred_classes is not None:
        if len(true_classes) != len(t) or len(pred_classes) != len(p):
            raise DataError(
                "one class per point is needed",
                value=(len(true_classes), len(t), len(pred_classes), len(p)),
            )
        tc = np.array(["" if c is None else str(c) for c in true_classes], dtype=object)
        pc = np.array(["" if c is None else str(c) for c in pred_classes], dtype=object)
        t_un = np.ones(len(t), dtype=bool)
        p_un = np.ones(len(p), dtype=bool)
        t_un[pairs[:, 0]] = False
        p_un[pairs[:, 1]] = False
        pt, pp = tc[pairs[:, 0]], pc[pairs[:, 1]]
        typed = pt != ""
        correct, total = int((pt[typed] == pp[typed]).sum()), int(typed.sum())
        names = sorted({*tc.tolist(), *pc.tolist()} - {""})
        for n in names:
            per_class[n] = TypedCounts(
                tp=int(((pt == n) & (pp == n)).sum()),
                fp_class=int((typed & (pt != n) & (pp == n)).sum()),
                fn_class=int(((pt == n) & (pp != n)).sum()),
                fp_det=int((p_un & (pc == n)).sum()),
                fn_det=int((t_un & (tc == n)).sum()),
            )
    return PointResult(tp, res_fp, res_fn, per_class, correct, total, name, pairs)


def summarize_points(results: Sequence[PointResult], aggregate: Aggregate = "dataset") -> dict[str, object]:
    """``{"aggregate", "all": {precision, recall, f1, tp, fp, fn}, "classes": {name: typed F1 counts},
    "type_accuracy", "images"}``; per-image averages images where the truth or prediction has points."""
    if aggregate not in AGGREGATES:
        raise DataError("unknown aggregation", value=aggregate, fix=f"use one of {list(AGGREGATES)}")
    if not results:
        raise DataError("nothing to evaluate: no images", fix="give at least one pair of point files")
    total = sum(results[1:], results[0])
    all_block = total.to_dict()
    classes = {n: c.to_dict() for n, c in total.per_class.items()}
    type_acc = total.type_accuracy
    if aggregate == "per-image":
        for m in ("precision", "recall", "f1"):
            all_block[m] = _none_if_nan(_mean(getattr(r, m) for r in results))
        for n in classes:
            classes[n]["f1"] = _none_if_nan(
                _mean(r.per_class[n].f1 for r in results if n in r.per_class)
            )
        type_acc = _mean(r.type_accuracy for r in results)
    return {
        "aggregate": aggregate,
        "all": all_block,
        "classes": classes,
        "type_accuracy": _none_if_nan(type_acc),
        "images": [
            {
                "name": r.name,
                **r.to_dict(),
                "classes": {n: c.to_dict() for n, c in r.per_class.items()},
            }
            for r in results
        ],
    }


def classification_f1(truth: Sequence[str], pred: Sequence[str | None]) -> dict[str, object]:
    """Accuracy, per-class F1 and support-weighted F1 of predicted against true class names (one per item;
    a prediction of None counts as wrong): ``{"points", "accuracy", "f1": {name: F1}, "weighted_f1"}``."""
    t, p = np.array(truth, object), np.array(pred, object)
    per_class, support = {}, []
    for n in sorted(set(truth)):
        tp = int(((t == n) & (p == n)).sum())
        fp = int(((t != n) & (p == n)).sum())
        fn = int(((t == n) & (p != n)).sum())
        per_class[n] = 2 * tp / max(1, 2 * tp + fp + fn)
        support.append(int((t == n).sum()))
    return {"points": len(t), "accuracy": float((t == p).mean()), "f1": per_class,
            "weighted_f1": float(np.average(list(per_class.values()), weights=support))}


# ------------------------------------------------------------------------------------------------ semantic maps
def semantic_confusion(truth: np.ndarray, pred: np.ndarray, n_classes: int,
                       ignore: np.ndarray | None = None) -> np.ndarray:
    """(n_classes, n_classes) int64 pixel counts, rows = truth class, columns = predicted class.

    Pixels whose truth is outside ``0 .. n_classes - 1`` (e.g. 255 for "unknown"), or where ``ignore`` is
    True, are not counted.  Confusion matrices of disjoint regions or images simply add.
    """
    _check_pair(truth, pred, "semantic maps")
    t = np.asarray(truth).astype(np.int64, copy=False).ravel()
    p = np.asarray(pred).astype(np.int64, copy=False).ravel()
    keep = (t >= 0) & (t < n_classes)
    if ignore is not None:
        keep &= ~np.asarray(ignore, dtype=bool).ravel()
    t, p = t[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= n_classes):
        raise ValueError(f"predicted class ids must be within 0..{n_classes - 1}, got {int(p.min())}..{int(p.max())}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def semantic_scores(confusion: np.ndarray, names: Sequence[str]) -> dict[str, object]:
    """Per-class IoU, precision and recall, mean IoU (over classes present in truth or prediction) and pixel
    accuracy from a confusion matrix (:func:`semantic_confusion`); undefined values are ``None``."""
    c = np.asarray(confusion, dtype=np.float64)
    if c.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix {c.shape} does not match {len(names)} class names")
    tp = np.diag(c)
    truth, pred = c.sum(1), c.sum(0)
    union = truth + pred - tp
    per_class: dict[str, dict[str, object]] = {}
    ious = []
    for i, name in enumerate(names):
        iou = _ratio(tp[i], union[i])
        if union[i] > 0:
            ious.append(iou)
        per_class[name] = {"iou": _none_if_nan(iou), "precision": _none_if_nan(_ratio(tp[i], pred[i])),
                           "recall": _none_if_nan(_ratio(tp[i], truth[i])), "truth_pixels": int(truth[i]),
                           "pred_pixels": int(pred[i])}
    total = c.sum()
    return {"classes": list(names), "iou": {n: per_class[n]["iou"] for n in names}, "per_class": per_class,
            "mean_iou": _none_if_nan(_mean(ious)), "pixel_accuracy": _none_if_nan(_ratio(tp.sum(), total)),
            "pixels": int(total), "confusion": c.astype(np.int64).tolist()}
