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

With a fine-tuning config (``--points``) the maps are those of its held-back images with point annotations
(e.g. nuclei clicked in QuPath), and the grid is searched for the best point detection F1 within the
config's ``test.radius_um``: thresholds fitted to what a lab clicked, with no outlines drawn.

Use it after a change of the post-processing (a new threshold, such as ``centre_h``), or to fit the
thresholds of a shipped model to a lab's own annotated images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from histopan.checks import check_output
from histopan.errors import ConfigError, OutputError
from histopan.inference import TileInferencer
from histopan.model.checkpoint import LoadedModel, load_model, save_config
from histopan.postprocess import PostprocessConfig, ProbabilityMaps
from histopan.training.config import FinetuneConfig, TrainConfig
from histopan.training.data import Sample, load_nucleus_set, load_tile_set
from histopan.training.finetune import point_items, search_point_thresholds
from histopan.training.loop import VAL_TILE_MAX, ValidationMaps, centre_crop, grid_search, score_maps, tuning_record
from histopan.training.sparse_data import load_finetune_data

log = logging.getLogger(__name__)

__all__ = ["RetuneResult", "point_maps", "retune", "validation_maps"]


@dataclass(frozen=True)
class RetuneResult:
    """Scores with the model's own thresholds (``before``) and the tuned ones (``after``)."""

    model: str
    postprocess: PostprocessConfig
    metric: str  # "pq" (a training config's val images) or "detection_f1" (a fine-tuning config's points)
    before: dict[str, Any]
    after: dict[str, Any]
    trials: list[dict[str, Any]]
    tta: bool
    out: Path | None

    def value(self, scores: dict[str, Any]) -> float:
        """The tuned figure in ``scores`` (``before`` or ``after``)."""
        return scores["pq"] if self.metric == "pq" else scores["detection"]["f1"]


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
                    device: str | torch.device | None = None, tiles: bool = True) -> ValidationMaps:
    """Maps of the config's validation images (at their own resolution) and, unless ``tiles`` is false, its
    validation tiles, from the pipeline's tile + halo windows (:meth:`TileInferencer.predict_image`),
    optionally with TTA."""
    nuclei, tile_samples = _validation_samples(model, config)
    inferencer = TileInferencer(model, device=device, tta=tta)
    return ValidationMaps(
        tuple((s, _resized(inferencer.predict_image(s.image), s.native_shape)) for s in nuclei),
        tuple((s, inferencer.predict_image(centre_crop(s.image, VAL_TILE_MAX))) for s in tile_samples)
        if tiles else (),
    )


def point_maps(model: LoadedModel, config: FinetuneConfig, *, tta: bool = False,
               device: str | torch.device | None = None) -> tuple[list[tuple], list[ProbabilityMaps]]:
    """The held-back images of a fine-tuning config that carry point annotations (at the model's mpp), and
    their maps from the pipeline's tile + halo windows, optionally with TTA."""
    items = point_items(load_finetune_data(config, model.config).val)
    if not items:
        raise ConfigError("the fine-tuning config holds back no image with point annotations to tune on",
                          value=config.name, fix="name some annotated images under 'val' of an annotation set")
    inferencer = TileInferencer(model, device=device, tta=tta)
    return items, [inferencer.predict_image(image) for _, image, _, _ in items]


def retune(model: str | Path, config: TrainConfig | FinetuneConfig, *, tta: bool = False,
           device: str | torch.device | None = None, out: str | Path | None = None, command: str | None = None,
           config_path: str | Path | None = None) -> RetuneResult:
    """Search ``config.tune`` for the thresholds that score best on ``config``'s validation data; see the
    module docstring.  A :class:`TrainConfig` scores nucleus PQ on its ``val`` images; a
    :class:`FinetuneConfig` scores point detection F1 on its held-back point annotations.  With ``out``,
    write the re-tuned model folder there (it may be the model's own folder)."""
    if out is not None:
        check_output(out, folder=True)  # refused before the model is read and the grid searched
    loaded = load_model(model)
    started = time.perf_counter()
    mc = loaded.config
    run_config = mc.for_tta(tta)  # a TTA tuning starts from (and replaces) the model's TTA thresholds, if any
    if isinstance(config, FinetuneConfig):
        items, pmaps = point_maps(loaded, config, tta=tta, device=device)
        metric = "detection_f1"
        best, trials, before, after, data = search_point_thresholds(items, pmaps, run_config, config.tune,
                                                                    config.test.radius_um, config.threads)
    else:
        maps = validation_maps(loaded, config, tta=tta, device=device)

        def scores(pp: PostprocessConfig) -> dict[str, Any]:
            return {"resolution": "scored at each image's own resolution", **score_maps(maps, run_config, pp)}

        def trial(pp: PostprocessConfig) -> float:  # the trials skip AJI
            return score_maps(maps, run_config, pp, with_aji=False)["pq"]

        metric = "pq"
        data = {"validation_images": len(maps.nuclei), "validation_tiles": len(maps.tiles)}
        before = scores(run_config.postprocess)
        best, trials = grid_search(config.tune, run_config.postprocess, trial, metric, base_value=before["pq"],
                                   workers=config.threads)
        after = before if best == run_config.postprocess else scores(best)
    written = None
    if out is not None:
        record = dict(mc.training or {})
        record["postprocess_tuning_tta" if tta else "postprocess_tuning"] = tuning_record(
            config.tune, trials, metric, data, run_config.postprocess, before, after, command=command,
            config_path=config_path, tta=tta)
        final = (dataclasses.replace(mc, postprocess_tta=best, training=record) if tta
                 else dataclasses.replace(mc, postprocess=best, training=record))
        try:
            written = save_config(loaded, final, out)
        except OSError as exc:  # e.g. a read-only or full file system, which the check above cannot see
            raise OutputError(f"writing the re-tuned model failed: {exc.strerror or exc}", path=out,
                              fix="choose an --out folder you can write to, with free space") from exc
    result = RetuneResult(model=str(model), postprocess=best, metric=metric, before=before, after=after,
                          trials=trials, tta=tta, out=written)
    log.info("%s %.4f with the model's thresholds, %.4f tuned (%d trials, %.0f s)", metric, result.value(before),
             result.value(after), len(trials), time.perf_counter() - started)
    return result
