"""Re-tune a model's post-processing thresholds on a validation split, without training:
``histopan tune MODEL --config TRAIN.yaml [--tta] [--out FOLDER]``.

The network is run once over the validation images and tiles of a training config (its ``val`` lists), in
the pipeline's own windows (tile + halo, optionally with test-time augmentation), and the maps are resized
to each image's own resolution, exactly as training's validation scores them.  The config's ``tune`` grid
is then searched for the best nucleus PQ.  With ``out`` a complete model folder is written: the same
weights, ``model.yaml`` with the tuned ``postprocess`` and a ``training.postprocess_tuning`` record (the
command, the grid, the scores before and after), and the model card copied from the source folder.
With ``tta`` the maps are test-time augmented and the result goes to ``postprocess_tta`` (and the record to
``training.postprocess_tuning_tta``): runs with ``--tta`` use those thresholds, plain runs keep theirs.

Use it after a change of the post-processing (a new threshold, such as ``centre_h``), or to fit the
thresholds of a shipped model to a lab's own annotated images.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from histopan import __version__
from histopan.config import from_dict, to_dict
from histopan.errors import ConfigError
from histopan.inference import TileInferencer
from histopan.model.checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, LoadedModel, load_model
from histopan.model.config import ModelConfig
from histopan.postprocess import PostprocessConfig, ProbabilityMaps
from histopan.training.config import TrainConfig
from histopan.training.data import Sample, load_nucleus_set, load_tile_set
from histopan.training.loop import VAL_TILE_MAX, ValidationMaps, _centre_crop, _jsonable, score_maps, tune_postprocess

log = logging.getLogger(__name__)

__all__ = ["RetuneResult", "retune", "validation_maps", "write_tuned"]


@dataclass(frozen=True)
class RetuneResult:
    """Scores with the model's own thresholds (``before``) and the tuned ones (``after``)."""

    model: str
    postprocess: PostprocessConfig
    before: dict[str, Any]
    after: dict[str, Any]
    trials: list[dict[str, Any]]
    tta: bool
    out: Path | None


def _resized(maps: ProbabilityMaps, shape: Sequence[int] | None) -> ProbabilityMaps:
    """``maps`` resized (bilinear) to ``shape``, the image's own resolution; unchanged when it already is."""
    if shape is None or tuple(shape) == maps.shape:
        return maps

    def up(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(a if a.ndim == 3 else a[None])[None]
        out = F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0].numpy()
        return out if a.ndim == 3 else out[0]

    return ProbabilityMaps(up(maps.semantic), up(maps.centre), up(maps.boundary),
                           None if maps.types is None else up(maps.types))


def _validation_samples(model: LoadedModel, config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    nuclei: list[Sample] = []
    tiles: list[Sample] = []
    for nset in config.nuclei:
        nuclei += load_nucleus_set(nset, model.config.mpp, config.crop)[1]
    for tset in config.tiles:
        tiles += load_tile_set(tset, model.config, config.crop)[1]
    if not nuclei:
        raise ConfigError("the config's nucleus data sets have no validation images to tune on",
                          value=[str(n.path) for n in config.nuclei],
                          fix="list some images under 'val' of a nucleus set")
    k = config.val_max_images
    return nuclei[:k], tiles[:k]


def validation_maps(model: LoadedModel, config: TrainConfig, *, tta: bool = False,
                    device: str | torch.device | None = None) -> ValidationMaps:
    """Maps of the config's validation images (at their own resolution) and tiles, from the pipeline's
    tile + halo windows (:meth:`TileInferencer.predict_image`), optionally with TTA."""
    nuclei, tiles = _validation_samples(model, config)
    inferencer = TileInferencer(model, device=device, tta=tta)
    return ValidationMaps(
        tuple((s, _resized(inferencer.predict_image(s.image), s.native_shape)) for s in nuclei),
        tuple((s, inferencer.predict_image(_centre_crop(s.image, VAL_TILE_MAX))) for s in tiles),
    )


def write_tuned(loaded: LoadedModel, config: ModelConfig, out: Path) -> Path:
    """Write ``loaded``'s model folder to ``out`` with ``config`` as its ``model.yaml``.

    The weights file is copied byte for byte (its sha256, which provenance and derived models record, stays
    the same) and the card is copied; every file goes in under a temporary name and is then renamed, so a
    reader never sees a half-written folder.  ``out`` may be the model's own folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    from_dict(ModelConfig, yaml.safe_load(text), source=out / CONFIG_FILE)  # reads back, before any write
    sources = {CONFIG_FILE: text}
    if out.resolve() != loaded.path.resolve():
        sources[WEIGHTS_FILE] = loaded.path / WEIGHTS_FILE
        if (loaded.path / CARD_FILE).is_file():
            sources[CARD_FILE] = loaded.path / CARD_FILE
    for name, source in sources.items():
        tmp = out / f".{name}.tmp-{os.getpid()}"
        try:
            if isinstance(source, Path):
                shutil.copyfile(source, tmp)
            else:
                tmp.write_text(source, encoding="utf-8")
            os.replace(tmp, out / name)
        finally:
            if tmp.exists():
                tmp.unlink()
    log.info("wrote the re-tuned model %r to %s", config.name, out)
    return out


def retune(model: str | Path, config: TrainConfig, *, tta: bool = False, device: str | torch.device | None = None,
           out: str | Path | None = None, command: str | None = None, config_path: str | Path | None = None
           ) -> RetuneResult:
    """Search ``config.tune`` for the thresholds with the best validation PQ of ``model``; see the module
    docstring.  With ``out``, write the re-tuned model folder there (it may be the model's own folder)."""
    loaded = load_model(model)
    started = time.perf_counter()
    maps = validation_maps(loaded, config, tta=tta, device=device)
    mc = loaded.config
    run_config = mc.for_tta(tta)  # a TTA tuning starts from (and replaces) the model's TTA thresholds, if any
    before = score_maps(maps, run_config, run_config.postprocess)
    best, after, trials = tune_postprocess(maps, run_config, config)
    seconds = time.perf_counter() - started
    log.info("validation PQ %.4f with the model's thresholds, %.4f tuned (%d trials, %.0f s)", before["pq"],
             after["pq"], len(trials), seconds)
    written = None
    if out is not None:
        record = dict(mc.training or {})
        record["postprocess_tuning_tta" if tta else "postprocess_tuning"] = _jsonable({
            "histopan_version": __version__,
            "command": command,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": None if config_path is None else str(config_path),
            "tta": tta,
            "grid": to_dict(config.tune),
            "trials": len(trials),
            "validation_images": len(maps.nuclei), "validation_tiles": len(maps.tiles),
            "before": {"postprocess": to_dict(run_config.postprocess), **before},
            "validation": {"resolution": "scored at each image's own resolution", **after},
        })
        final = (dataclasses.replace(mc, postprocess_tta=best, training=record) if tta
                 else dataclasses.replace(mc, postprocess=best, training=record))
        written = write_tuned(loaded, final, Path(out))
    return RetuneResult(model=str(model), postprocess=best, before=before, after=after, trials=trials, tta=tta,
                        out=written)

