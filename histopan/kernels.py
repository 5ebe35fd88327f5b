"""Compiled loops of the post-processing (numba): each one pass, or one sort, over the pixels.

These are the steps of :mod:`histopan.postprocess` that numpy, scipy and OpenCV cannot do in a fixed number of
vectorised passes.  Every function takes flat (raveled, C order) arrays of one tile and the tile's width,
allocates only arrays of the tile's size or smaller, and runs in O(N) or O(N log N) time for N pixels:

- :func:`component_argmax`: the highest value of each labelled component and its first pixel (raster order);
- :func:`h_peaks`: which peaks of a map rise at least ``h`` above the pass that leads to a higher point, for
  all peaks at once by one union-find sweep (O(N log Q) for Q peaks, never O(peaks x area));
- :func:`plateau_markers`: one marker per 8-connected group of peak pixels, at its first pixel;
- :func:`flood`: marker-controlled watershed (priority flood with a binary heap; ties go to the pixel queued
  first), restricted to given components;
- :func:`hole_owner`: for each background region, whether it touches the tile's edge and which single
  object (if any) surrounds it;
- :func:`label_stats`: per-object pixel count, centroid sums, probability sum and peak centre value;
- :func:`semantic_labels`: the class map, nucleus where an object is, else the most probable stuff class;
- :func:`shape_measures`: per-object moments, exposed pixel edges and the area of the convex hull of its
  pixel squares (from each row's leftmost and rightmost pixel: O(rows log rows) per object).

The functions release the GIL (``nogil``), so tiles post-processed on threads run in parallel.  They are
compiled on first use and cached beside this file.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["component_argmax", "flood", "flood_inputs", "h_peaks", "hole_owner", "label_stats", "plateau_markers",
           "semantic_labels", "shape_measures"]

_JIT = {"cache": True, "nogil": True}


@njit(**_JIT)
def component_argmax(labels, values, n):  # pragma: no cover - compiled
    """Per label 1..n: the largest value and the flat index of its first pixel in raster order (-1 if the
    label is absent).  Index 0 of both outputs is unused."""
    best = np.full(n + 1, -np.inf)
    where = np.full(n + 1, -1, np.int64)
    for i in range(labels.size):
        k = labels[i]
        if k > 0 and values[i] > best[k]:
            best[k] = values[i]
            where[k] = i
    return best, where


@njit(**_JIT)
def _find(parent, i):  # pragma: no cover - compiled
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


#: the 8 neighbours of a pixel in ring order (north, north-east, east, ... north-west)
_RING_DR = np.array([-1, -1, 0, 1, 1, 1, 0, -1])
_RING_DC = np.array([0, 1, 1, 1, 0, -1, -1, -1])


@njit(**_JIT)
def _count_below(sorted_values, v, guess):  # pragma: no cover - compiled
    """How many of ``sorted_values`` are strictly below ``v``, searched outwards from ``guess`` (galloping,
    then bisection): O(log distance from the guess)."""
    n = sorted_values.size
    lo = min(max(guess, 0), n)
    if lo > 0 and sorted_values[lo - 1] >= v:  # the answer is below the guess
        step = 1
        hi = lo
        while lo > 0 and sorted_values[lo - 1] >= v:
            hi = lo
            lo = max(lo - step, 0)
            step *= 2
        # sorted_values[lo - 1] < v (or lo = 0) and sorted_values[hi - 1] >= v
    else:  # the answer is at or above the guess
        step = 1
        hi = lo
        while hi < n and sorted_values[hi] < v:
            lo = hi + 1
            hi = min(hi + step, n)
            step *= 2
    # the answer lies in lo..hi
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_values[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_JIT)
def h_peaks(peaks, values, components, crowded, h, width):  # pragma: no cover - compiled
    """Which of the ``peaks`` (flat indices) to keep: a peak of value v in a component marked ``crowded`` is
    dropped when a higher pixel of its component can be reached through 8-connected pixels of that component
    all above ``v - h``; peaks in other components are all kept.

    One sweep answers every peak: the pixels of the crowded components are bucketed by how many peak
    thresholds ``v - h`` lie below their value, then added to a union-find (8-neighbours of the same
    component) from the highest bucket down; just before the pixels at or below a peak's threshold would be
    added, the peak's set holds exactly the pixels above its threshold that it can reach, and its running
    maximum answers the question.  ``h`` must have the dtype of ``values`` (thresholds are computed as
    ``values[p] - h`` in that dtype).
    """
    n = values.size
    keep = np.ones(peaks.size, np.bool_)
    # the queries: peaks in crowded components, sorted by threshold
    q_peak = np.empty(peaks.size, np.int64)
    q_n = 0
    for j in range(peaks.size):
        if crowded[components[peaks[j]]]:
            q_peak[q_n] = j
            q_n += 1
    if q_n == 0:
        return keep
    q_peak = q_peak[:q_n]
    thresholds = np.empty(q_n, values.dtype)
    for j in range(q_n):
        thresholds[j] = values[peaks[q_peak[j]]] - h
    order = np.argsort(thresholds)
    t_sorted = thresholds[order]
    # bucket b holds the pixels with exactly b thresholds below their value (b = 0: never needed)
    bucket = np.zeros(n, np.int32)
    counts = np.zeros(q_n + 2, np.int64)
    lowest = t_sorted[0]
    # a guess table: for 4 Q value bins, the count of thresholds below the bin's lower edge; each pixel's
    # count is then found by a galloping search from its bin's guess (exact whatever the rounding)
    span = float(t_sorted[q_n - 1]) - float(lowest)
    n_bins = 4 * q_n
    scale = n_bins / span if span > 0 else 0.0
    guess = np.empty(n_bins + 1, np.int64)
    for b in range(n_bins + 1):
        guess[b] = np.searchsorted(t_sorted, lowest + b / scale) if scale > 0 else 0
    for i in range(n):
        v = values[i]
        if v > lowest and crowded[components[i]]:
            g = min(int((float(v) - float(lowest)) * scale), n_bins)
            b = _count_below(t_sorted, v, guess[g])
            bucket[i] = b
            counts[b] += 1
    starts = np.zeros(q_n + 2, np.int64)
    for b in range(1, q_n + 2):
        starts[b] = starts[b - 1] + counts[b - 1]
    fill = starts.copy()
    pixels = np.empty(starts[q_n + 1], np.int64)  # bucket 0 is never filled: its slots stay unused
    for i in range(n):
        b = bucket[i]
        if b > 0:
            pixels[fill[b]] = i
            fill[b] += 1
    parent = np.full(n, -1, np.int32)  # -1: not added yet (int32: half the memory traffic)
    size = np.zeros(n, np.int32)  # union by size keeps the trees shallow
    top = np.empty(n, values.dtype)  # the highest value of each set, at its root
    height = n // width
    for j in range(q_n - 1, -1, -1):
        # add the pixels above threshold j (bucket j + 1)
        for s in range(starts[j + 1], starts[j + 2]):
            i = pixels[s]
            parent[i] = i
            size[i] = 1
            top[i] = values[i]
            root = np.int32(i)
            k = components[i]
            r = i // width
            c = i - r * width
            # the 8 neighbours in ring order: two consecutive ones are neighbours of each other, so when both
            # are already in (and in this component) they are already one set and the second needs no find
            joined_previous = False
            for e in range(8):
                dr = _RING_DR[e]
                dc = _RING_DC[e]
                rr = r + dr
                cc = c + dc
                if rr < 0 or rr >= height or cc < 0 or cc >= width:
                    joined_previous = False
                    continue
                m = rr * width + cc
                if parent[m] < 0 or components[m] != k:
                    joined_previous = False
                    continue
                if joined_previous:
                    continue
                joined_previous = True
                other = np.int32(_find(parent, m))
                if other == root:
                    continue
                if size[other] > size[root]:
                    root, other = other, root
                parent[other] = root
                size[root] += size[other]
                if top[other] > top[root]:
                    top[root] = top[other]
        p = peaks[q_peak[order[j]]]
        if top[_find(parent, p)] > values[p]:
            keep[q_peak[order[j]]] = False
    return keep


@njit(**_JIT)
def plateau_markers(peaks, width, height):  # pragma: no cover - compiled
    """Group the peak pixels (sorted flat indices) into 8-connected plateaus and return, per peak, the
    plateau's number 1..m in raster order of its first pixel, and whether the peak is that first pixel."""
    n = peaks.size
    parent = np.arange(n)
    for j in range(n):
        i = peaks[j]
        r, c = i // width, i % width
        # earlier neighbours in raster order: left, and the three above
        for dr, dc in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):
            rr, cc = r + dr, c + dc
            if rr < 0 or cc < 0 or cc >= width:
                continue
            m = rr * width + cc
            k = np.searchsorted(peaks, m)
            if k < n and peaks[k] == m:
                a = _find(parent, j)
                b = _find(parent, k)
                if a != b:  # keep the earlier pixel as the root
                    if a < b:
                        parent[b] = a
                    else:
                        parent[a] = b
    number = np.zeros(n, np.int64)
    first = np.zeros(n, np.bool_)
    m = 0
    for j in range(n):
        root = _find(parent, j)
        if root == j:
            m += 1
            number[j] = m
            first[j] = True
        else:
            number[j] = number[root]
    return number, first


# The flooding queue is a 4-ary min-heap of rows (value, age, pixel) in one float64 array (ages and pixel
# indices are exact in float64 below 2^53): half the depth of a binary heap, and a node's value and age share
# a cache line.  Keys (value, age) are unique, so any correct heap pops them in the same order.


@njit(**_JIT)
def _put(heap, at, value, age, index):  # pragma: no cover - compiled
    heap[at, 0] = value
    heap[at, 1] = age
    heap[at, 2] = index


@njit(**_JIT)
def _push(heap, items, value, age, index):  # pragma: no cover - compiled
    """Push (value, age, index) onto ``heap`` (ordered by value, then age); returns the new item count."""
    child = items
    while child > 0:
        parent = (child - 1) >> 2
        pv = heap[parent, 0]
        if value < pv or (value == pv and age < heap[parent, 1]):
            _put(heap, child, pv, heap[parent, 1], heap[parent, 2])
            child = parent
        else:
            break
    _put(heap, child, value, age, index)
    return items + 1


@njit(**_JIT)
def _pop(heap, items):  # pragma: no cover - compiled
    """Remove the heap's first item (the caller has read it); returns the new item count."""
    items -= 1
    if items == 0:
        return 0
    value, age, index = heap[items, 0], heap[items, 1], heap[items, 2]
    j = 0
    while True:
        first = 4 * j + 1
        if first >= items:
            break
        small = first
        sv, sa = heap[first, 0], heap[first, 1]
        for child in range(first + 1, min(first + 4, items)):
            cv = heap[child, 0]
            if cv < sv or (cv == sv and heap[child, 1] < sa):
                small, sv, sa = child, cv, heap[child, 1]
        if sv < value or (sv == value and sa < age):
            _put(heap, j, sv, sa, heap[small, 2])
            j = small
        else:
            break
    _put(heap, j, value, age, index)
    return items


@njit(**_JIT)
def flood(labels, surface, width):  # pragma: no cover - compiled
    """Marker-controlled watershed on the flooding ``surface``, in place on ``labels``: markers > 0, pixels to
    flood 0, pixels never to flood (outside the mask, or in components left out) -1; 4-connected, as
    :func:`skimage.segmentation.watershed` with a mask.

    The order is that of :func:`skimage.segmentation.watershed`: markers are queued in raster order at their
    own level, a pixel takes the label of the pixel that reaches it first and is queued at no less than that
    pixel's level, and equal levels go to the pixel queued first.  (scikit-image breaks ties between markers
    at exactly equal levels by its heap's layout; here the first marker in raster order goes first, so
    flooding each component alone gives the same result as flooding all together.)  The two arrays are all
    the loop touches per pixel, which keeps a crowded window's scattered fronts in the cache.
    """
    n = labels.size
    height = n // width
    size = 0
    for i in range(n):
        if labels[i] >= 0:
            size += 1
    heap = np.empty((size, 3), np.float64)
    # Pixels queued at exactly the current level come after every queued pixel of that level (they are the
    # youngest) and before every higher one: they wait in a FIFO instead of the heap.  The heap's items at
    # the current level were queued before the level was reached, so they go first.  Same order, O(1).
    fifo = np.empty(size, np.int64)
    head = 0
    tail = 0
    items = 0
    age = 0
    level = -np.inf
    for i in range(n):
        if labels[i] > 0:
            items = _push(heap, items, surface[i], age, i)
            age += 1
    while items > 0 or head < tail:
        if items > 0 and (head == tail or heap[0, 0] <= level):
            level = heap[0, 0]
            i = np.int64(heap[0, 2])
            items = _pop(heap, items)
        else:
            i = fifo[head]
            head += 1
        label = labels[i]
        r = i // width
        c = i - r * width
        for d in range(4):
            if d == 0:
                if r == 0:
                    continue
                m = i - width
            elif d == 1:
                if c == 0:
                    continue
                m = i - 1
            elif d == 2:
                if c == width - 1:
                    continue
                m = i + 1
            else:
                if r == height - 1:
                    continue
                m = i + width
            if labels[m] != 0:
                continue
            labels[m] = label
            v = surface[m]
            if v <= level:
                fifo[tail] = m
                tail += 1
            else:
                items = _push(heap, items, v, age, m)
            age += 1


@njit(**_JIT)
def hole_owner(background, n_regions, instances, width):  # pragma: no cover - compiled
    """For background regions 1..n (``background``: 4-connected labels of the pixels without an object):
    the one object that borders region k (4-neighbours) when it touches no tile edge and borders exactly
    one object, else 0."""
    n = background.size
    height = n // width
    owner = np.zeros(n_regions + 1, np.int64)
    open_ = np.zeros(n_regions + 1, np.bool_)
    for i in range(n):
        k = background[i]
        if k == 0 or open_[k]:
            continue
        r, c = i // width, i % width
        if r == 0 or c == 0 or r == height - 1 or c == width - 1:
            open_[k] = True
            continue
        for m in (i - width, i - 1, i + 1, i + width):
            o = instances[m]
            if o > 0:
                if owner[k] == 0:
                    owner[k] = o
                elif owner[k] != o:
                    open_[k] = True
                    break
    for k in range(n_regions + 1):
        if open_[k]:
            owner[k] = 0
    return owner


@njit(**_JIT)
def label_stats(instances, n, prob, centre, width):  # pragma: no cover - compiled
    """Per object 1..n: pixel count, sum of rows, sum of columns, sum of ``prob`` and the largest ``centre``
    value, each summed in raster order (float64)."""
    area = np.zeros(n + 1, np.int64)
    sy = np.zeros(n + 1)
    sx = np.zeros(n + 1)
    sp = np.zeros(n + 1)
    mc = np.full(n + 1, -np.inf)
    for i in range(instances.size):
        k = instances[i]
        if k > 0:
            area[k] += 1
            sy[k] += i // width
            sx[k] += i % width
            sp[k] += prob[i]
            if centre[i] > mc[k]:
                mc[k] = centre[i]
    return area, sy, sx, sp, mc


@njit(**_JIT)
def semantic_labels(semantic, stuff, instances, nucleus):  # pragma: no cover - compiled
    """(H, W) uint8 class map from (C, H, W) probabilities: ``nucleus`` where ``instances`` (H, W) is non-zero,
    else the most probable of the ``stuff`` channels (the first of equals, as :func:`numpy.argmax`)."""
    h, w = instances.shape
    out = np.empty((h, w), np.uint8)
    for r in range(h):
        for c in range(w):
            if instances[r, c] > 0:
                out[r, c] = nucleus
                continue
            best = stuff[0]
            top = semantic[best, r, c]
            for j in range(1, stuff.size):
                v = semantic[stuff[j], r, c]
                if v > top:
                    top = v
                    best = stuff[j]
            out[r, c] = best
    return out


@njit(**_JIT)
def _cross(ox, oy, ax, ay, bx, by):  # pragma: no cover - compiled
    return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)


@njit(**_JIT)
def _hull_area(xs, ys):  # pragma: no cover - compiled
    """Area of the convex hull of integer points (Andrew's monotone chain, then the shoelace formula)."""
    order = np.argsort(xs * (ys.max() + 2) + ys)
    n = order.size
    hx = np.empty(2 * n, np.int64)
    hy = np.empty(2 * n, np.int64)
    k = 0
    for j in range(n):  # lower chain
        x, y = xs[order[j]], ys[order[j]]
        while k >= 2 and _cross(hx[k - 2], hy[k - 2], hx[k - 1], hy[k - 1], x, y) <= 0:
            k -= 1
        hx[k], hy[k] = x, y
        k += 1
    lower = k + 1
    for j in range(n - 2, -1, -1):  # upper chain
        x, y = xs[order[j]], ys[order[j]]
        while k >= lower and _cross(hx[k - 2], hy[k - 2], hx[k - 1], hy[k - 1], x, y) <= 0:
            k -= 1
        hx[k], hy[k] = x, y
        k += 1
    twice = 0
    for j in range(k - 1):
        twice += hx[j] * hy[j + 1] - hx[j + 1] * hy[j]
    return abs(twice) / 2.0


@njit(**_JIT)
def shape_measures(instances, n):  # pragma: no cover - compiled
    """Per object 1..n of an (H, W) label image: pixel count, the sums of row, column, row^2, column^2 and
    row x column (float64, raster order), the number of pixel edges it shares with another label or the
    image's edge, and the area of the convex hull of its pixel squares (0 for an absent label)."""
    h, w = instances.shape
    area = np.zeros(n + 1, np.int64)
    sums = np.zeros((5, n + 1))
    edges = np.zeros(n + 1, np.int64)
    rmin = np.full(n + 1, h, np.int64)
    rmax = np.full(n + 1, -1, np.int64)
    for r in range(h):
        for c in range(w):
            k = instances[r, c]
            if k == 0:
                continue
            area[k] += 1
            sums[0, k] += r
            sums[1, k] += c
            sums[2, k] += r * r
            sums[3, k] += c * c
            sums[4, k] += r * c
            edges[k] += ((r == 0 or instances[r - 1, c] != k) + (r == h - 1 or instances[r + 1, c] != k)
                         + (c == 0 or instances[r, c - 1] != k) + (c == w - 1 or instances[r, c + 1] != k))
            if r < rmin[k]:
                rmin[k] = r
            rmax[k] = r
    # the leftmost and rightmost pixel of each object in each of its rows
    start = np.zeros(n + 2, np.int64)
    for k in range(1, n + 1):
        start[k + 1] = start[k] + max(rmax[k] - rmin[k] + 1, 0)
    left = np.full(start[n + 1], w, np.int64)
    right = np.full(start[n + 1], -1, np.int64)
    for r in range(h):
        for c in range(w):
            k = instances[r, c]
            if k == 0:
                continue
            j = start[k] + r - rmin[k]
            if c < left[j]:
                left[j] = c
            if c > right[j]:
                right[j] = c
    hull = np.zeros(n + 1)
    for k in range(1, n + 1):
        rows = start[k + 1] - start[k]
        if rows == 0:
            continue
        xs = np.empty(4 * rows, np.int64)
        ys = np.empty(4 * rows, np.int64)
        m = 0
        for j in range(rows):
            a, b = left[start[k] + j], right[start[k] + j]
            if b < a:
                continue
            r = rmin[k] + j
            for dy in range(2):
                xs[m], ys[m] = a, r + dy
                xs[m + 1], ys[m + 1] = b + 1, r + dy
                m += 2
        hull[k] = _hull_area(xs[:m], ys[:m])
    return area, sums, edges, hull


@njit(**_JIT)
def flood_inputs(markers, components, flooded, boundary, distance, depth, weight):  # pragma: no cover
    """The inputs of :func:`flood` in one pass: the label array (the markers in the components marked
    ``flooded``, -1 everywhere else) and the flooding surface ``weight * boundary + (1 - weight) *
    (1 - distance / depth[component])`` there (0 elsewhere)."""
    n = markers.size
    labels = np.full(n, -1, np.int32)
    surface = np.zeros(n)
    for i in range(n):
        k = components[i]
        if k > 0 and flooded[k]:
            labels[i] = markers[i]
            surface[i] = weight * boundary[i] + (1.0 - weight) * (1.0 - distance[i] / depth[k])
    return labels, surface
