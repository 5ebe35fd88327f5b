"""Random augmentations of a training crop, applied consistently to the image and its labels.

Geometry (flips, 90-degree rotations, scale jitter) is applied to the image, the instance labels and the
valid mask together *before* the targets are computed, so centre peaks and boundaries always follow the
nuclei.  Colour (HED stain jitter via :func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`,
brightness / contrast, Gaussian blur) changes the image only.  All randomness comes from the
``numpy.random.Generator`` passed in, so a crop is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed
from skimage.transform import resize

from histopan.training.config import AugmentConfig

__all__ = ["colour_jitter", "flip_rotate", "sample_scale", "zoom_to"]


def sample_scale(rng: np.random.Generator, cfg: AugmentConfig) -> float:
    """A zoom factor uniform in ``1 +- cfg.scale`` (1.0 when scale jitter is off)."""
    return float(rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale)) if cfg.scale > 0 else 1.0


def zoom_to(image: np.ndarray, labels: np.ndarray | None, valid: np.ndarray, size: int
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resize a square region to ``size`` x ``size``: image bilinear, labels and mask nearest-neighbour."""
    if image.shape[0] == size and image.shape[1] == size:
        return image, labels, valid
    img = resize(image, (size, size, 3), order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)
    lab = None if labels is None else resize(labels, (size, size), order=0, preserve_range=True,
                                             anti_aliasing=False).astype(labels.dtype)
    val = resize(valid.astype(np.uint8), (size, size), order=0, preserve_range=True,
                 anti_aliasing=False).astype(bool)
    return img, lab, val


def flip_rotate(arrays: list[np.ndarray | None], rng: np.random.Generator, cfg: AugmentConfig
                ) -> list[np.ndarray | None]:
    """The same random flip / 90-degree rotation of every (H, W, ...) array in ``arrays`` (None kept)."""
    k = int(rng.integers(4)) if cfg.rot90 else 0
    flip = bool(rng.integers(2)) if cfg.flips else False
    out = []
    for a in arrays:
        if a is not None:
            if flip:
                a = a[:, ::-1]
            a = np.ascontiguousarray(np.rot90(a, k, axes=(0, 1)))
        out.append(a)
    return out


def colour_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, mpp: float) -> np.ndarray:
    """HED stain jitter, brightness / contrast and blur of an RGB image (uint8 or float 0..255) -> float32 0..1."""
    x = np.asarray(image, dtype=np.float32) / 255.0
    if cfg.hed > 0:
        hed = rgb2hed(np.clip(x, 0, 1))
        alpha = rng.normal(1.0, cfg.hed, size=3).astype(np.float32)
        beta = rng.normal(0.0, cfg.hed / 2, size=3).astype(np.float32)
        # rgb2hed returns optical densities around 0..0.3; scale the additive term to that range.
        x = hed2rgb(hed * alpha + beta * 0.1).astype(np.float32)
    if cfg.brightness > 0 or cfg.contrast > 0:
        b = rng.uniform(-cfg.brightness, cfg.brightness) if cfg.brightness > 0 else 0.0
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) if cfg.contrast > 0 else 1.0
        mean = x.mean()
        x = (x - mean) * c + mean + b
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        sigma_px = rng.uniform(0, cfg.blur_sigma_um) / mpp
        x = ndi.gaussian_filter(x, sigma=(sigma_px, sigma_px, 0))
    return np.clip(x, 0.0, 1.0).astype(np.float32)
