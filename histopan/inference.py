"""Batches of RGB uint8 tiles -> probability maps (:class:`~histopan.postprocess.ProbabilityMaps`).

:class:`TileInferencer` owns the device decisions: ``device=None`` picks CUDA when available, else the
CPU; on CUDA it uses mixed precision (float16 autocast) and the channels_last memory format.  Tiles are
normalised as the model's config says, padded by reflection to multiples of 32 and cropped back, so any
tile of at least :data:`MIN_TILE_PX` pixels per side works.  Probabilities are computed in float32.

With ``tta=True`` (test-time augmentation) every batch also goes through the network flipped and rotated:
the eight symmetries of the square, each output mapped back and the logits averaged.  For tiles whose sides
are multiples of 32 (no padding; the pipeline's tile + halo windows are) the maps are then equivariant
under flips and 90-degree rotations of the input.  Inference costs eight times as much.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from torch import nn

from histopan.errors import ConfigError, HistopanError
from histopan.model.checkpoint import LoadedModel
from histopan.model.config import ModelConfig
from histopan.model.network import INPUT_MULTIPLE, normalize_input, to_probabilities
from histopan.postprocess import ProbabilityMaps

log = logging.getLogger(__name__)

__all__ = ["MIN_TILE_PX", "TileInferencer", "auto_batch_size", "forward_padded", "predict_maps", "resolve_device"]

#: smallest tile side accepted (reflection padding to a multiple of 32 needs more pixels than the pad).
MIN_TILE_PX = 32


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; otherwise the named device, checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError("not a valid torch device", value=device, fix="use 'cpu', 'cuda', 'cuda:0' or 'auto'") \
            from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but no CUDA device is available", value=str(device),
                          fix="use device='cpu' or 'auto', or run on a GPU node")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"only {torch.cuda.device_count()} CUDA device(s) present", value=str(device),
                          fix="pick an existing device index or use 'auto'")
    return dev


#: CPU runs: the network's batch when nothing is said.  Peak RSS of `histopan segment` on the quick start's
#: slide (CMU-1-Small-Region, default model, 768 + 2 x 160 px windows, 2-core CPU), measured with
#: /usr/bin/time -v: 4.6 GB at 8 tiles per batch, 2.4-2.6 GB at 2, 1.9-2.1 GB at 1 (about 1.6 GB for the
#: process plus 0.45 GB per window).  A CPU gains little from larger batches, so one window at a time keeps
#: CPU runs under 2.5 GB.
CPU_BATCH = 1
#: GPU memory (bytes) of one window in a float16 (AMP) forward pass, per pixel of the window: about 4 GiB for a
#: batch of 8 default-model windows on an H200 (workflows/batch-gpu/README.md), i.e. 460 B/px, with headroom
#: for the allocator's fragmentation and cuDNN's workspaces
GPU_BYTES_PER_PX = 600
#: the largest batch chosen automatically on a GPU (larger batches gain little and cost host memory for maps)
MAX_AUTO_BATCH = 16


def auto_batch_size(device: str | torch.device | None, window_px: int) -> int:
    """Tiles per network batch that fit the device, for square windows of ``window_px`` pixels a side.

    On a GPU: as many as half its free memory holds (:data:`GPU_BYTES_PER_PX` per window pixel), 1 to
    :data:`MAX_AUTO_BATCH`.  On the CPU: :data:`CPU_BATCH` (a CPU runs no faster with larger batches, and the
    peak memory grows with them).
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        size = max(1, min(MAX_AUTO_BATCH, int(0.5 * free // (GPU_BYTES_PER_PX * window_px * window_px))))
    else:
        size = CPU_BATCH
    log.info("network batch: %d tile(s) of %d px on %s (pass --batch-size to change it)", size, window_px, dev)
    return size


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise HistopanError("tiles must be RGB arrays shaped (N, H, W, 3) or (H, W, 3)",
                            value=tuple(tiles.shape), fix="convert the tiles to RGB first")
    if tiles.dtype != np.uint8:
        raise HistopanError("tiles must be uint8", value=str(tiles.dtype),
                            fix="convert with skimage.util.img_as_ubyte")
    if min(tiles.shape[1:3]) < MIN_TILE_PX:
        raise HistopanError(f"tiles must be at least {MIN_TILE_PX} px on each side", value=tuple(tiles.shape[1:3]),
                            fix="use larger tiles")
    return tiles


def forward_padded(network: nn.Module, images: np.ndarray, config: ModelConfig, device: torch.device, *,
                   amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Raw float32 network output (N, C, H, W) of RGB uint8 ``images`` (N, H, W, 3) or one (H, W, 3): normalised
    as ``config`` says, reflect-padded to a multiple of 32 and cropped back.  ``network`` may be any callable
    on a batch (e.g. a test-time-augmented forward); ``amp``: float16 autocast; ``channels_last``: that
    memory format for the input."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    _, h, w, _ = images.shape
    x = torch.from_numpy(np.require(images, np.uint8, ("C", "W"))).to(device, non_blocking=True)
    x = normalize_input(x, config)
    pad_h, pad_w = (-h) % INPUT_MULTIPLE, (-w) % INPUT_MULTIPLE
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        out = network(x)
    return out[:, :, :h, :w].float()


class TileInferencer:
    """Runs a model on tiles: a loaded model, or a bare ``network`` with its ``config`` (training's
    validation).  The network is moved to ``device`` (in place) and put in eval mode.

    ``batch_size`` tiles go through the network at once; ``amp`` (default: on for CUDA) enables float16
    autocast; ``channels_last`` (default: on for CUDA) sets the memory format; ``tta`` averages the logits
    over the eight flips / 90-degree rotations of each tile (see the module docstring).
    """

    def __init__(self, model: LoadedModel | nn.Module, *, config: ModelConfig | None = None,
                 device: str | torch.device | None = None, batch_size: int = 8, amp: bool | None = None,
                 channels_last: bool | None = None, tta: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size must be a positive integer", value=batch_size, fix="use e.g. 8")
        if isinstance(model, nn.Module):
            if config is None:
                raise ConfigError("a bare network needs its model config", fix="pass config=the ModelConfig")
            self.model, self.config, network = None, config, model
        else:
            self.model, self.config, network = model, model.config if config is None else config, model.network
        self.device = resolve_device(device)
        on_cuda = self.device.type == "cuda"
        self.amp = on_cuda if amp is None else bool(amp) and on_cuda
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        self.batch_size = batch_size
        if not isinstance(tta, bool):
            raise ConfigError("tta must be True or False", value=tta, fix="pass tta=True for test-time augmentation")
        self.tta = tta
        network = network.to(self.device).eval()
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.network = network
        log.debug("inference on %s (amp=%s, channels_last=%s, batch=%d)", self.device, self.amp,
                  self.channels_last, batch_size)

    @torch.inference_mode()
    def _run_batch(self, batch: np.ndarray, out_shape: tuple[int, int] | None = None) -> list[ProbabilityMaps]:
        n, h, w, _ = batch.shape
        out = forward_padded(self._tta_forward if self.tta else self.network, batch, self.config, self.device,
                             amp=self.amp, channels_last=self.channels_last)
        if out_shape is not None and tuple(out_shape) != (h, w):
            out = F.interpolate(out, size=tuple(out_shape), mode="bilinear", align_corners=False)
        probs = to_probabilities(out, self.config)
        arrays = {k: (v.float().cpu().numpy() if v is not None else None) for k, v in probs.items()}
        return [
            ProbabilityMaps(
                semantic=arrays["semantic"][i],
                centre=arrays["centre"][i],
                boundary=arrays["boundary"][i],
                types=arrays["types"][i] if arrays["types"] is not None else None,
            )
            for i in range(n)
        ]

    def _tta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean float32 logits over the eight symmetries of the square (each output transformed back)."""
        total = None
        for flip in (False, True):
            xf = torch.flip(x, dims=(3,)) if flip else x
            for k in range(4):
                xr = torch.rot90(xf, k, dims=(2, 3))
                xr = xr.contiguous(memory_format=torch.channels_last) if self.channels_last else xr.contiguous()
                out = torch.rot90(self.network(xr).float(), -k, dims=(2, 3))
                if flip:
                    out = torch.flip(out, dims=(3,))
                total = out if total is None else total + out
        return total / 8

    def predict(self, tiles: np.ndarray, out_shape: tuple[int, int] | None = None) -> list[ProbabilityMaps]:
        """Probability maps for a stack of equally sized tiles, (N, H, W, 3) or one (H, W, 3) uint8.

        ``out_shape`` resizes the logits (bilinear) to another resolution before the probabilities, e.g. to
        the data's own in training's validation."""
        tiles = _check_tiles(tiles)
        maps: list[ProbabilityMaps] = []
        for start in range(0, len(tiles), self.batch_size):
            maps.extend(self._run_batch(tiles[start:start + self.batch_size], out_shape))
        return maps

    def iter_predict(self, tiles: Iterable[np.ndarray]) -> Iterator[ProbabilityMaps]:
        """Maps for a stream of (H, W, 3) uint8 tiles, in order; consecutive tiles of one size are batched."""
        pending: list[np.ndarray] = []
        for tile in tiles:
            tile = _check_tiles(tile)[0]
            if pending and (tile.shape != pending[0].shape or len(pending) == self.batch_size):
                yield from self._run_batch(np.stack(pending))
                pending = []
            pending.append(tile)
        if pending:
            yield from self._run_batch(np.stack(pending))

    def predict_image(self, image: np.ndarray) -> ProbabilityMaps:
        """Maps for one image of any size (at the model's mpp), run in windows of the model's tile + halo.

        Images no larger than ``tile + 2 * halo`` go through in one pass; larger ones are cut into cores of
        ``tile`` pixels (the last core along an axis shifted back to end at the image edge, overlapping its
        neighbour), each run with ``halo`` pixels of context (reflected at the image edge), and the cores
        are put back together.
        """
        image = _check_tiles(image)[0]
        h, w = image.shape[:2]
        core, halo = self.config.tile, self.config.halo
        if h <= core + 2 * halo and w <= core + 2 * halo:
            return self._run_batch(image[None])[0]
        padded = np.pad(image, ((halo, halo), (halo, halo), (0, 0)), mode="reflect")
        ch, cw = min(core, h), min(core, w)
        origins = [(y, x) for y in _starts(h, core) for x in _starts(w, core)]
        windows = (padded[y:y + ch + 2 * halo, x:x + cw + 2 * halo] for y, x in origins)
        cfg = self.config
        semantic = np.empty((cfg.n_classes, h, w), np.float32)
        centre = np.empty((h, w), np.float32)
        boundary = np.empty((h, w), np.float32)
        types = np.empty((cfg.n_types, h, w), np.float32) if cfg.has_types else None
        inner = (slice(halo, halo + ch), slice(halo, halo + cw))
        for (y, x), maps in zip(origins, self.iter_predict(windows)):
            semantic[:, y:y + ch, x:x + cw] = maps.semantic[(slice(None), *inner)]
            centre[y:y + ch, x:x + cw] = maps.centre[inner]
            boundary[y:y + ch, x:x + cw] = maps.boundary[inner]
            if types is not None:
                types[:, y:y + ch, x:x + cw] = maps.types[(slice(None), *inner)]
        return ProbabilityMaps(semantic, centre, boundary, types)


def _starts(size: int, core: int) -> list[int]:
    """Core origins covering ``0..size``: every ``core`` pixels, the last one ending at ``size``."""
    if size <= core:
        return [0]
    return [*range(0, size - core, core), size - core]


def predict_maps(model: LoadedModel | nn.Module, tiles: np.ndarray, *, config: ModelConfig | None = None,
                 device: str | torch.device | None = None, batch_size: int = 8, amp: bool | None = None,
                 channels_last: bool | None = None, tta: bool = False,
                 out_shape: tuple[int, int] | None = None) -> list[ProbabilityMaps]:
    """Probability maps of tiles (N, H, W, 3) or one (H, W, 3) uint8 image, whole (no windows):
    :meth:`TileInferencer.predict` with a fresh inferencer (see it for the arguments)."""
    return TileInferencer(model, config=config, device=device, batch_size=batch_size, amp=amp,
                          channels_last=channels_last, tta=tta).predict(tiles, out_shape)
