"""Compiled loops of the post-processing (numba): each one pass, or one sort, over the pixels.

These are the steps of :mod:`histopan.postprocess` that numpy, scipy and OpenCV cannot do in a fixed number of
vectorised passes.  Every function takes flat (raveled, C order) arrays of one tile and the tile's width,
allocates only arrays of the tile's size or smaller, and runs in O(N) or O(N log N) time for N pixels:

- :func:`component_argmax`: the highest value of each labelled component and its first pixel (raster order);
- :func:`h_peaks`: which peaks of a map rise at least ``h`` above the pass that leads to a higher point: a
  bounded local search per peak, and one union-find sweep for the peaks it leaves (O(N log N), never
  O(peaks x area));
- :func:`plateau_markers`: one marker per 8-connected group of peak pixels, at its first pixel;
- :func:`flood`: marker-controlled watershed (priority flood over pixels ranked by value once, so the queue
  is a bitset scanned forwards; ties go to the pixel queued first), restricted to given components;
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


#: pixels one peak's local search may queue before the peak is left to the sweep
LOCAL_PIXELS = 4096


@njit(**_JIT)
def _max_heap_push(heap_value, heap_pixel, items, value, pixel):  # pragma: no cover - compiled
    """Push (value, pixel) onto a binary max-heap of ``items`` items; returns the new count."""
    j = items
    while j > 0:
        parent = (j - 1) >> 1
        if heap_value[parent] >= value:
            break
        heap_value[j] = heap_value[parent]
        heap_pixel[j] = heap_pixel[parent]
        j = parent
    heap_value[j] = value
    heap_pixel[j] = pixel
    return items + 1


@njit(**_JIT)
def _max_heap_pop(heap_value, heap_pixel, items):  # pragma: no cover - compiled
    """Remove the top of a binary max-heap of ``items`` items (the caller has read it); returns the new count."""
    items -= 1
    value = heap_value[items]
    pixel = heap_pixel[items]
    j = 0
    while True:
        child = 2 * j + 1
        if child >= items:
            break
        if child + 1 < items and heap_value[child + 1] > heap_value[child]:
            child += 1
        if heap_value[child] <= value:
            break
        heap_value[j] = heap_value[child]
        heap_pixel[j] = heap_pixel[child]
        j = child
    heap_value[j] = value
    heap_pixel[j] = pixel
    return items


@njit(**_JIT)
def _local_h_test(peaks, queries, values, components, h, width, per_query, total):  # pragma: no cover
    """Answer the h-maximum question of the ``queries`` (indices into ``peaks``) by a search from each peak
    over the 8-connected pixels of its component above ``v - h``: 1 (drop) as soon as a pixel above ``v`` is
    reached, 0 (keep) when the region is exhausted without one, -1 (left to the sweep) when the search would
    queue more than ``per_query`` pixels, or once ``total`` pixels have been queued in all.

    The search expands the highest queued pixel first (a max-heap), so from a bump on a slope it climbs
    towards the higher ground instead of filling the area around the bump; a nucleus's dome is small, so
    nearly every peak is answered here.  The work is at most ``total`` queued pixels whatever the map holds,
    each touched with its 8 neighbours, in three consecutive rows (no scattered memory access, unlike the
    sweep's value order)."""
    n = values.size
    height = n // width
    answer = np.full(queries.size, -1, np.int8)
    stamp = np.full(n, -1, np.int32)  # the last query that queued each pixel: no clearing between queries
    heap_value = np.empty(per_query)
    heap_pixel = np.empty(per_query, np.int64)
    spent = 0
    for q in range(queries.size):
        if spent >= total:
            break
        p = peaks[queries[q]]
        k = components[p]
        v = values[p]
        t = v - h
        stamp[p] = q
        heap_value[0] = v
        heap_pixel[0] = p
        items = 1
        queued = 1
        verdict = 0
        while items > 0 and verdict == 0:
            i = heap_pixel[0]
            items = _max_heap_pop(heap_value, heap_pixel, items)
            r = i // width
            c = i - r * width
            for e in range(8):
                rr = r + _RING_DR[e]
                cc = c + _RING_DC[e]
                if rr < 0 or rr >= height or cc < 0 or cc >= width:
                    continue
                m = rr * width + cc
                if stamp[m] == q or components[m] != k or not values[m] > t:
                    continue
                if values[m] > v:
                    verdict = 1
                    break
                if queued == per_query:
                    verdict = -1
                    break
                stamp[m] = q
                queued += 1
                items = _max_heap_push(heap_value, heap_pixel, items, float(values[m]), m)
        spent += queued
        answer[q] = verdict
    return answer


@njit(**_JIT)
def _sweep_h_test(peaks, queries, values, components, h, width, keep):  # pragma: no cover - compiled
    """Answer the h-maximum question of the ``queries`` (indices into ``peaks``) all at once, into ``keep``.

    The pixels of the queries' components are bucketed by how many query thresholds ``v - h`` lie below
    their value, then added to a union-find (8-neighbours of the same component) from the highest bucket
    down; just before the pixels at or below a query's threshold would be added, the peak's set holds exactly
    the pixels above its threshold that it can reach, and its running maximum answers the question.
    O(N log N) for N pixels: a binary search per pixel, and a union-find with path compression."""
    n = values.size
    q_n = queries.size
    if q_n == 0:
        return
    involved = np.zeros(components.max() + 1, np.bool_)
    thresholds = np.empty(q_n, values.dtype)
    for j in range(q_n):
        p = peaks[queries[j]]
        involved[components[p]] = True
        thresholds[j] = values[p] - h
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
        if v > lowest and involved[components[i]]:
            g = min(int((float(v) - float(lowest)) * scale), n_bins)
            b = _count_below(t_sorted, v, guess[g])
            bucket[i] = b
            counts[b] += 1
    starts = np.zeros(q_n + 2, np.int64)
    for b in range(1, q_n + 2):
        starts[b] = starts[b - 1] + counts[b - 1]
    fill = starts.copy()
    pixels = np.empty(starts[q_n + 1], np.int32)  # bucket 0 is never filled: its slots stay unused
    for i in range(n):
        b = bucket[i]
        if b > 0:
            pixels[fill[b]] = i
            fill[b] += 1
    parent = np.full(n, -1, np.int32)  # -1: not added yet (int32: half the memory traffic)
    top = np.empty(n, values.dtype)  # the highest value of each set, at its root
    height = n // width
    for j in range(q_n - 1, -1, -1):
        # add the pixels above threshold j (bucket j + 1)
        for s in range(starts[j + 1], starts[j + 2]):
            i = pixels[s]
            k = components[i]
            r = i // width
            c = i - r * width
            # the pixel joins the first neighbouring set it meets, whose root stays the root (the sets grow
            # around old roots; path compression keeps the finds short), and merges any other set into it.
            # The 8 neighbours in ring order: two consecutive ones are neighbours of each other, so when both
            # are already in (and in this component) they are already one set and the second needs no find.
            root = np.int32(-1)
            best = values[i]
            joined_previous = False
            for e in range(8):
                rr = r + _RING_DR[e]
                cc = c + _RING_DC[e]
                if rr < 0 or rr >= height or cc < 0 or cc >= width:
                    joined_previous = False
                    continue
                m = rr * width + cc
                # an added edge neighbour is in the pixel's own (4-connected) component; a corner one may not be
                if parent[m] < 0 or ((e & 1) == 1 and components[m] != k):
                    joined_previous = False
                    continue
                if joined_previous:
                    continue
                joined_previous = True
                other = np.int32(_find(parent, m))
                if other == root:
                    continue
                if root < 0:
                    root = other
                else:
                    parent[other] = root
                if top[other] > best:
                    best = top[other]
            if root < 0:
                root = np.int32(i)
            parent[i] = root
            top[root] = best
        p = peaks[queries[order[j]]]
        if top[_find(parent, p)] > values[p]:
            keep[queries[order[j]]] = False


@njit(**_JIT)
def h_peaks(peaks, values, components, crowded, h, width, per_query=LOCAL_PIXELS, total=-1):  # pragma: no cover
    """Which of the ``peaks`` (flat indices) to keep: a peak of value v in a component marked ``crowded`` is
    dropped when a higher pixel of its component can be reached through 8-connected pixels of that component
    all above ``v - h``; peaks in other components are all kept.  ``h`` must be positive and have the dtype
    of ``values`` (thresholds are computed as ``values[p] - h`` in that dtype).

    Two exact methods share the work.  First a local search per peak (:func:`_local_h_test`): a nucleus's
    dome is a few hundred pixels, so it answers nearly every peak, visiting each pixel of the dome with its
    neighbours.  It queues at most ``per_query`` pixels per peak and ``total`` in all (default: the tile's
    pixel count), so it never costs more than a few passes over the tile.  The peaks it leaves are answered
    together by one union-find sweep (:func:`_sweep_h_test`, O(N log N)), never O(peaks x area).
    """
    keep = np.ones(peaks.size, np.bool_)
    queries = np.empty(peaks.size, np.int64)
    q_n = 0
    for j in range(peaks.size):
        if crowded[components[peaks[j]]]:
            queries[q_n] = j
            q_n += 1
    if q_n == 0:
        return keep
    queries = queries[:q_n]
    budget = values.size if total < 0 else total
    answer = _local_h_test(peaks, queries, values, components, h, width, max(per_query, 1), budget)
    left = 0
    for q in range(q_n):
        if answer[q] == 1:
            keep[queries[q]] = False
        elif answer[q] == -1:
            queries[left] = queries[q]
            left += 1
    _sweep_h_test(peaks, queries[:left], values, components, h, width, keep)
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


@njit(**_JIT)
def _ranked(labels, surface):  # pragma: no cover - compiled
    """The pixels with ``labels >= 0`` in increasing order of ``surface``, and their values in that order: a
    counting sort into about one bucket per two pixels by value, then each bucket sorted on its own
    (insertion sort when small, merge sort otherwise: O(k log k) for a bucket of k, so O(N log N) even when
    every value is equal)."""
    n = labels.size
    size = 0
    lo = np.inf
    hi = -np.inf
    for i in range(n):
        if labels[i] >= 0:
            size += 1
            v = surface[i]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    order = np.empty(size, np.int64)
    value = np.empty(size)
    if size == 0:
        return order, value
    n_buckets = max(1, size // 2)
    scale = n_buckets / (hi - lo) if hi > lo else 0.0
    last = n_buckets - 1
    counts = np.zeros(n_buckets + 1, np.int64)
    for i in range(n):
        if labels[i] >= 0:
            x = (surface[i] - lo) * scale
            counts[(int(x) if x < last else last) + 1] += 1  # NaN (not < last) goes to the last bucket
    for b in range(n_buckets):
        counts[b + 1] += counts[b]
    fill = counts[:n_buckets].copy()
    for i in range(n):
        if labels[i] >= 0:
            v = surface[i]
            x = (v - lo) * scale
            b = int(x) if x < last else last
            order[fill[b]] = i
            value[fill[b]] = v
            fill[b] += 1
    for b in range(n_buckets):
        start = counts[b]
        end = counts[b + 1]
        if end - start <= 1:
            continue
        if end - start <= 24:
            for a in range(start + 1, end):
                p = order[a]
                v = value[a]
                k = a - 1
                while k >= start and value[k] > v:
                    order[k + 1] = order[k]
                    value[k + 1] = value[k]
                    k -= 1
                order[k + 1] = p
                value[k + 1] = v
        else:
            idx = np.argsort(value[start:end], kind="mergesort")
            order[start:end] = order[start:end][idx]
            value[start:end] = value[start:end][idx]
    return order, value


@njit(**_JIT)
def _next_set(bits, start):  # pragma: no cover - compiled
    """The position of the first set bit at or after ``start`` (a set bit past the end must stop the scan)."""
    w = start >> 6
    word = bits[w] & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(start & 63))
    while word == 0:
        w += 1
        word = bits[w]
    b = 0
    while (word >> np.uint64(b)) & np.uint64(1) == 0:
        b += 1
    return (w << 6) + b


@njit(**_JIT)
def flood(labels, surface, width):  # pragma: no cover - compiled
    """Marker-controlled watershed on the flooding ``surface``, in place on ``labels``: markers > 0, pixels to
    flood 0, pixels never to flood (outside the mask, or in components left out) -1; 4-connected, as
    :func:`skimage.segmentation.watershed` with a mask.

    The order is that of :func:`skimage.segmentation.watershed`: markers are queued in raster order at their
    own level, a pixel takes the label of the pixel that reaches it first and is queued at no less than that
    pixel's level, and equal levels go to the pixel queued first.  (scikit-image breaks ties between markers
    at exactly equal levels by its heap's layout; here the first marker in raster order goes first, so
    flooding each component alone gives the same result as flooding all together.)

    The queue needs no heap.  Every pixel is queued at most once and at its own value, so the pixels are
    ranked by value once (:func:`_ranked`), and pixels of equal value share a group, named by its first
    rank.  The queue is then a bit per group, scanned forwards only (a pixel is queued above the current
    level, so after the current group), plus, for a group of equal values, its queued pixels in queue order.
    Pixels reached at or below the current level wait in a FIFO: they come after the queued pixels at that
    level (older) and before every higher one.  O(N log N) for the ranking, O(N) after it.
    """
    n = labels.size
    height = n // width
    order, value = _ranked(labels, surface)
    size = order.size
    if size == 0:
        return
    group = np.empty(n, np.int32)  # per floodable pixel: the first rank of its value (unset elsewhere)
    tied = np.zeros(size, np.bool_)  # per group: more than one pixel has its value
    g = 0
    for r in range(size):
        p = order[r]
        if r > 0 and value[r] == value[r - 1]:
            tied[g] = True
        else:
            g = r
        group[p] = g
    slots = np.empty(size, np.int64)  # a tied group's queued pixels, in queue order, from its first rank on
    filled = np.zeros(size, np.int32)
    taken = np.zeros(size, np.int32)
    words = (size >> 6) + 2
    bits = np.zeros(words, np.uint64)
    bits[words - 1] = np.uint64(1)  # past the last group: never reached while pixels are queued
    fifo = np.empty(size, np.int64)
    head = 0
    tail = 0
    queued = 0
    for i in range(n):
        if labels[i] > 0:
            g = group[i]
            if tied[g]:
                slots[g + filled[g]] = i
                filled[g] += 1
            bits[g >> 6] |= np.uint64(1) << np.uint64(g & 63)
            queued += 1
    current = -1  # the group of the current level
    while queued > 0 or head < tail:
        if current >= 0 and tied[current] and taken[current] < filled[current]:
            i = slots[current + taken[current]]
            taken[current] += 1
            queued -= 1
        elif head < tail:
            i = fifo[head]
            head += 1
        else:
            current = _next_set(bits, current + 1)
            if tied[current]:
                i = slots[current]
                taken[current] = 1
            else:
                i = order[current]
            queued -= 1
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
            g = group[m]
            if g <= current:
                fifo[tail] = m
                tail += 1
            else:
                if tied[g]:
                    slots[g + filled[g]] = m
                    filled[g] += 1
                bits[g >> 6] |= np.uint64(1) << np.uint64(g & 63)
                queued += 1


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
