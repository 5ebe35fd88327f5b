"""``histopan train``: AdamW + warm-up/cosine schedule, validation PQ every epoch, resume, threshold tuning.

The epoch loop, the moving average, the checkpoints and the deadline are the engine's (:mod:`.engine`, shared
with fine-tuning); this module plugs in the dense-label loss, the validation PQ and the export.

A run folder holds::

    train.yaml              the TrainConfig of the run
    metrics.jsonl           one JSON object per epoch (losses, learning rate, validation scores, time)
    curves.png              losses and validation PQ per epoch
    checkpoints/last/       weights.safetensors, optimizer.safetensors, state.json (resume point), and
                            ema.safetensors when the run keeps a moving average of the weights (``ema``)
    checkpoints/best/       weights.safetensors of the epoch with the best validation PQ (the averaged
                            weights when the run keeps a moving average)
    model/                  the exported model folder (best weights + tuned post-processing thresholds)

Everything is saved with safetensors and JSON; nothing is pickled.  Crop ``i`` of a run depends only on the
seed and ``i`` (see :class:`~histopan.training.data.CropSampler`) and the learning rate only on the step,
so resuming from ``checkpoints/last`` continues exactly as an uninterrupted run would.

Validation: each held-out image is predicted whole at the model's mpp, the probability maps are resized to
the image's own resolution and post-processed there with :func:`histopan.postprocess.postprocess_tile`, and
the instances are scored against the original labels with :func:`histopan.metrics.binary_pq` (counts summed
over images) and :func:`histopan.metrics.aji`.  Held-out tile-class tiles (their central 1024 x 1024 pixels
at most) give the stuff tile accuracy (the tile's class against the stuff class with the highest mean
probability over its non-nucleus pixels).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from histopan import __version__
from histopan.config import to_dict
from histopan.errors import ConfigError
from histopan.metrics import PQStats, aji, binary_pq
from histopan.model.checkpoint import load_model, save_model
from histopan.model.config import ModelConfig
from histopan.inference import predict_maps
from histopan.model.network import build_network, grow_heads, normalize_input, split_outputs
from histopan.postprocess import PostprocessConfig, ProbabilityMaps, postprocess_tile
from histopan.training.config import TrainConfig, TuneConfig, write_train_config
from histopan.training.data import CropSampler, Sample, TrainingData, load_training_data
from histopan.training.engine import (WEIGHTS, Engine, autocast, freeze, frozen_statistics_train_mode, hardware,
                                      jsonable, learning_rate, make_run_folder, read_state, run_folders, torch_settings,
                                      training_device)
from histopan.training.losses import distill_loss, total_loss

log = logging.getLogger(__name__)

__all__ = ["VAL_TILE_MAX", "TrainResult", "ValidationMaps", "batches", "centre_crop", "grid_search", "image_maps",
           "initial_network", "learning_rate", "score_maps", "train", "tune_postprocess", "tuning_record"]

@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    model_dir: Path
    best_epoch: int
    best_pq: float
    scores: dict[str, Any]
    postprocess: PostprocessConfig


# -- batches ---------------------------------------------------------------------------------------------
def _to_tensors(batch: dict[str, np.ndarray | torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    out = {k: torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v).to(
        device, non_blocking=non_blocking) for k, v in batch.items()}
    out["image"] = out["image"].permute(0, 3, 1, 2)
    return out


class _SamplerBatches(torch.utils.data.Dataset):
    """Batch ``step`` of a :class:`CropSampler` as a map-style data set (for worker processes)."""

    def __init__(self, sampler: CropSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self.sampler.batch(step)


def batches(sampler: CropSampler, start: int, stop: int, workers: int = 0, pin_memory: bool = False):
    """Batches ``start .. stop - 1`` of ``sampler``, made in ``workers`` background processes (0: here).

    A batch depends only on its step (see :class:`CropSampler`), so the stream is the same for any number
    of workers; the workers only keep the next batches ready while the network trains on this one.
    """
    if workers == 0:
        for step in range(start, stop):
            yield sampler.batch(step)
        return
    loader = torch.utils.data.DataLoader(
        _SamplerBatches(sampler), batch_size=None, sampler=range(start, stop), num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=4)
    yield from loader


# -- prediction and scoring ----------------------------------------------------------------------------
def image_maps(network: nn.Module, image: np.ndarray, model: ModelConfig, device: torch.device,
               out_shape: tuple[int, int] | None = None) -> ProbabilityMaps:
    """Probabilities of one whole RGB uint8 image at the model's mpp, in float32 whatever the device
    (:func:`histopan.inference.predict_maps`).  ``out_shape`` resizes the logits (bilinear) to another
    resolution, e.g. the data's own."""
    return predict_maps(network, image, config=model, device=device, amp=False, channels_last=False,
                        out_shape=out_shape)[0]


#: validation tiles of tile-class sets are scored on their central VAL_TILE_MAX x VAL_TILE_MAX pixels at most.
VAL_TILE_MAX = 1024


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` pixels of ``image`` (all of it along a shorter side)."""
    h, w = image.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[y:y + size, x:x + size]


@dataclass(frozen=True)
class ValidationMaps:
    """Predicted maps of the validation split, kept for threshold tuning."""

    nuclei: tuple[tuple[Sample, ProbabilityMaps], ...]
    tiles: tuple[tuple[Sample, ProbabilityMaps], ...]
    masks: tuple[tuple[Sample, np.ndarray], ...] = ()


def _validation_maps(network: nn.Module, data: TrainingData, config: TrainConfig,
                     device: torch.device) -> ValidationMaps:
    k = config.val_max_images
    network.eval()
    nuclei = tuple((s, image_maps(network, s.image, config.model, device, s.native_shape))
                   for s in data.val_nuclei[:k])
    tiles = tuple((s, image_maps(network, centre_crop(s.image, VAL_TILE_MAX), config.model, device))
                  for s in data.val_tiles[:k])
    # mask sets: only the tissue map is scored, so keep the stuff argmax, not the probabilities
    masks = tuple((s, tissue_labels(image_maps(network, s.image, config.model, device), config.model))
                  for s in data.val_masks)
    network.train()
    return ValidationMaps(nuclei, tiles, masks)


def tissue_labels(maps: ProbabilityMaps, model: ModelConfig) -> np.ndarray:
    """The tissue class of every pixel: the most probable stuff class, nuclei included (model class indices)."""
    stuff = np.asarray(model.stuff_indices)
    return stuff[np.argmax(maps.semantic[stuff], axis=0)].astype(np.uint8)


def _bits_classes(bits: int, n: int) -> list[int]:
    return [c for c in range(n) if bits >> c & 1]


def tissue_scores(masks: tuple[tuple[Sample, np.ndarray], ...], model: ModelConfig) -> dict[str, Any]:
    """Tissue-map scores on held-out mask-set images (at the model's mpp).

    ``tissue``: per-class IoU, accuracy and confusion matrix over the stuff classes (truth: glass ->
    background, the masked region -> its class where the set names one class, the rest -> the set's rest
    class; regions that may be one of several classes are left out); per set, ``region_iou`` (the masked
    region, e.g. gland epithelium, against everything else, any of the set's region classes counting as the
    region), ``glass_iou`` (background on glass, images with glass) and ``region_class_accuracy`` (region
    pixels predicted as a region class that get the right one, e.g. tumour vs benign epithelium, on images
    whose region has one class).  The region classes are those any mask set's region may be (e.g. tumour and
    benign epithelium: "epithelium").
    """
    from histopan.metrics import semantic_confusion, semantic_scores
    from histopan.training.data import REGION_FOREGROUND, REGION_GLASS, REGION_REST

    n = len(model.classes)
    conf = np.zeros((n, n), np.int64)
    region_classes = sorted({c for sample, _ in masks for c in _bits_classes(sample.region_bits[1], n)})
    names = [c.name for c in model.classes]
    # per set: region intersection, union; glass intersection, union; typed hits, region-class hits; images
    sums: dict[str, np.ndarray] = {}
    for sample, pred in masks:
        fg = _bits_classes(sample.region_bits[1], n)
        rest = _bits_classes(sample.region_bits[2], n)
        in_fg = sample.regions == REGION_FOREGROUND
        glass = sample.regions == REGION_GLASS
        truth = np.full(pred.shape, 255, np.uint8)
        truth[glass] = 0
        if len(rest) == 1:
            truth[sample.regions == REGION_REST] = rest[0]
        if len(fg) == 1:
            truth[in_fg] = fg[0]
        conf += semantic_confusion(truth, pred, n)
        p_fg = np.isin(pred, region_classes)
        p_bg = pred == 0
        hit = in_fg & p_fg
        typed = len(fg) == 1 and len(region_classes) > 1
        acc = sums.setdefault(sample.dataset, np.zeros(7, np.int64))
        acc += [hit.sum(), (in_fg | p_fg).sum(), (glass & p_bg).sum(), (glass | p_bg).sum() if glass.any() else 0,
                hit.sum() if typed else 0, (hit & (pred == fg[0])).sum() if typed else 0, 1]
    keep = list(model.stuff_indices)
    out: dict[str, Any] = {"tissue": semantic_scores(conf[np.ix_(keep, keep)], [names[i] for i in keep])}
    by_set = {}
    for name, (inter, union, g_inter, g_union, typed_all, typed_ok, images) in sums.items():
        entry = {"region_classes": [names[c] for c in region_classes],
                 "region_iou": inter / union if union else None,
                 "glass_iou": g_inter / g_union if g_union else None, "images": int(images)}
        if typed_all:
            entry["region_class_accuracy"] = typed_ok / typed_all
        by_set[name] = entry
    out["tissue_by_set"] = by_set
    ious = [e["region_iou"] for e in by_set.values() if e["region_iou"] is not None]
    out["tissue_region_iou"] = float(np.mean(ious)) if ious else None
    return out


def score_maps(maps: ValidationMaps, model: ModelConfig, pp: PostprocessConfig,
               with_aji: bool = True) -> dict[str, Any]:
    """Validation scores of ``maps`` post-processed with ``pp``: nucleus PQ/SQ/RQ (+ AJI), stuff accuracy."""
    total = PQStats()
    ajis, per_set = [], {}
    for sample, m in maps.nuclei:
        inst = postprocess_tile(m, sample.source_mpp, pp, model.classes).instances
        stats = binary_pq(sample.native_labels, inst)
        total = total + stats
        per_set[sample.dataset] = per_set.get(sample.dataset, PQStats()) + stats
        if with_aji:
            ajis.append(aji(sample.native_labels, inst))
    scores: dict[str, Any] = {"pq": total.pq, "sq": total.sq, "rq": total.rq, "tp": total.tp, "fp": total.fp,
                              "fn": total.fn, "pq_by_set": {k: v.pq for k, v in per_set.items()}}
    if with_aji:
        scores["aji"] = float(np.nanmean(ajis)) if ajis else math.nan
    if maps.tiles:
        stuff = list(model.stuff_indices)
        correct, true_share = 0, 0.0
        for sample, m in maps.tiles:
            not_nucleus = m.semantic[model.nucleus_index] < 0.5
            probs = m.semantic[stuff][:, not_nucleus] if not_nucleus.any() else m.semantic[stuff].reshape(len(stuff), -1)
            mean = probs.mean(axis=1)
            correct += int(stuff[int(np.argmax(mean))] == sample.stuff_class)
            true_share += float(mean[stuff.index(sample.stuff_class)] / max(float(mean.sum()), 1e-12))
        scores["stuff_tile_accuracy"] = correct / len(maps.tiles)
        # the tile's class's share of the mean stuff probability: unlike the accuracy, near-ties between two
        # classes move it a little, not by a whole tile (with ~10 validation tiles, one tile is 0.09)
        scores["stuff_tile_true_share"] = true_share / len(maps.tiles)
        scores["stuff_tiles"] = len(maps.tiles)
    if maps.masks:
        scores.update(tissue_scores(maps.masks, model))
    return scores


def grid_search(grid: TuneConfig, base: PostprocessConfig, score: Callable[[PostprocessConfig], float],
                metric: str = "pq", base_value: float | None = None, workers: int = 1
                ) -> tuple[PostprocessConfig, list[dict[str, Any]]]:
    """Every setting of ``grid`` (its :attr:`~TuneConfig.AXES`) applied to ``base`` and scored with ``score``
    (higher is better; the first of equal scores wins): the best thresholds and the trials.  ``base`` itself
    is scored first (or ``base_value``, its score where the caller has it) and kept unless a setting beats it,
    so a grid that misses the current thresholds never makes a model worse on the data it is tuned on.

    The settings are scored on ``workers`` threads (a config's ``threads``), so ``score`` must not change shared
    state.  Post-processing (scipy / scikit-image) releases the GIL, so the threads run in parallel; the
    trials and the result are those of a serial search, in the grid's order.
    """
    best_value, best_pp = (score(base) if base_value is None else base_value), base
    settings = [dict(zip(grid.AXES, values)) for values in itertools.product(*(getattr(grid, a) for a in grid.AXES))]
    candidates = [dataclasses.replace(base, **setting) for setting in settings]
    n = min(len(candidates), max(1, workers))
    if n > 1:
        with ThreadPoolExecutor(n, thread_name_prefix="histopan-tune") as pool:
            values = list(pool.map(score, candidates))
    else:
        values = [score(pp) for pp in candidates]
    trials = []
    for setting, pp, value in zip(settings, candidates, values, strict=True):
        trials.append({**setting, metric: value})
        if value > best_value:
            best_value, best_pp = value, pp
    return best_pp, trials


def tuning_record(grid: TuneConfig, trials: list[dict[str, Any]], metric: str, data: dict[str, Any],
                  before_pp: PostprocessConfig, before: dict[str, Any], after: dict[str, Any], *,
                  command: str | None = None, config_path: str | Path | None = None, tta: bool = False
                  ) -> dict[str, Any]:
    """The ``training.postprocess_tuning`` record of a threshold search (``histopan tune``, or a fine-tuning
    run's ``fit_thresholds``): the grid, the data it was scored on, the scores before and after."""
    return jsonable({
        "histopan_version": __version__,
        "command": command,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": None if config_path is None else str(config_path),
        "tta": tta,
        "metric": metric,
        "grid": to_dict(grid),
        "trials": len(trials),
        **data,
        "before": {"postprocess": to_dict(before_pp), **before},
        "validation": after,
    })


def tune_postprocess(maps: ValidationMaps, model: ModelConfig, config: TrainConfig
                     ) -> tuple[PostprocessConfig, dict[str, Any], list[dict[str, Any]]]:
    """Grid search of the post-processing thresholds (``config.tune``) for the best validation PQ."""
    best, trials = grid_search(config.tune, model.postprocess,
                               lambda pp: score_maps(maps, model, pp, with_aji=False)["pq"], workers=config.threads)
    return best, score_maps(maps, model, best), trials


# -- logging helpers -----------------------------------------------------------------------------------
def _plot(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for key in ("loss", "ce", "stuff", "dice", "centre", "boundary"):
        ax1.plot(epochs, [h["train"].get(key, math.nan) for h in history], marker=".", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (epoch mean)")
    ax1.legend()
    ax2.plot(epochs, [h["val"]["pq"] for h in history], marker="o", label="nucleus PQ")
    ax2.plot(epochs, [h["val"]["sq"] for h in history], marker=".", label="SQ")
    ax2.plot(epochs, [h["val"]["rq"] for h in history], marker=".", label="RQ")
    if history and "stuff_tile_accuracy" in history[0]["val"]:
        ax2.plot(epochs, [h["val"]["stuff_tile_accuracy"] for h in history], marker="s", label="stuff tile acc")
        ax2.plot(epochs, [h["val"].get("stuff_tile_true_share", math.nan) for h in history], marker="x",
                 label="stuff true-class share")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -- the loop ------------------------------------------------------------------------------------------
def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          data: TrainingData | None = None, stop_after: int | None = None,
          command: str | None = None, export: bool = True) -> TrainResult | None:
    """Train ``config`` into ``run_dir``; with ``resume`` continue from ``run_dir/checkpoints/last``.

    ``data`` may pass already loaded data (else it is read from the config's folders).  When all epochs are
    done (or ``max_minutes`` is reached) the best checkpoint's thresholds are tuned on the validation split
    and the model folder ``run_dir/model`` is written.  A finished run given ``resume=True`` only re-tunes and
    re-exports.  ``stop_after`` ends this call after that many epochs (a staged run, continued later
    with ``resume=True``) and then returns ``None`` without tuning or exporting.  ``command`` (the command
    line that started the run) is recorded in the model's ``training`` section.  ``export=False`` ends
    after the last epoch without tuning or exporting (returns ``None``): a later ``resume=True`` call, on any
    machine, needs only ``checkpoints/best/weights.safetensors`` and ``checkpoints/last/state.json`` to do that.
    """
    run = Path(run_dir)
    last_dir, best_dir = run_folders(run, resume, "training")
    make_run_folder(run)
    write_train_config(config, run / "train.yaml")
    device = training_device(config)
    # fixed crop size: on CUDA let cuDNN pick the fastest convolution algorithms once
    with torch_settings(config, device, cudnn_benchmark=True):
        return _train(config, run, last_dir, best_dir, device, resume, progress, data, stop_after, command, export)


def initial_network(config: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The network for ``config.model`` started from the weights of the model ``config.init`` (a warm start),
    and that model's provenance (``init_weights_sha256``, ``init_training``: its own training record).

    Channels are matched by name (:func:`~histopan.model.network.grow_heads`): classes the init model lacks
    start from a fresh initialisation, classes it has and ``config.model`` lacks are dropped.
    """
    init = load_model(config.init)
    if init.config.architecture != config.model.architecture:
        raise ConfigError(
            "init model has a different architecture from the config's model",
            path=init.path, value={"init": to_dict(init.config.architecture), "model": to_dict(config.model.architecture)},
            fix="set model.architecture to the init model's architecture, or drop 'init' to train from scratch",
        )
    same = (init.config.class_names == config.model.class_names
            and init.config.type_names == config.model.type_names)
    network = copy.deepcopy(init.network) if same else grow_heads(init.network, init.config, config.model)
    log.info("starting from the weights of %s", init.path)
    return network, {"init_weights_sha256": init.weights_sha256, "init_training": init.config.training}


def selection_score(val: dict[str, Any], config: TrainConfig) -> float:
    """What picks the best epoch: validation nucleus PQ, plus ``tissue_score_weight`` times the mean masked-region
    IoU of the mask sets when the run has them."""
    region = val.get("tissue_region_iou")
    if config.tissue_score_weight > 0 and region is not None:
        return float(val["pq"]) + config.tissue_score_weight * float(region)
    return float(val["pq"])


def _teacher(config: TrainConfig, device: torch.device) -> tuple[nn.Module, ModelConfig, torch.Tensor] | None:
    """The ``distill_from`` model (default: the ``init`` model), frozen, for ``distill``, with the student's
    channel of each of its classes."""
    if config.distill <= 0:
        return None
    init = load_model(config.distill_from or config.init)
    missing = [n for n in init.config.class_names if n not in config.model.class_names]
    if missing:
        raise ConfigError("distill needs every class of the init model in the trained model", path=init.path,
                          value=missing, fix="keep those classes in model.classes, or remove 'distill'")
    net = copy.deepcopy(init.network).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    channels = torch.tensor([config.model.class_names.index(n) for n in init.config.class_names], device=device)
    return net, init.config, channels


def _train(config: TrainConfig, run: Path, last_dir: Path, best_dir: Path, device: torch.device, resume: bool,
           progress: bool, data: TrainingData | None, stop_after: int | None,
           command: str | None, export: bool = True) -> TrainResult | None:
    started = time.time()
    if data is None:
        data = load_training_data(config)
    if not data.val_nuclei:
        raise ConfigError("no validation images: list whole images under 'val' of a nucleus set",
                          fix="hold out a few whole images (several organs / sets) for validation")
    if resume:
        finished = read_state(last_dir)
        if finished.get("done"):  # only re-tune and re-export: the best weights and the state are enough
            if not export:
                return None
            log.info("%s is a finished run: tuning and exporting its best checkpoint", run)
            return _finish(config, run, best_dir, device, data, finished, command)
    sampler = CropSampler(data, config)
    model = config.model
    provenance: dict[str, Any] = {}
    if config.init is not None and not resume:
        network, provenance = initial_network(config)
    else:
        network = build_network(model)
    network = network.to(device)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    teacher = _teacher(config, device)

    def loss(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        tensors = _to_tensors(batch, device)
        x = normalize_input(tensors["image"], model)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out = network(x)
        heads = split_outputs(out.float(), model)
        value, terms = total_loss(heads, tensors, model.nucleus_index, config.loss)
        if teacher is not None:  # keep the init model's nucleus maps where this batch does not label them
            t_net, t_config, channels = teacher
            with torch.no_grad(), autocast(device):
                t_out = t_net(x)
            keep = distill_loss(heads, split_outputs(t_out.float(), t_config), tensors, channels, config.loss,
                                t_config.nucleus_index)
            value = value + config.distill * keep
            terms["distill"] = float(keep.detach())
            terms["loss"] = float(value.detach())
        return value, terms

    def report(record: dict[str, Any], val: dict[str, Any]) -> None:
        log.info("epoch %d: loss %.4f, val PQ %.4f (SQ %.3f RQ %.3f AJI %.3f)%s%s", record["epoch"],
                 record["train"].get("loss", math.nan), val["pq"], val["sq"], val["rq"], val.get("aji", math.nan),
                 f", stuff acc {val['stuff_tile_accuracy']:.2f} (true-class share {val['stuff_tile_true_share']:.2f})"
                 if "stuff_tile_accuracy" in val else "",
                 "".join(f", {k} region IoU {v['region_iou']:.3f}" + (f" glass IoU {v['glass_iou']:.3f}"
                                                                       if v["glass_iou"] is not None else "")
                         for k, v in val.get("tissue_by_set", {}).items() if v["region_iou"] is not None))

    params = freeze(network, config.trainable)
    if config.trainable != "all":
        log.info("training the %s only (%d of %d parameters)", config.trainable, sum(p.numel() for p in params),
                 sum(p.numel() for p in network.parameters()))
    engine = Engine(config, run, device, network, params=params, loss=loss,
                    validate=lambda net: score_maps(_validation_maps(net, data, config, device), model,
                                                    model.postprocess),
                    score=lambda val: selection_score(val, config), report=report,
                    plot=lambda history: _plot(history, run / "curves.png"),
                    train_mode=nn.Module.train if config.trainable == "all" else frozen_statistics_train_mode)
    # the init model as it was when the run started (its folder may be overwritten before the export)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_pq": -1.0, "best_epoch": -1, "history": [],
                             "train_seconds": 0.0, "done": False, **provenance}
    if resume:
        state = engine.resume()
    state["hardware"] = hardware(device, config)
    state.setdefault("command", command)  # the command that started the run, kept when it is resumed
    stream = batches(sampler, state["step"], config.total_steps, config.workers, pin_memory=device.type == "cuda")
    if not engine.run_epochs(state, stream, started=started, progress=progress, stop_after=stop_after):
        return None
    if not export:
        log.info("training of %s is done; tune and export it with resume", run)
        return None
    return _finish(config, run, best_dir, device, data, state, command)


def _finish(config: TrainConfig, run: Path, best_dir: Path, device: torch.device, data: TrainingData,
            state: dict[str, Any], command: str | None) -> TrainResult:
    model = config.model
    network = build_network(model).to(device)
    network.load_state_dict(load_file(str(best_dir / WEIGHTS), device=str(device)))
    maps = _validation_maps(network, data, config, device)
    log.info("tuning post-processing thresholds on %d validation images", len(maps.nuclei))
    pp, scores, trials = tune_postprocess(maps, model, config)
    (run / "tuning.json").write_text(json.dumps(jsonable({"best": to_dict(pp), "scores": scores,
                                                          "trials": trials}), indent=1), encoding="utf-8")
    record = {
        "histopan_version": __version__,
        "command": state.get("command") or command,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "nuclei": [{"path": str(s.path), "mpp": s.mpp, "val": list(s.val)} for s in config.nuclei],
            "tiles": [{"path": str(s.path), "mpp": s.mpp, "classes": dict(s.classes), "val": list(s.val)}
                      for s in config.tiles],
            "masks": [{"path": str(s.path), "mpp": s.mpp, "foreground": dict(s.foreground), "rest": s.rest,
                       "val": list(s.val)} for s in config.masks],
            "train_mask_images": len(data.train_masks), "val_mask_images": len(data.val_masks),
            "train_images": len(data.train_nuclei), "train_tiles": len(data.train_tiles),
            "val_images": len(data.val_nuclei), "val_tiles": len(data.val_tiles),
        },
        "init": None if config.init is None else str(config.init),
        **{k: state[k] for k in ("init_weights_sha256", "init_training") if k in state},
        "steps": state["step"], "epochs": state["epoch"], "best_epoch": state["best_epoch"],
        "crop": config.crop, "batch_size": config.batch_size, "trainable": config.trainable,
        "train_minutes": round(state["train_seconds"] / 60, 1),
        # where the network was trained (a finished run may be tuned and exported on another machine)
        "hardware": state.get("hardware") or hardware(device, config),
        "validation": {"resolution": "scored at each image's own resolution", **scores},
    }
    record = jsonable(record)
    final = dataclasses.replace(model, postprocess=pp, training=record)
    model_dir = run / "model"
    save_model(model_dir, network.cpu(), final)
    log.info("exported %s: validation PQ %.4f (SQ %.3f, RQ %.3f, AJI %.3f)", model_dir, scores["pq"], scores["sq"],
             scores["rq"], scores.get("aji", math.nan))
    return TrainResult(run_dir=run, model_dir=model_dir, best_epoch=state["best_epoch"], best_pq=scores["pq"],
                       scores=scores, postprocess=pp)
