"""Panoptic fusion (pure numpy): things over stuff, small stuff regions absorbed by their neighbours.

The result assigns every pixel exactly one class and at most one instance: nucleus pixels (instance id > 0)
carry the thing class, every other pixel a stuff class.  Stuff regions smaller than a minimum area (in um^2,
converted with the working mpp) are given the class of the nearest larger region, except regions that touch
the border of the array: those may continue beyond it (a tile's halo edge), so they are left for the tile
that sees them whole.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from histopan.kernels import semantic_labels


def stuff_argmax(semantic_probs: np.ndarray, stuff_ids: np.ndarray) -> np.ndarray:
    """Class id (uint8) of the most probable *stuff* class per pixel (the first of equals); ``semantic_probs``
    is ``(C, H, W)``."""
    no_objects = np.zeros(semantic_probs.shape[1:], np.uint8)
    return semantic_labels(semantic_probs, np.asarray(stuff_ids, dtype=np.int64), no_objects, 0)


def absorb_small_regions(stuff: np.ndarray, min_area_um2: float, mpp: float) -> np.ndarray:
    """Give stuff regions smaller than ``min_area_um2`` the class of the nearest larger region.

    Regions (8-connected, per class) that touch the array border are kept as they are.  Returns a new array.
    """
    if min_area_um2 <= 0 or stuff.size == 0:
        return stuff.copy()
    min_px = min_area_um2 / (mpp * mpp)
    small = np.zeros(stuff.shape, bool)
    for cls in np.flatnonzero(np.bincount(stuff.ravel())):
        n_labels, comp = cv2.connectedComponents((stuff == cls).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        n = n_labels - 1
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        edge = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
        is_small = sizes < min_px
        is_small[0] = False
        is_small[edge] = False
        if is_small.any():
            small |= is_small[comp]
    if not small.any() or small.all():
        return stuff.copy()
    # Nearest pixel that is not in a small region (ties broken deterministically by the EDT).
    _, (iy, ix) = ndimage.distance_transform_edt(small, return_indices=True)
    out = stuff.copy()
    out[small] = stuff[iy[small], ix[small]]
    return out


def fuse(stuff: np.ndarray, instances: np.ndarray, thing_id: int) -> np.ndarray:
    """Things over stuff: the semantic map (uint8) with ``thing_id`` wherever ``instances > 0``."""
    if stuff.shape != instances.shape:
        raise ValueError(f"stuff {stuff.shape} and instances {instances.shape} differ in shape")
    out = stuff.astype(np.uint8, copy=True)
    out[instances > 0] = thing_id
    return out
