"""Training targets from labels (pure numpy / scipy / skimage; sizes in microns).

Semantic supervision is a *label set* per pixel, stored as a bit mask over the model's classes
(bit ``c`` set = class ``c`` is allowed).  A pixel's loss is ``-log(sum of the allowed classes'
probabilities)`` (see :mod:`.losses`), so one encoding covers every kind of partial label:

- nucleus data set (instances known, tissue class unknown): nucleus pixels allow ``{nucleus}``, other
  annotated pixels allow every stuff class ("not a nucleus, tissue unknown");
- tile-class data set (one tissue class per tile, nuclei not outlined): every pixel allows
  ``{tile class, nucleus}``;
- unannotated pixels (padding, outside the image after augmentation): the empty set -> no loss.

Nucleus targets (only where ``nucleus_valid``): the nucleus mask, a centre heatmap (a Gaussian of sigma
``centre_sigma_um`` at each instance centroid, the maximum where they overlap) and a boundary map (the
instances' inner edge pixels, including where two nuclei touch).  ``contact`` marks the pixels within a
given distance of two different nuclei (where touching nuclei meet, and the narrow gaps between close ones):
the loss can weight them up, since that is where neighbours get merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

__all__ = ["Targets", "boundary_map", "centre_heatmap", "class_bits", "contact_map", "nucleus_targets",
           "region_targets", "tile_class_targets"]


@dataclass(frozen=True)
class Targets:
    """Per-pixel targets of one crop (all (H, W)).

    ``label_bits`` int64 bit mask of allowed classes (0 = no semantic loss); ``nucleus`` float32 0/1 mask;
    ``centre`` float32 heatmap in 0..1; ``boundary`` float32 0/1; ``nucleus_valid`` bool, where the nucleus,
    centre and boundary targets are known; ``contact`` bool, the pixels near two different nuclei
    (:func:`contact_map`; all False where no nuclei are outlined).
    """

    label_bits: np.ndarray
    nucleus: np.ndarray
    centre: np.ndarray
    boundary: np.ndarray
    nucleus_valid: np.ndarray
    contact: np.ndarray


def class_bits(indices: list[int] | tuple[int, ...]) -> int:
    """The bit mask allowing the classes ``indices``."""
    bits = 0
    for i in indices:
        if not 0 <= i < 63:
            raise ValueError(f"class index must be within 0..62 for the label-set encoding, got {i}")
        bits |= 1 << i
    return bits


def centre_heatmap(instances: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian of ``sigma_px`` at each instance's centroid (peak 1), the maximum where they overlap."""
    if sigma_px <= 0:
        raise ValueError(f"sigma_px must be > 0, got {sigma_px}")
    h, w = instances.shape
    heat = np.zeros((h, w), dtype=np.float32)
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if ids.size == 0:
        return heat
    centres = ndi.center_of_mass(np.ones_like(instances, dtype=np.float32), instances, ids)
    r = int(np.ceil(3 * sigma_px))
    for cy, cx in centres:
        y0, y1 = max(0, int(np.floor(cy)) - r), min(h, int(np.floor(cy)) + r + 2)
        x0, x1 = max(0, int(np.floor(cx)) - r), min(w, int(np.floor(cx)) + r + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        g = np.exp(-(yy * yy + xx * xx) / (2 * sigma_px * sigma_px))
        np.maximum(heat[y0:y1, x0:x1], g, out=heat[y0:y1, x0:x1])
    return heat


def boundary_map(instances: np.ndarray) -> np.ndarray:
    """1 on the inner edge pixels of every instance (also where two instances touch), else 0."""
    return find_boundaries(instances, mode="inner").astype(np.float32)


def contact_map(instances: np.ndarray, radius_px: int) -> np.ndarray:
    """True where the (2r+1)^2 window around a pixel holds two different instances: the pixels of touching
    nuclei next to the line where they meet, and the background in gaps narrower than about 2r between two
    nuclei.  A nucleus next to background only gets no contact pixels.
    """
    if radius_px < 1:
        raise ValueError(f"radius_px must be >= 1, got {radius_px}")
    ids = instances.astype(np.int64)
    size = 2 * radius_px + 1
    above = int(ids.max()) + 1  # stands for "no nucleus" in the minimum (scipy casts cval through a double)
    highest = ndi.maximum_filter(ids, size=size, mode="constant", cval=0)
    lowest = ndi.minimum_filter(np.where(ids > 0, ids, above), size=size, mode="constant", cval=above)
    return (highest > 0) & (lowest < highest)


def nucleus_targets(instances: np.ndarray, valid: np.ndarray, mpp: float, centre_sigma_um: float,
                    nucleus_index: int, stuff_indices: tuple[int, ...], contact_um: float = 1.0) -> Targets:
    """Targets of a crop with known nucleus instances (0 = not a nucleus) and unknown tissue class.

    ``valid`` marks annotated pixels; elsewhere nothing is trained.  ``contact_um`` is the radius of
    :func:`contact_map` in microns (at least one pixel).
    """
    if instances.shape != valid.shape:
        raise ValueError(f"instances {instances.shape} and valid {valid.shape} must have the same shape")
    valid = valid.astype(bool)
    nucleus = (instances > 0) & valid
    bits = np.where(nucleus, class_bits([nucleus_index]), class_bits(list(stuff_indices)))
    bits = np.where(valid, bits, 0).astype(np.int64)
    return Targets(
        label_bits=bits,
        nucleus=nucleus.astype(np.float32),
        centre=centre_heatmap(instances, centre_sigma_um / mpp) * valid,
        boundary=boundary_map(instances) * valid,
        nucleus_valid=valid,
        contact=contact_map(instances, max(1, int(round(contact_um / mpp)))) & valid,
    )


def tile_class_targets(valid: np.ndarray, class_index: int, nucleus_index: int,
                       no_nucleus: np.ndarray | None = None) -> Targets:
    """Targets of a crop from a one-class tile: each valid pixel is that class or a nucleus.

    Pixels in ``no_nucleus`` (e.g. bare glass, or every pixel of a background tile) are that class only and
    train the nucleus maps to zero there: without this, "nucleus" satisfies every tile label and the network
    learns to call empty glass nuclei.  Elsewhere the nucleus maps are not trained (unknown).
    """
    regions = np.full(valid.shape, 2, np.uint8)
    if no_nucleus is not None:
        regions[no_nucleus.astype(bool)] = 1
    bits = class_bits([class_index])
    return region_targets(regions, valid, (bits, bits), nucleus_index, no_nucleus_code=1)


def region_targets(regions: np.ndarray, valid: np.ndarray, region_bits: tuple[int, ...], nucleus_index: int,
                   no_nucleus_code: int) -> Targets:
    """Targets of a crop with a region map (pixel masks of tissue classes, nuclei not outlined).

    ``regions`` holds codes 1, 2, ... (0 = unknown, trains nothing); code ``k`` allows the stuff classes of
    ``region_bits[k - 1]`` or a nucleus in them, except code ``no_nucleus_code`` (bare glass, white lumina),
    which allows its classes only and trains the nucleus maps to zero there.
    """
    valid = valid.astype(bool) & (regions > 0)
    lut = np.zeros(max(len(region_bits) + 1, int(regions.max(initial=0)) + 1), dtype=np.int64)
    nucleus_bit = class_bits([nucleus_index])
    for k, bits in enumerate(region_bits, start=1):
        lut[k] = bits if k == no_nucleus_code else bits | nucleus_bit
    sure = valid & (regions == no_nucleus_code)
    bits = np.where(valid, lut[regions], 0).astype(np.int64)
    zeros = np.zeros(valid.shape, dtype=np.float32)
    return Targets(label_bits=bits, nucleus=zeros, centre=zeros.copy(), boundary=zeros.copy(),
                   nucleus_valid=sure, contact=np.zeros(valid.shape, dtype=bool))
