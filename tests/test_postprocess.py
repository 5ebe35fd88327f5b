"""Watershed post-processing on hand-made probability maps (physical units, determinism, agreement)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from histopan.errors import ModelError, MppError
from histopan.model.config import ClassSpec
from histopan.postprocess import NUCLEUS_COLUMNS, PostprocessConfig, ProbabilityMaps, postprocess_tile

CLASSES = (
    ClassSpec("background", (255, 255, 255)),
    ClassSpec("stroma", (240, 160, 200)),
    ClassSpec("nucleus", (40, 40, 220), "thing"),
)
NUC = 2
CFG = PostprocessConfig(nucleus_threshold=0.5, centre_threshold=0.3, min_distance_um=2.0, boundary_weight=0.5,
                        min_area_um2=8.0, fill_holes=True)


def render(discs_um, size_um, mpp, stroma_right=True, types=None):
    """Maps for discs given as (cy_um, cx_um, r_um) on a size_um x size_um field at ``mpp``."""
    n = int(round(size_um / mpp))
    yy, xx = (np.indices((n, n)) + 0.5) * mpp  # pixel centres in microns
    mask = np.zeros((n, n), bool)
    centre = np.zeros((n, n))
    for cy, cx, r in discs_um:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        centre = np.maximum(centre, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r / 2) ** 2)))
    sem = np.zeros((3, n, n), np.float32)
    sem[0] = 0.9
    sem[1] = 0.1
    if stroma_right:
        sem[0][xx > size_um / 2], sem[1][xx > size_um / 2] = 0.1, 0.9
    sem[:2][:, mask] *= 0.1
    sem[NUC][mask] = 0.9
    return ProbabilityMaps(sem, centre.astype(np.float32), np.zeros((n, n), np.float32), types)


def check_consistency(labels):
    inst, sem = labels.instances, labels.semantic
    assert inst.dtype == np.uint32 and sem.dtype == np.uint8 and inst.shape == sem.shape
    assert np.array_equal(sem == NUC, inst > 0)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    assert list(labels.nuclei.columns) == list(NUCLEUS_COLUMNS)
    assert labels.nuclei["id"].tolist() == list(range(1, len(ids) + 1)) == ids.tolist()
    counts = np.bincount(inst.ravel())[1:]
    assert labels.nuclei["area_px"].tolist() == counts.tolist()
    # raster order of centroids
    order = np.lexsort((labels.nuclei["centroid_x"], labels.nuclei["centroid_y"]))
    assert order.tolist() == list(range(len(order)))


def test_two_touching_discs_split_along_the_boundary():
    maps = render([(16, 12, 4.5), (16, 20, 4.5)], 32, 0.5)  # discs overlap between x=15.5 and 16.5 um
    labels = postprocess_tile(maps, 0.5, CFG, CLASSES)
    check_consistency(labels)
    assert len(labels.nuclei) == 2
    assert ndi.label(labels.instances > 0)[1] == 1  # one connected blob, two instances
    xx = (np.indices(labels.instances.shape)[1] + 0.5) * 0.5
    left, right = labels.instances == 1, labels.instances == 2
    assert xx[left].max() <= 16.5 and xx[right].min() >= 15.5
    assert abs(left.sum() - right.sum()) <= 0.05 * left.sum()
    assert labels.nuclei["centroid_x"].tolist()[0] < 32 < labels.nuclei["centroid_x"].tolist()[1]


def test_boundary_map_decides_the_cut():
    maps = render([(16, 12, 4.5), (16, 20, 4.5)], 32, 0.5)
    n = maps.shape[0]
    boundary = np.zeros((n, n), np.float32)
    boundary[:, 34] = 1.0  # ridge at x = 17.25 um, off the symmetric midline
    cfg = PostprocessConfig(boundary_weight=1.0, min_area_um2=8.0)
    labels = postprocess_tile(ProbabilityMaps(maps.semantic, maps.centre, boundary), 0.5, cfg, CLASSES)
    check_consistency(labels)
    cols = np.indices(labels.instances.shape)[1]
    assert cols[labels.instances == 1].max() in (33, 34)
    assert cols[labels.instances == 2].min() in (34, 35)


def test_small_blob_is_removed_and_becomes_stuff():
    maps = render([(8, 8, 4.0), (24, 24, 1.0)], 32, 0.5)  # areas ~50 um^2 and ~3 um^2
    labels = postprocess_tile(maps, 0.5, CFG, CLASSES)
    check_consistency(labels)
    assert len(labels.nuclei) == 1
    assert abs(labels.nuclei["centroid_y"][0] * 0.5 - 7.75) < 0.5
    assert labels.semantic[48, 48] == 1  # stroma side of the field, not nucleus


@pytest.mark.parametrize("coarse, fine", [(0.5, 0.25)])
def test_same_physical_layout_at_two_resolutions(coarse, fine):
    discs = [(10, 10, 3.5), (10, 16, 3.5), (30, 30, 4.0), (25, 8, 2.8), (36, 12, 1.2)]
    a = postprocess_tile(render(discs, 48, coarse), coarse, CFG, CLASSES)
    b = postprocess_tile(render(discs, 48, fine), fine, CFG, CLASSES)
    check_consistency(a)
    check_consistency(b)
    assert len(a.nuclei) == len(b.nuclei) == 4  # the 1.2 um blob (4.5 um^2) is removed at both
    expected = np.array([np.pi * r * r for _, _, r in (discs[0], discs[1], discs[3], discs[2])])
    for labels, mpp in ((a, coarse), (b, fine)):
        cy = (labels.nuclei["centroid_y"].to_numpy() + 0.5) * mpp
        cx = (labels.nuclei["centroid_x"].to_numpy() + 0.5) * mpp
        # ids in raster order of centroids: (10,10), (10,16), (25,8), (30,30)
        np.testing.assert_allclose(cy, [10, 10, 25, 30], atol=0.6)
        np.testing.assert_allclose(cx, [10, 16, 8, 30], atol=0.6)
    np.testing.assert_allclose(a.nuclei["area_um2"].sum(), b.nuclei["area_um2"].sum(), rtol=0.06)
    np.testing.assert_allclose(b.nuclei["area_um2"].to_numpy()[[2, 3]], expected[[2, 3]], rtol=0.08)
    np.testing.assert_allclose(a.nuclei["area_um2"].to_numpy()[[2, 3]], expected[[2, 3]], rtol=0.12)


def test_no_nuclei_gives_empty_labels():
    maps = render([], 16, 0.5)
    labels = postprocess_tile(maps, 0.5, CFG, CLASSES)
    assert labels.instances.max() == 0
    assert len(labels.nuclei) == 0 and list(labels.nuclei.columns) == list(NUCLEUS_COLUMNS)
    assert set(np.unique(labels.semantic)) == {0, 1}
    assert labels.semantic[0, 0] == 0 and labels.semantic[0, -1] == 1


def test_type_head_gives_majority_type_and_probability():
    maps = render([(8, 8, 4.0), (8, 24, 4.0)], 32, 0.5)
    n = maps.shape[0]
    types = np.zeros((3, n, n), np.float32)
    types[0] = 1.0
    xx = np.indices((n, n))[1]
    left_nucleus = xx < 32
    # left nucleus: type 2 with p=0.6 on its left 3/4, type 1 (p=0.7) elsewhere; right nucleus: type 0
    types[:, left_nucleus] = np.array([0.1, 0.3, 0.6])[:, None]
    types[:, left_nucleus & (xx >= 20)] = np.array([0.1, 0.7, 0.2])[:, None]
    labels = postprocess_tile(ProbabilityMaps(maps.semantic, maps.centre, maps.boundary, types), 0.5, CFG,
                              CLASSES)
    check_consistency(labels)
    table = labels.nuclei
    assert table["type"].tolist() == [2, 0]
    inside = labels.instances == 1
    assert table["type_prob"][0] == pytest.approx(types[2][inside].mean(), rel=1e-6)
    assert 0.4 < table["type_prob"][0] < 0.6
    assert table["type_prob"][1] == pytest.approx(1.0)
    assert table["nucleus_prob"].tolist() == pytest.approx([0.9, 0.9])


def test_without_type_head_type_is_minus_one_and_prob_nan():
    labels = postprocess_tile(render([(8, 8, 4.0)], 16, 0.5), 0.5, CFG, CLASSES)
    assert labels.nuclei["type"].tolist() == [-1]
    assert np.isnan(labels.nuclei["type_prob"][0])


def test_component_without_centre_peak_still_becomes_an_instance():
    maps = render([(8, 8, 4.0)], 16, 0.5)
    flat = ProbabilityMaps(maps.semantic, np.zeros_like(maps.centre), maps.boundary)
    labels = postprocess_tile(flat, 0.5, CFG, CLASSES)
    check_consistency(labels)
    assert len(labels.nuclei) == 1


def test_holes_filled_only_when_asked():
    n = 40
    yy, xx = np.indices((n, n))
    r2 = (yy - 20) ** 2 + (xx - 20) ** 2
    ring = (r2 <= 12**2) & (r2 > 3**2)
    sem = np.zeros((3, n, n), np.float32)
    sem[0] = 1.0
    sem[0][ring], sem[NUC][ring] = 0.0, 1.0
    centre = np.zeros((n, n), np.float32)
    centre[20, 28] = 1.0
    maps = ProbabilityMaps(sem, centre, np.zeros((n, n), np.float32))
    filled = postprocess_tile(maps, 0.5, PostprocessConfig(min_distance_um=20.0, fill_holes=True), CLASSES)
    kept = postprocess_tile(maps, 0.5, PostprocessConfig(min_distance_um=20.0, fill_holes=False), CLASSES)
    check_consistency(filled)
    assert filled.instances[20, 20] == 1 and kept.instances[20, 20] == 0
    assert filled.nuclei["area_px"][0] == ring.sum() + (r2 <= 9).sum()


def test_bad_arguments_are_clear_errors():
    maps = render([(8, 8, 4.0)], 16, 0.5)
    with pytest.raises(MppError, match="mpp must be a positive"):
        postprocess_tile(maps, 0.0, CFG, CLASSES)
    with pytest.raises(ModelError, match="3 semantic channels but 2 classes"):
        postprocess_tile(maps, 0.5, CFG, CLASSES[:2])
    with pytest.raises(ValueError, match="centre map has shape"):
        ProbabilityMaps(maps.semantic, maps.centre[:5], maps.boundary)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mpp=st.sampled_from([0.25, 0.5, 1.0]),
       weight=st.floats(0.0, 1.0), fill=st.booleans())
def test_random_maps_keep_invariants(seed, mpp, weight, fill):
    rng = np.random.default_rng(seed)
    n = 48
    logits = ndi.gaussian_filter(rng.normal(size=(3, n, n)), (0, 2, 2)) * 8
    sem = np.exp(logits) / np.exp(logits).sum(0)
    centre = ndi.gaussian_filter(rng.random((n, n)), 1.5)
    centre = (centre - centre.min()) / (np.ptp(centre) + 1e-9)
    maps = ProbabilityMaps(sem.astype(np.float32), centre.astype(np.float32),
                           rng.random((n, n)).astype(np.float32))
    cfg = PostprocessConfig(boundary_weight=weight, min_area_um2=2.0, fill_holes=fill)
    labels = postprocess_tile(maps, mpp, cfg, CLASSES)
    check_consistency(labels)
    assert np.all(labels.nuclei["area_um2"] >= 2.0)
    if not fill:
        assert not np.any((labels.instances > 0) & (maps.semantic[NUC] <= 0.5))
    again = postprocess_tile(maps, mpp, cfg, CLASSES)
    assert np.array_equal(again.instances, labels.instances)


def _two_bump_maps(dip: float):
    """One elongated nucleus mask (two overlapping discs, centres 4 um apart) whose centre map has two bumps
    of height 0.9 and 0.8 with the centre map falling by ``dip`` below the lower bump between them."""
    maps = render([(16, 14, 4.0), (16, 18, 4.0)], 32, 0.5)
    n = maps.shape[0]
    yy, xx = (np.indices((n, n)) + 0.5) * 0.5
    r2 = lambda cx: (yy - 16) ** 2 + (xx - cx) ** 2  # noqa: E731
    saddle = 0.8 - dip
    centre = np.maximum(saddle * np.exp(-r2(16) / 40.0),
                        np.maximum(0.9 * np.exp(-r2(14) / 1.0), 0.8 * np.exp(-r2(18) / 1.0)))
    return ProbabilityMaps(maps.semantic, centre.astype(np.float32), maps.boundary)


def test_centre_h_keeps_one_marker_for_a_shallow_dip_and_two_for_a_deep_one():
    close = PostprocessConfig(nucleus_threshold=0.5, centre_threshold=0.3, min_distance_um=1.0, min_area_um2=4.0)
    shallow, deep = _two_bump_maps(dip=0.05), _two_bump_maps(dip=0.5)
    # plain peaks at a short minimum distance: both bumps become nuclei, whatever lies between them
    assert len(postprocess_tile(shallow, 0.5, close, CLASSES).nuclei) == 2
    assert len(postprocess_tile(deep, 0.5, close, CLASSES).nuclei) == 2
    # an h-maximum test of 0.15: the bump 0.05 above its pass is not a centre; the one 0.5 above it is
    with_h = PostprocessConfig(**{**close.__dict__, "centre_h": 0.15})
    one = postprocess_tile(shallow, 0.5, with_h, CLASSES)
    check_consistency(one)
    assert len(one.nuclei) == 1
    assert len(postprocess_tile(deep, 0.5, with_h, CLASSES).nuclei) == 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_centre_h_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="centre_h"):
        PostprocessConfig(centre_h=bad)


@pytest.mark.parametrize("seed", range(4))
def test_h_peaks_equal_skimage_h_maxima_per_component(seed):
    """The peak test keeps exactly the peaks that skimage's h_maxima finds on each mask component (its
    bounding box, 0 outside the component and around it)."""
    from skimage.morphology import h_maxima

    from histopan.kernels import h_peaks

    rng = np.random.default_rng(seed)
    centre = ndi.gaussian_filter(rng.random((120, 120)), 3)
    centre = (centre - centre.min()) / (centre.max() - centre.min())
    mask = ndi.gaussian_filter(rng.random((120, 120)), 4) > 0.5
    components, _ = ndi.label(mask)
    peak = mask & (centre == ndi.maximum_filter(np.where(mask, centre, -1.0), size=3))
    expected = peak & (centre >= 0.05)
    flat = np.flatnonzero(expected)
    crowded = np.bincount(components.ravel()[flat], minlength=components.max() + 1) >= 2
    got = np.zeros_like(peak)
    got.ravel()[flat[h_peaks(flat, centre.ravel(), components.ravel(), crowded, centre.dtype.type(0.05), 120)]] = True
    for k, box in enumerate(ndi.find_objects(components), start=1):
        inside = components[box] == k
        if (peak[box] & inside).sum() < 2:
            continue
        dome = np.pad(np.where(inside, centre[box], 0.0), 1)
        expected[box] &= ~inside | h_maxima(dome, 0.05)[1:-1, 1:-1].astype(bool)
    assert np.array_equal(got, expected)
    assert got.sum() < peak.sum()  # the test removed some peaks, so it was exercised


def test_min_nucleus_prob_drops_faint_objects_and_keeps_confident_ones():
    """Two separate discs, one drawn at p(nucleus) 0.9 and one at 0.6: a 0.7 filter removes only the faint
    one, and the table's nucleus_prob of what is left is at least the threshold."""
    maps = render([(10, 10, 4.0), (10, 26, 4.0)], 36, 0.5, stroma_right=False)
    sem = maps.semantic.copy()
    xx = (np.indices(sem.shape[1:])[1] + 0.5) * 0.5
    faint = (sem[NUC] > 0.5) & (xx > 18)
    sem[NUC][faint] = 0.6
    sem[0][faint] = 0.4
    maps = ProbabilityMaps(sem, maps.centre, maps.boundary)
    both = postprocess_tile(maps, 0.5, CFG, CLASSES)
    assert len(both.nuclei) == 2
    assert both.nuclei["nucleus_prob"].round(2).tolist() == [0.9, 0.6]
    strict = PostprocessConfig(**{**CFG.__dict__, "min_nucleus_prob": 0.7})
    kept = postprocess_tile(maps, 0.5, strict, CLASSES)
    check_consistency(kept)
    assert len(kept.nuclei) == 1
    assert kept.nuclei["centroid_x"].iloc[0] < 36  # the left (confident) disc, in pixels
    assert (kept.nuclei["nucleus_prob"] >= 0.7).all()
    assert np.array_equal(kept.instances > 0, both.instances == 1)
    # the removed pixels fall back to the stuff classes
    assert not (kept.semantic[faint] == NUC).any()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_min_nucleus_prob_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="min_nucleus_prob"):
        PostprocessConfig(min_nucleus_prob=bad)


def test_min_centre_peak_drops_objects_without_a_centre():
    """Two separate discs, one with a centre bump of height 1 and one whose centre map stays at 0.25 (a blob
    the centre map does not call a nucleus, which still gets a fallback marker): a 0.5 filter removes only
    the second; 0.25 exactly keeps both (strictly below is dropped)."""
    maps = render([(10, 10, 4.0), (10, 26, 4.0)], 36, 0.5, stroma_right=False)
    centre = maps.centre.copy()
    xx = (np.indices(centre.shape)[1] + 0.5) * 0.5
    centre[xx > 18] = np.minimum(centre[xx > 18], 0.25)
    maps = ProbabilityMaps(maps.semantic, centre, maps.boundary)
    both = postprocess_tile(maps, 0.5, CFG, CLASSES)
    assert len(both.nuclei) == 2
    edge = postprocess_tile(maps, 0.5, PostprocessConfig(**{**CFG.__dict__, "min_centre_peak": 0.25}), CLASSES)
    assert np.array_equal(edge.instances, both.instances)
    kept = postprocess_tile(maps, 0.5, PostprocessConfig(**{**CFG.__dict__, "min_centre_peak": 0.5}), CLASSES)
    check_consistency(kept)
    assert len(kept.nuclei) == 1
    assert kept.nuclei["centroid_x"].iloc[0] < 36  # the left disc, in pixels
    assert np.array_equal(kept.instances > 0, both.instances == 1)
    assert not (kept.semantic[xx > 18] == NUC).any()  # the dropped pixels fall back to the stuff classes


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_min_centre_peak_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="min_centre_peak"):
        PostprocessConfig(min_centre_peak=bad)


@pytest.mark.parametrize("case", ["random", "full", "one_hole", "border_only"])
def test_edge_distance_equals_scipy_edt(case):
    """The distance the flooding surface uses is scipy's Euclidean distance transform, exactly, also for a
    mask that covers the whole tile (no pixel outside it)."""
    from histopan.postprocess import _edge_distance

    rng = np.random.default_rng(1)
    mask = ndi.gaussian_filter(rng.random((70, 53)), 2) > 0.45
    if case == "full":
        mask[:] = True
    elif case == "one_hole":
        mask[:] = True
        mask[40, 7] = False
    elif case == "border_only":
        mask[:] = True
        mask[0, :] = False
    assert np.array_equal(_edge_distance(mask), ndi.distance_transform_edt(mask).ravel())
