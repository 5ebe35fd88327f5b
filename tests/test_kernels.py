"""The compiled post-processing loops against plain definitions and against scikit-image / scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from histopan import kernels

EIGHT = np.ones((3, 3), bool)


def _smooth(rng, shape, sigma):
    a = ndi.gaussian_filter(rng.random(shape), sigma)
    return (a - a.min()) / (np.ptp(a) + 1e-12)


def _h_peaks_by_definition(peaks, centre, components, h):
    """A peak of value v is dropped when, within its component, a higher pixel is 8-connected to it through
    pixels above v - h (labelling the component once per peak: the slow, obvious way)."""
    keep = np.ones(peaks.size, bool)
    flat_c = components.ravel()
    for j, p in enumerate(peaks):
        k = flat_c[p]
        if np.count_nonzero(flat_c[peaks] == k) < 2:
            continue
        v = centre.ravel()[p]
        above, _ = ndi.label((components == k) & (centre > v - centre.dtype.type(h)), structure=EIGHT)
        reach = above == above.ravel()[p]
        keep[j] = not (centre[reach].max() > v)
    return keep


#: (per_query, total) budgets of h_peaks' local search: the default; the sweep answering every peak; the two
#: methods sharing the peaks (small per-peak budget, or a total that runs out part-way)
BUDGETS = [(kernels.LOCAL_PIXELS, -1), (kernels.LOCAL_PIXELS, 0), (12, -1), (kernels.LOCAL_PIXELS, 150)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("h", [0.02, 0.1, 0.3])
def test_h_peaks_equal_the_per_peak_definition(seed, h, budget):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
    centre = _smooth(rng, shape, float(rng.uniform(1, 3))).astype(np.float32 if seed % 2 else np.float64)
    if seed % 3 == 0:
        centre = np.round(centre * 10) / 10  # plateaus and equal values
    components, n = ndi.label(_smooth(rng, shape, 3) > 0.4)
    peak = (components > 0) & (centre == ndi.maximum_filter(np.where(components > 0, centre, -1), size=3))
    peaks = np.flatnonzero(peak)
    crowded = np.bincount(components.ravel()[peaks], minlength=n + 1) >= 2
    got = kernels.h_peaks(peaks, centre.ravel(), components.ravel().astype(np.int32), crowded,
                          centre.dtype.type(h), shape[1], *budget)
    assert np.array_equal(got, _h_peaks_by_definition(peaks, centre, components, h))


@pytest.mark.parametrize("budget", BUDGETS)
def test_h_peaks_on_one_component_with_many_peaks(budget):
    """Hundreds of peaks in one component (the old per-peak labelling's worst case): same answer as the
    definition, and some peaks are kept and some dropped."""
    rng = np.random.default_rng(7)
    base = 0.4 + 0.5 * _smooth(rng, (96, 96), 12)
    bumps = np.zeros((96, 96))
    bumps[rng.integers(0, 96, 300), rng.integers(0, 96, 300)] = 1
    centre = (base + 0.08 * ndi.gaussian_filter(bumps, 1.0) / ndi.gaussian_filter(bumps, 1.0).max())
    components = np.ones((96, 96), np.int32)
    peaks = np.flatnonzero(centre == ndi.maximum_filter(centre, size=3))
    assert peaks.size > 100
    got = kernels.h_peaks(peaks, centre.ravel(), components.ravel(), np.array([False, True]), 0.05, 96, *budget)
    assert np.array_equal(got, _h_peaks_by_definition(peaks, centre, components, 0.05))
    assert 0 < got.sum() < peaks.size


@pytest.mark.parametrize("seed", range(8))
def test_flood_equals_skimage_watershed(seed):
    """Same labels as scikit-image's watershed (4-connected, mask = the components) on a continuous surface,
    where no two markers of a component are queued at the same level."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(10, 80)), int(rng.integers(10, 80)))
    components, n = ndi.label(_smooth(rng, shape, 2) > 0.45)
    boundary = rng.random(shape)
    if seed % 2:
        boundary = np.round(boundary * 4) / 4  # ties between raised levels, broken by queue order
    distance = ndi.distance_transform_edt(components > 0)
    depth = np.concatenate([[1.0], ndi.maximum(distance, components, np.arange(1, n + 1))])
    weight = float(rng.uniform(0.2, 0.8))
    surface = weight * boundary + (1 - weight) * (1 - distance / depth[components])
    markers = np.zeros(shape, np.int32)
    inside = np.flatnonzero(components)
    chosen = rng.choice(inside, size=min(inside.size, int(rng.integers(2, 15))), replace=False)
    markers.ravel()[chosen] = np.arange(1, chosen.size + 1)
    expected = watershed(surface, markers, mask=components > 0)
    got = np.where(components > 0, markers, -1).ravel()
    kernels.flood(got, surface.ravel(), shape[1])
    assert np.array_equal(np.maximum(got, 0).reshape(shape), expected)


def _flood_by_definition(labels, surface, width):
    """The priority flood written plainly with heapq: items (level, age, pixel), markers queued in raster order,
    a reached pixel queued at max(its value, the current level), 4-connected, -1 never crossed."""
    import heapq

    labels = labels.copy()
    height = labels.size // width
    heap = []
    age = 0
    for i in np.flatnonzero(labels > 0):
        heapq.heappush(heap, (surface[i], age, i))
        age += 1
    while heap:
        level, _, i = heapq.heappop(heap)
        r, c = divmod(i, width)
        for rr, cc in ((r - 1, c), (r, c - 1), (r, c + 1), (r + 1, c)):
            if 0 <= rr < height and 0 <= cc < width and labels[rr * width + cc] == 0:
                m = rr * width + cc
                labels[m] = labels[i]
                heapq.heappush(heap, (max(surface[m], level), age, m))
                age += 1
    return labels


@pytest.mark.parametrize("levels", [0, 1, 3, 16, None])
@pytest.mark.parametrize("seed", range(4))
def test_flood_equals_the_plain_priority_flood(seed, levels):
    """Pixel for pixel the plain definition's labels, with every kind of tie: a constant surface (levels 0),
    two or four values, a few, and a continuous one; several components, blocked pixels, adjacent markers."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 60)), int(rng.integers(8, 60)))
    components, _ = ndi.label(_smooth(rng, shape, 2) > 0.35)
    surface = rng.random(shape)
    if levels is not None:
        surface = np.round(surface * levels) / max(levels, 1)
    markers = np.zeros(shape, np.int32)
    inside = np.flatnonzero(components)
    chosen = rng.choice(inside, size=min(inside.size, int(rng.integers(2, 30))), replace=False)
    markers.ravel()[chosen] = np.arange(1, chosen.size + 1)
    start = np.where(components > 0, markers, -1).ravel()
    got = start.copy()
    kernels.flood(got, surface.ravel(), shape[1])
    assert np.array_equal(got, _flood_by_definition(start, surface.ravel(), shape[1]))


def test_flood_leaves_blocked_pixels_alone():
    """Pixels marked -1 (outside the mask, or components flooded elsewhere) are neither labelled nor crossed."""
    rng = np.random.default_rng(3)
    components, n = ndi.label(_smooth(rng, (60, 60), 2) > 0.45)
    assert n >= 3
    markers = np.zeros((60, 60), np.int32)
    for k in range(1, n + 1):
        markers.ravel()[np.flatnonzero(components == k)[0]] = k
    active = np.zeros(n + 1, bool)
    active[1::2] = True
    got = np.where(active[components], markers, -1).ravel()
    kernels.flood(got, rng.random(3600), 60)
    got = got.reshape(60, 60)
    for k in range(1, n + 1):
        inside = components == k
        assert (got[inside] == k).all() if active[k] else (got[inside] == -1).all()
    assert (got[components == 0] == -1).all()


@pytest.mark.parametrize("seed", range(5))
def test_hole_owner_fills_what_binary_fill_holes_calls_holes(seed):
    import cv2

    rng = np.random.default_rng(seed)
    instances, _ = ndi.label(_smooth(rng, (70, 70), 2) > 0.35)
    instances[rng.random((70, 70)) < 0.03] = 0  # pinholes
    fg = instances > 0
    holes, n_holes = ndi.label(ndi.binary_fill_holes(fg) & ~fg)
    n_bg, background = cv2.connectedComponents((~fg).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    owner = kernels.hole_owner(background.ravel(), n_bg - 1, instances.ravel(), 70)
    filled = np.where(background > 0, owner[background], instances)
    expected = instances.copy()
    for k in range(1, n_holes + 1):
        pocket = holes == k
        around = np.unique(instances[ndi.binary_dilation(pocket) & ~pocket])
        around = around[around > 0]
        if around.size == 1:
            expected[pocket] = around[0]
    assert np.array_equal(filled, expected)
    assert n_holes > 0


def test_plateau_markers_number_8_connected_groups_in_raster_order():
    peak = np.zeros((12, 12), bool)
    peak[1, 1] = peak[2, 2] = True  # diagonal: one plateau
    peak[1, 8:11] = True
    peak[6, 3] = True
    peak[10, 0] = peak[11, 1] = peak[10, 2] = True
    flat = np.flatnonzero(peak)
    number, first = kernels.plateau_markers(flat, 12, 12)
    labels, n = ndi.label(peak, structure=EIGHT)
    assert np.array_equal(number, labels.ravel()[flat])
    assert number.max() == n == 4
    assert flat[first].tolist() == [1 * 12 + 1, 1 * 12 + 8, 6 * 12 + 3, 10 * 12 + 0]


def test_component_argmax_and_label_stats_agree_with_numpy():
    rng = np.random.default_rng(5)
    labels, n = ndi.label(_smooth(rng, (50, 40), 2) > 0.5)
    values = np.round(rng.random((50, 40)) * 5)  # ties: the first pixel in raster order wins
    best, where = kernels.component_argmax(labels.ravel(), values.ravel(), n)
    for k in range(1, n + 1):
        inside = np.flatnonzero(labels.ravel() == k)
        assert best[k] == values.ravel()[inside].max()
        assert where[k] == inside[np.argmax(values.ravel()[inside])]
    prob = rng.random((50, 40)).astype(np.float32)
    area, sy, sx, sp, peak = kernels.label_stats(labels.ravel(), n, prob.ravel(), values.ravel(), 40)
    rows, cols = np.indices((50, 40))
    assert np.array_equal(area[1:], np.bincount(labels.ravel(), minlength=n + 1)[1:])
    assert np.allclose(sy[1:], np.bincount(labels.ravel(), rows.ravel())[1:])
    assert np.allclose(sx[1:], np.bincount(labels.ravel(), cols.ravel())[1:])
    assert np.allclose(sp[1:], np.bincount(labels.ravel(), prob.ravel())[1:])
    assert np.array_equal(peak[1:], ndi.maximum(values, labels, np.arange(1, n + 1)))


def test_semantic_labels_equal_argmax_of_the_stuff_channels():
    rng = np.random.default_rng(2)
    sem = np.round(rng.random((5, 30, 20)) * 3).astype(np.float32)  # ties go to the first channel
    instances = (rng.random((30, 20)) < 0.2).astype(np.uint32)
    stuff = np.array([0, 1, 3, 4])
    got = kernels.semantic_labels(sem, stuff, instances, 2)
    expected = np.where(instances > 0, 2, stuff[np.argmax(sem[stuff], axis=0)])
    assert np.array_equal(got, expected)
    assert got.dtype == np.uint8
