"""Vectorised outline tracing of label images (all labels of an array at once, no per-object loop).

The boundary of every label is followed along pixel edges ("crack" edges) with 4-connectivity for the
label (pixels that touch only at a corner are separate rings; the background is 8-connected, as in
:func:`scipy.ndimage.label`'s default).  Every ring is returned as the polygon through the *midpoints* of
its pixel edges, with collinear points dropped:

- it is a simple ring (it never touches itself, even where a label pinches at a pixel corner);
- the pixel centres inside it are exactly the label's pixels (the cut corners are 0.35 px deep and pixel
  centres lie 0.7 px from a corner), so rasterising the ring gives the mask back;
- its area is the pixel count minus 1/2 for an outer ring without holes (every convex corner cuts 1/8 px^2
  and every concave corner adds 1/8; a simple rectilinear ring has four more convex than concave corners).

Coordinates are in pixel-corner units: pixel ``(row r, column c)`` covers ``[c, c+1) x [r, r+1)``, so its
centre is ``(c + 0.5, r + 0.5)``.  Outer rings have a positive signed (shoelace) area, i.e. they run
counter-clockwise for the numbers as written (the RFC 7946 convention); holes run the other way.

Why not :func:`skimage.measure.find_contours` per object: one call per nucleus costs tens of
microseconds of Python overhead, and exporting a million nuclei at >= 50,000 per second leaves about
20 microseconds per nucleus for everything.  Here the work is a few numpy passes over the edges of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# direction codes: 0 = +x (east), 1 = +y (south, image rows grow downwards), 2 = -x, 3 = -y
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)


@dataclass(frozen=True)
class Rings:
    """Closed rings of a label image (ragged arrays).

    ``x``, ``y``: vertex coordinates of all rings, concatenated (each ring open: the first vertex is not
    repeated); ``offsets``: ring ``i`` is ``x[offsets[i]:offsets[i + 1]]``; ``label``: the label of each
    ring; ``area``: its signed area (positive for outer rings, negative for holes).
    """

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    label: np.ndarray
    area: np.ndarray

    def __len__(self) -> int:
        return int(self.label.size)

    def ring(self, i: int) -> np.ndarray:
        """Vertices of ring ``i`` as an (n, 2) array of (x, y)."""
        s, e = self.offsets[i], self.offsets[i + 1]
        return np.stack([self.x[s:e], self.y[s:e]], axis=1)

    def select(self, keep: np.ndarray) -> Rings:
        """The rings where the boolean mask ``keep`` is true (order kept)."""
        return self.take(np.flatnonzero(keep))

    def take(self, idx: np.ndarray) -> Rings:
        """The rings ``idx`` (integer indices), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = np.diff(self.offsets)[idx]
        offsets = np.zeros(idx.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[idx]
        take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Rings(self.x[take], self.y[take], offsets, self.label[idx], self.area[idx])


def _edges(lab: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed pixel edges with their label on the right-hand normal side ("region side").

    For direction d the region side is n(d) = (-dy, dx), i.e. code (d + 1) % 4: walking +x the region lies
    below (+y), so outer rings come out with a positive shoelace area.
    Returns start x, start y, direction code and label of every edge of the (padded) array ``lab``.
    """
    xs, ys, ds, ls = [], [], [], []
    # horizontal edges: between rows i and i+1, at y = i + 1
    i, c = np.nonzero(lab[1:] != lab[:-1])
    below, above = lab[i + 1, c], lab[i, c]
    m = below != 0  # region below: walk +x from (c, i+1)
    xs.append(c[m]); ys.append(i[m] + 1); ds.append(np.zeros(m.sum(), np.int64)); ls.append(below[m])
    m = above != 0  # region above: walk -x from (c+1, i+1)
    xs.append(c[m] + 1); ys.append(i[m] + 1); ds.append(np.full(m.sum(), 2, np.int64)); ls.append(above[m])
    # vertical edges: between columns j and j+1, at x = j + 1
    r, j = np.nonzero(lab[:, 1:] != lab[:, :-1])
    left, right = lab[r, j], lab[r, j + 1]
    m = left != 0  # region on the left (-x): walk +y from (j+1, r)
    xs.append(j[m] + 1); ys.append(r[m]); ds.append(np.ones(m.sum(), np.int64)); ls.append(left[m])
    m = right != 0  # region on the right (+x): walk -y from (j+1, r+1)
    xs.append(j[m] + 1); ys.append(r[m] + 1); ds.append(np.full(m.sum(), 3, np.int64)); ls.append(right[m])
    x = np.concatenate(xs).astype(np.int64)
    y = np.concatenate(ys).astype(np.int64)
    d = np.concatenate(ds)
    lab_e = np.concatenate(ls)
    if labels is not None:
        keep = np.isin(lab_e, labels)
        x, y, d, lab_e = x[keep], y[keep], d[keep], lab_e[keep]
    return x, y, d, lab_e


def trace_rings(labels_image: np.ndarray, labels: np.ndarray | None = None) -> Rings:
    """Every boundary ring of every non-zero label of a 2-D integer array (or only of ``labels``).

    Pixels outside the array count as background, so objects cut by the array's border are closed along it.
    """
    lab = np.asarray(labels_image)
    if lab.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {lab.shape}")
    lab = np.pad(lab, 1)
    if labels is not None:
        labels = np.unique(np.asarray(labels, dtype=lab.dtype))
    x, y, d, lab_e = _edges(lab, labels)
    n = x.size
    if n == 0:
        empty_f = np.zeros(0, np.float64)
        return Rings(empty_f, empty_f, np.zeros(1, np.int64), np.zeros(0, lab.dtype), empty_f)

    # successor of each edge: at its end vertex, look at the two pixels ahead
    vx, vy = x + _DX[d], y + _DY[d]
    nside = (d + 1) % 4
    ax_n = (2 * vx + _DX[d] + _DX[nside]) // 2
    ay_n = (2 * vy + _DY[d] + _DY[nside]) // 2
    ax_o = (2 * vx + _DX[d] - _DX[nside]) // 2
    ay_o = (2 * vy + _DY[d] - _DY[nside]) // 2
    ahead_n = lab[ay_n, ax_n] == lab_e
    ahead_o = lab[ay_o, ax_o] == lab_e
    # region continues straight ahead: go straight; both ahead: turn away from the region side;
    # otherwise turn towards it (4-connectivity: corner-touching pixels are not joined)
    new_d = np.where(ahead_n, np.where(ahead_o, (d + 3) % 4, d), nside)

    height, width = lab.shape
    stride = width + 1
    key = (y * stride + x) * 4 + d
    succ_key = (vy * stride + vx) * 4 + new_d
    if (height + 1) * stride * 4 <= 64 * n + 4_000_000:  # dense lookup (every successor key exists)
        table = np.empty((height + 1) * stride * 4, np.int32)
        table[key] = np.arange(n, dtype=np.int32)
        succ = table[succ_key].astype(np.int64)
        del table
    else:  # few edges over a large area (tissue regions): sort instead
        by_key = np.argsort(key)
        succ = by_key[np.searchsorted(key, succ_key, sorter=by_key)]

    # ring of each edge = the smallest edge index on its cycle (pointer jumping)
    root = np.arange(n)
    jump = succ.copy()
    while True:
        new_root = np.minimum(root, root[jump])
        if np.array_equal(new_root, root):
            break
        root = new_root
        jump = jump[jump]
    # position along the ring: distance to the ring's last edge (the one before the root)
    nxt = np.where(succ == root, -1, succ)
    dist = (nxt >= 0).astype(np.int64)
    active = np.flatnonzero(nxt >= 0)
    while active.size:
        step = nxt[active]
        dist[active] += dist[step]
        nxt[active] = nxt[step]
        active = active[nxt[active] >= 0]
    order = np.lexsort((-dist, root))
    x, y, d, lab_e, root = x[order], y[order], d[order], lab_e[order], root[order]

    starts = np.flatnonzero(np.r_[True, root[1:] != root[:-1]])
    ring_of = np.cumsum(np.r_[True, root[1:] != root[:-1]]) - 1
    ends = np.r_[starts[1:], n]
    # a midpoint is redundant when the previous and next edges of its ring run the same way
    pos = np.arange(n)
    prev_i = np.where(pos == starts[ring_of], ends[ring_of] - 1, pos - 1)
    next_i = np.where(pos == ends[ring_of] - 1, starts[ring_of], pos + 1)
    keep = d[prev_i] != d[next_i]
    # midpoints in corner units (times 2 to stay integer until the end)
    mx2 = 2 * x + _DX[d]
    my2 = 2 * y + _DY[d]
    keep_idx = np.flatnonzero(keep)
    counts = np.bincount(ring_of[keep_idx], minlength=starts.size)
    offsets = np.zeros(starts.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    # -1: undo the padding
    rx = mx2[keep_idx] / 2.0 - 1.0
    ry = my2[keep_idx] / 2.0 - 1.0
    area = _signed_area(rx, ry, offsets)
    return Rings(rx, ry, offsets, lab_e[starts], area)


def _signed_area(x: np.ndarray, y: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Shoelace area of each ring (positive when counter-clockwise for the numbers as written)."""
    n = x.size
    if n == 0:
        return np.zeros(offsets.size - 1)
    pos = np.arange(n)
    ring = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    nxt = np.where(pos == offsets[1:][ring] - 1, offsets[:-1][ring], pos + 1)
    cross = x * y[nxt] - x[nxt] * y
    return np.bincount(ring, weights=cross, minlength=offsets.size - 1) / 2.0


def outer_rings(rings: Rings) -> Rings:
    """For each label, its largest outer ring (a label split into corner-touching parts keeps its largest),
    sorted by label."""
    outer = rings.select(rings.area > 0)
    if len(outer) == 0:
        return outer
    order = np.lexsort((-outer.area, outer.label))
    lab_sorted = outer.label[order]
    first = np.r_[True, lab_sorted[1:] != lab_sorted[:-1]]
    return outer.take(order[first])
