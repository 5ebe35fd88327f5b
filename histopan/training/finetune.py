"""Sparse-label fine-tuning: ``histopan finetune CONFIG.yaml`` (see :class:`~.config.FinetuneConfig`).

Starts from a model folder, grows its heads for new stuff classes or nucleus types (the existing channels
keep their weights, :func:`~histopan.model.network.grow_heads`), optionally freezes the encoder (or
everything but the final convolution; batch-norm statistics stay the base model's), and trains on sparse
targets (:mod:`.sparse`, :mod:`.sparse_data`) with the masked losses of :mod:`.losses`.

Each epoch a score on the held-back images (``early_stopping``: the masked loss by default, or point
detection F1, type accuracy / F1, tile accuracy) picks the best checkpoint; the run stops after
``patience`` epochs without improvement.  The held-back part and the optional test sets are scored before
(the base model) and after (the best epoch): held-back loss and point detection, test-set point detection
and per-type F1, nucleus PQ and tile accuracy.  The run folder holds::

    finetune.yaml  metrics.jsonl  curves.png  scores.json  checkpoints/{last,best}/  model/

The epoch loop, checkpoints, moving average and deadline are the training engine's (:mod:`.engine`, shared with
``histopan train``).  ``model/`` is a model folder (weights, ``model.yaml`` with the base model's post-processing thresholds and a
``training`` record, and a ``README.md`` card with the before / after figures) usable by
``histopan segment --model``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from histopan import __version__
from histopan.errors import ConfigError, DataError
from histopan.metrics import classification_f1, point_detection
from histopan.model.checkpoint import LoadedModel, load_model, save_model
from histopan.model.config import ModelConfig
from histopan.inference import forward_padded
from histopan.model.network import grow_heads, normalize_input, split_outputs
from histopan.postprocess import PostprocessConfig, ProbabilityMaps, postprocess_tile
from histopan.training.config import FinetuneConfig, TuneConfig, write_finetune_config
from histopan.training.data import meta_mpp, load_nucleus_set, load_tile_set, read_rgb, resample_image
from histopan.training.engine import (WEIGHTS, Engine, autocast, freeze, frozen_statistics_train_mode, hardware,
                                      jsonable, make_run_folder, run_folders, torch_settings, training_device)
from histopan.training.loop import (VAL_TILE_MAX, ValidationMaps, centre_crop, grid_search, image_maps, score_maps,
                                    tuning_record)
from histopan.training.losses import distill_loss, total_loss
from histopan.training.sparse import SparseTargets
from histopan.training.sparse_data import (FinetuneData, SparseCropSampler, SparseSample, type_name_points,
                                           load_finetune_data, read_points, stack_batch)

log = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "build_finetune_model", "evaluate_tests", "finetune", "fit_point_thresholds",
           "point_items", "point_scores", "score_points", "search_point_thresholds", "types_at_points"]


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    best_epoch: int
    before: dict[str, Any]
    after: dict[str, Any]


# -- the model to fine-tune ----------------------------------------------------------------------------
def build_finetune_model(base: LoadedModel, config: FinetuneConfig) -> tuple[nn.Module, ModelConfig]:
    """The base network grown for ``config``'s new classes / types, and the new model config."""
    old = base.config
    names = set(old.class_names)
    clash = [c.name for c in config.add_classes if c.name in names]
    if clash:
        raise ConfigError("add_classes names classes the base model already has", value=clash,
                          fix=f"the base model {old.name!r} has {list(old.class_names)}; add only new ones")
    types = list(config.nucleus_types) if config.nucleus_types else list(old.nucleus_types)
    new = dataclasses.replace(old, name=config.name, classes=(*old.classes, *config.add_classes),
                              nucleus_types=tuple(types), training={})
    network = copy.deepcopy(base.network)
    if new.n_outputs != old.n_outputs or new.class_names != old.class_names or new.type_names != old.type_names:
        network = grow_heads(base.network, old, new)
    return network, new


def type_weights(samples: Sequence[SparseSample], model: ModelConfig, balance: float) -> torch.Tensor | None:
    """Per-type loss weights ``(n / (K n_t)) ** balance`` from the typed pixels of ``samples`` (None for balance 0).

    ``n_t`` counts the pixels labelled with type t, ``K`` the types that occur; a type that never occurs
    gets weight 1 (it has no pixel to weigh).  Balance 1 makes every type weigh alike in the loss.
    """
    if balance == 0 or not model.has_types:
        return None
    counts = np.zeros(model.n_types, dtype=np.float64)
    for s in samples:
        t = s.targets.types
        counts += np.bincount(t[t >= 0].ravel(), minlength=model.n_types)[: model.n_types]
    present = counts > 0
    if not present.any():
        return None
    weights = np.ones(model.n_types)
    weights[present] = (counts[present].sum() / (present.sum() * counts[present])) ** balance
    return torch.tensor(weights, dtype=torch.float32)


# -- scoring ---------------------------------------------------------------------------------------------
def heldback_loss(network: nn.Module, samples: Sequence[SparseSample], model: ModelConfig, config: FinetuneConfig,
                  device: torch.device, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Masked loss terms on whole held-back images (no augmentation), averaged over images.

    ``weights``: the type loss weights of the training run (see :func:`type_weights`).
    """
    if not samples:
        return {}
    sums: dict[str, float] = {}
    network.eval()
    with torch.no_grad():
        for s in samples:
            image = centre_crop(s.image, VAL_TILE_MAX)
            targets = SparseTargets.from_layers([centre_crop(a, VAL_TILE_MAX) for a in s.targets.layers()])
            out = forward_padded(network, image, model, device)
            batch = {k: torch.from_numpy(v).to(device) for k, v in stack_batch([image], [targets]).items()}
            _, terms = total_loss(split_outputs(out, model), batch, model.nucleus_index, config.loss, weights)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(samples) for k, v in sums.items()}


def point_scores(network: nn.Module, items: Sequence[tuple[str, np.ndarray, np.ndarray, tuple]], model: ModelConfig,
                 device: torch.device, radius_um: float) -> dict[str, Any]:
    """Point detection P / R / F1, per-type F1 and type accuracy of predicted nuclei against annotated points.

    ``items`` are ``(name, image at the model's mpp, points (n, 2) x, y in its pixels, type names)``.
    Per-type F1 follows HoVer-Net's CRC convention (:func:`histopan.metrics.point_detection`);
    ``type_weighted_f1`` is the support-weighted F1 of the types of matched nuclei.  ``types_at_points``
    classifies every typed annotated point, detected or not (:func:`types_at_points`, a disc of
    :data:`POINT_TYPE_RADIUS_UM`): the protocol of Sirinukunwattana et al. 2016, who classify given nuclei.
    """
    network.eval()
    with torch.no_grad():
        maps = [image_maps(network, image, model, device) for _, image, _, _ in items]
    return score_points(items, maps, model, radius_um)


def score_points(items: Sequence[tuple[str, np.ndarray, np.ndarray, tuple]], maps: Sequence[ProbabilityMaps],
                 model: ModelConfig, radius_um: float) -> dict[str, Any]:
    """:func:`point_scores` of maps already computed (one per item, at the model's mpp), post-processed
    with ``model.postprocess``: e.g. to search thresholds without running the network again."""
    total = None
    pairs_t, pairs_p = [], []
    for (name, _image, xy, names), m in zip(items, maps, strict=True):
        labels = postprocess_tile(m, model.mpp, model.postprocess, model.classes)
        table = labels.nuclei
        pred_xy = np.stack([table["centroid_x"].to_numpy() + 0.5, table["centroid_y"].to_numpy() + 0.5], axis=1)
        pred_types = [model.type_names[int(t)] if model.has_types and t >= 0 else None for t in table["type"]]
        typed = model.has_types and any(n is not None for n in names)
        res = point_detection(xy, pred_xy, radius_um / model.mpp, names if typed else None,
                              pred_types if typed else None, name=name)
        total = res if total is None else total + res
        if typed:
            for i, j in res.pairs:
                if names[i] is not None:
                    pairs_t.append(names[i])
                    pairs_p.append(pred_types[j])
    if total is None:
        return {}
    out: dict[str, Any] = {"detection": total.to_dict(), "images": len(items)}
    if total.per_class:
        out["types"] = {n: c.to_dict() for n, c in total.per_class.items()}
        out["type_accuracy"] = total.type_accuracy
    if pairs_t:
        out["type_weighted_f1"] = classification_f1(pairs_t, pairs_p)["weighted_f1"]
    if model.has_types:
        truth, pred = [], []
        for (_name, _image, xy, names), m in zip(items, maps, strict=True):
            typed = [i for i, n in enumerate(names) if n is not None]
            if typed and m.types is not None:
                truth += [names[i] for i in typed]
                found = types_at_points(m.types, xy[typed], POINT_TYPE_RADIUS_UM / model.mpp)
                pred += [model.type_names[k] for k in found]
        if truth:
            out["types_at_points"] = classification_f1(truth, pred)
    return out


# The disc around an annotated point whose mean type probabilities classify it (about a nucleus core).
POINT_TYPE_RADIUS_UM = 2.0


def types_at_points(types: np.ndarray, xy: np.ndarray, radius_px: float) -> np.ndarray:
    """The type index of each point ``(x, y)`` (pixels, origin at the top-left corner of the image): the
    argmax of the type probabilities ``types`` (K, H, W) averaged over the pixels whose centres lie within
    ``radius_px`` of it (the pixel under the point when none does)."""
    _, h, w = types.shape
    out = np.empty(len(xy), dtype=np.int64)
    r = int(np.ceil(radius_px))
    for i, (x, y) in enumerate(np.asarray(xy, dtype=np.float64)):
        cx, cy = min(w - 1, max(0, int(x))), min(h - 1, max(0, int(y)))
        y0, y1, x0, x1 = max(0, cy - r), min(h, cy + r + 1), max(0, cx - r), min(w, cx + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = (yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2 <= radius_px ** 2
        window = types[:, y0:y1, x0:x1]
        mean = window[:, disc].mean(axis=1) if disc.any() else types[:, cy, cx]
        out[i] = int(np.argmax(mean))
    return out


def point_items(samples: Sequence[SparseSample]) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    """``(name, image, points, point types)`` of the samples that have point annotations."""
    return [(s.name, s.image, s.points, s.point_types) for s in samples if len(s.points)]


def _heldback_points(samples: Sequence[SparseSample], config: FinetuneConfig) -> list[tuple]:
    items = point_items(samples)
    if not items:
        raise ConfigError("fit_thresholds needs held-back images with point annotations", value=config.name,
                          fix="name some point-annotated images under 'val' of an annotation set, "
                              "or set fit_thresholds: false")
    return items


# What ``early_stopping`` compares, from a ``_scores`` dict, as "higher is better" (None: not measured).
STOPPING_SCORES = {
    "loss": ("held-back masked loss", lambda v: -float(v["loss"]["loss"])),
    "point_f1": ("held-back point detection F1", lambda v: v.get("points", {}).get("detection", {}).get("f1")),
    "type_accuracy": ("held-back type accuracy", lambda v: v.get("points", {}).get("type_accuracy")),
    "type_f1": ("held-back type weighted F1", lambda v: v.get("points", {}).get("type_weighted_f1")),
    "point_type_f1": ("held-back type weighted F1 at every typed point",
                      lambda v: v.get("points", {}).get("types_at_points", {}).get("weighted_f1")),
    "tile_accuracy": ("held-back tile accuracy", lambda v: v.get("tile_accuracy")),
}


def stopping_score(val: dict[str, Any], criterion: str) -> float:
    """The ``early_stopping`` score of held-back scores ``val`` (higher is better; -inf when not measured,
    e.g. the type accuracy of a base model without a type head)."""
    score = STOPPING_SCORES[criterion][1](val)
    return -math.inf if score is None else float(score)


def _check_stopping(config: FinetuneConfig, data: FinetuneData, model: ModelConfig) -> None:
    """Refuse an ``early_stopping`` criterion the held-back part cannot measure, before training."""
    criterion = config.early_stopping
    typed = criterion in ("type_accuracy", "type_f1", "point_type_f1")
    if (criterion == "point_f1" or typed) and not point_items(data.val):
        raise ConfigError(f"early_stopping: {criterion} needs held-back images with point annotations",
                          value=criterion, fix="name some point-annotated images under 'val' of an annotation "
                                               "set, or use early_stopping: loss")
    if typed and not (
            model.has_types and any(t is not None for s in data.val for t in s.point_types)):
        raise ConfigError(f"early_stopping: {criterion} needs held-back points with a nucleus type",
                          value=criterion, fix="hold back images with typed points (and give 'nucleus_types'), "
                                               "or use early_stopping: point_f1 or loss")
    if criterion == "tile_accuracy" and not data.val_tiles:
        raise ConfigError("early_stopping: tile_accuracy needs held-back tile-class tiles", value=criterion,
                          fix="give a tile set a 'val' list, or use early_stopping: loss")


def search_point_thresholds(items: Sequence[tuple[str, np.ndarray, np.ndarray, tuple]],
                            maps: Sequence[ProbabilityMaps], model: ModelConfig, grid: TuneConfig, radius_um: float,
                            workers: int = 1):
    """Search ``grid`` for the best point detection F1 of precomputed ``maps`` (on ``workers`` threads): the best
    thresholds, the trials, the scores with ``model.postprocess`` and with the best, and what they were scored
    on."""
    def scores(pp: PostprocessConfig) -> dict[str, Any]:
        return score_points(items, maps, dataclasses.replace(model, postprocess=pp), radius_um)

    before = scores(model.postprocess)
    best, trials = grid_search(grid, model.postprocess, lambda pp: scores(pp)["detection"]["f1"], "detection_f1",
                               base_value=before["detection"]["f1"], workers=workers)
    data = {"heldback_point_images": len(items), "points": int(sum(len(it[2]) for it in items)),
            "radius_um": radius_um}
    return best, trials, before, (before if best == model.postprocess else scores(best)), data


def fit_point_thresholds(network: nn.Module, model: ModelConfig, samples: Sequence[SparseSample],
                         config: FinetuneConfig, device: torch.device,
                         command: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Search ``config.tune`` for the thresholds with the best point detection F1 on the held-back ``samples``
    (their point annotations; the maps are computed once): ``model`` with those thresholds, and the record
    (the shape ``histopan tune --points`` writes to ``training.postprocess_tuning``)."""
    items = _heldback_points(samples, config)
    network.eval()
    with torch.no_grad():
        maps = [image_maps(network, image, model, device) for _, image, _, _ in items]
    best, trials, before, after, data = search_point_thresholds(items, maps, model, config.tune, config.test.radius_um,
                                                                config.threads)
    record = tuning_record(config.tune, trials, "detection_f1", data, model.postprocess, before, after,
                           command=command)
    log.info("thresholds fitted to %d held-back point images: detection F1 %.4f -> %.4f (%d trials)", len(items),
             record["before"]["detection"]["f1"], record["validation"]["detection"]["f1"], len(trials))
    return dataclasses.replace(model, postprocess=best), record


@dataclass(frozen=True)
class HeldOutData:
    points: tuple[tuple[str, np.ndarray, np.ndarray, tuple], ...]
    nuclei: tuple
    tiles: tuple


def load_test_data(config: FinetuneConfig, model: ModelConfig) -> HeldOutData:
    """The test sets of ``config`` (every image / tile of each set) at ``model``'s mpp."""
    from histopan.export.geojson import read_geojson
    from histopan.training.sparse import resolve_classes

    points = []
    for pset in config.test.points:
        images, geo = Path(pset.images), Path(pset.geojson)
        mpp = meta_mpp(images.parent, pset.mpp)
        for gpath in sorted(geo.glob("*.geojson")):
            stem = gpath.name[: -len(".geojson")]
            matches = [p for p in images.glob(f"{stem}.*")]
            if not matches:
                raise DataError("test GeoJSON without an image of the same name", path=gpath,
                                fix="name each file after its image")
            annotations = read_geojson(gpath)
            seen = sorted({a.class_name for a in annotations if a.class_name is not None})
            mapping = resolve_classes(pset.classes, model.class_names,
                                      [model.classes[i].name for i in model.stuff_indices],
                                      model.classes[model.nucleus_index].name, model.type_names, seen, gpath)
            image = resample_image(read_rgb(matches[0]), mpp, model.mpp)
            xy, cls = read_points(annotations, mpp / model.mpp, mapping)
            points.append((stem, image, xy, type_name_points(cls, mapping, model.type_names)))
    nuclei, tiles = [], []
    for nset in config.test.nuclei:
        names = tuple(p.stem for p in sorted((Path(nset.path) / "images").iterdir()))
        _, v = load_nucleus_set(dataclasses.replace(nset, val=names), model.mpp, 1)
        nuclei += v
    for tset in config.test.tiles:
        stems = tuple(p.stem for sub in sorted(Path(tset.path).iterdir()) if sub.is_dir()
                      and tset.classes.get(sub.name) is not None for p in sorted(sub.iterdir()))
        _, v = load_tile_set(dataclasses.replace(tset, val=stems), model, 1)
        tiles += v
    return HeldOutData(tuple(points), tuple(nuclei), tuple(tiles))


def _remap_tiles(tiles, data_model: ModelConfig, model: ModelConfig):
    """Tile samples whose class index follows ``data_model`` -> ``model``'s index (by name); unknown dropped."""
    out = []
    for s in tiles:
        name = data_model.class_names[s.stuff_class]
        if name in model.class_names:
            out.append(dataclasses.replace(s, stuff_class=model.class_names.index(name)))
    return out


def evaluate_tests(network: nn.Module, model: ModelConfig, tests: HeldOutData, data_model: ModelConfig,
                   device: torch.device, radius_um: float) -> dict[str, Any]:
    """Scores of ``network`` (configured by ``model``) on the test sets (loaded for ``data_model``)."""
    out: dict[str, Any] = {}
    if tests.points:
        out["points"] = point_scores(network, tests.points, model, device, radius_um)
    if tests.nuclei or tests.tiles:
        network.eval()
        tiles = _remap_tiles(tests.tiles, data_model, model)
        maps = ValidationMaps(
            nuclei=tuple((s, image_maps(network, s.image, model, device, s.native_shape)) for s in tests.nuclei),
            tiles=tuple((s, image_maps(network, centre_crop(s.image, VAL_TILE_MAX), model, device)) for s in tiles))
        scores = score_maps(maps, model, model.postprocess)
        if tests.nuclei:
            out["nuclei"] = {k: scores[k] for k in ("pq", "sq", "rq", "aji", "tp", "fp", "fn", "pq_by_set")}
        if tests.tiles:
            out["tiles"] = {"accuracy": scores.get("stuff_tile_accuracy", 0.0) * len(tiles) / len(tests.tiles)
                            if tiles else 0.0, "tiles": len(tests.tiles), "scorable": len(tiles)}
    return out


def _tile_accuracy(network: nn.Module, samples: Sequence[SparseSample], model: ModelConfig,
                   device: torch.device) -> float | None:
    if not samples:
        return None
    from histopan.training.data import Sample

    tiles = tuple((Sample(s.name, s.dataset, s.image, None, s.stuff_class, model.mpp),
                   image_maps(network, centre_crop(s.image, VAL_TILE_MAX), model, device)) for s in samples)
    return score_maps(ValidationMaps((), tiles), model, model.postprocess)["stuff_tile_accuracy"]


def _scores(network: nn.Module, data: FinetuneData, model: ModelConfig, config: FinetuneConfig,
            device: torch.device, weights: torch.Tensor | None, with_points: bool = True) -> dict[str, Any]:
    val = {"loss": heldback_loss(network, (*data.val, *data.val_tiles), model, config, device, weights)}
    items = point_items(data.val)
    if with_points and items:
        val["points"] = point_scores(network, items, model, device, config.test.radius_um)
    acc = _tile_accuracy(network, data.val_tiles, model, device)
    if acc is not None:
        val["tile_accuracy"] = acc
    return val


# -- the loop ------------------------------------------------------------------------------------------------
def finetune(config: FinetuneConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
             command: str | None = None, stop_after: int | None = None) -> FinetuneResult | None:
    """Fine-tune ``config.base`` on the sparse data of ``config`` into ``run_dir`` (see the module docstring).

    ``stop_after`` ends this call after that many epochs (continue with ``resume=True``) and returns None.
    """
    run = Path(run_dir)
    last_dir, best_dir = run_folders(run, resume, "fine-tuning")
    device = training_device(config)
    base = load_model(config.base)
    torch.manual_seed(config.seed)  # the new head channels' initialisation
    network, model = build_finetune_model(base, config)
    data = load_finetune_data(config, model)
    if not (data.val or data.val_tiles):
        raise ConfigError("nothing is held back for early stopping", value=config.val_fraction,
                          fix="annotate at least two images (or list some under 'val', or give tiles a 'val' list)")
    if config.fit_thresholds:
        _heldback_points(data.val, config)  # refused before training, not after
    _check_stopping(config, data, model)
    tests = load_test_data(config, model)
    make_run_folder(run)
    write_finetune_config(config, run / "finetune.yaml")

    with torch_settings(config, device):
        return _finetune(config, run, last_dir, best_dir, device, base, network, model, data, tests, resume,
                         progress, command, stop_after)


def _finetune(config: FinetuneConfig, run: Path, last_dir: Path, best_dir: Path, device: torch.device,
              base: LoadedModel, network: nn.Module, model: ModelConfig, data: FinetuneData, tests: HeldOutData,
              resume: bool, progress: bool, command: str | None, stop_after: int | None) -> FinetuneResult | None:
    started = time.time()
    network = network.to(device)
    params = freeze(network, config.trainable)
    sampler = SparseCropSampler(data, config)
    weights = type_weights(data.train, model, config.type_balance)
    if weights is not None:
        log.info("type loss weights: %s", ", ".join(f"{n} {w:.2f}" for n, w in zip(model.type_names, weights.tolist())))
    scores_path = run / "scores.json"
    teacher = None
    if config.distill > 0:  # the base model, frozen, for "learning without forgetting"
        teacher = copy.deepcopy(base.network).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        channels = torch.tensor([model.class_names.index(n) for n in base.config.class_names], device=device)

    def loss(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
        x = normalize_input(tensors["image"], model)
        with autocast(device):
            out = network(x)
        heads = split_outputs(out.float(), model)
        value, terms = total_loss(heads, tensors, model.nucleus_index, config.loss, weights)
        if teacher is not None:
            with torch.no_grad(), autocast(device):
                t_out = teacher(x)
            keep = distill_loss(heads, split_outputs(t_out.float(), base.config), tensors, channels, config.loss,
                                base.config.nucleus_index)
            value = value + config.distill * keep
            terms["distill"] = float(keep.detach())
            terms["loss"] = float(value.detach())
        return value, terms

    def report(record: dict[str, Any], val: dict[str, Any]) -> None:
        det = val.get("points", {}).get("detection", {}).get("f1")
        log.info("epoch %d: train loss %.4f, held-back loss %.4f%s", record["epoch"],
                 record["train"].get("loss", math.nan), float(val["loss"]["loss"]),
                 "" if det is None else f", held-back point F1 {det:.3f}")

    # the moving average (``ema``) is what is scored, kept as the best checkpoint and exported
    engine = Engine(config, run, device, network, params=params, loss=loss,
                    validate=lambda net: _scores(net, data, model, config, device, weights),
                    score=lambda val: stopping_score(val, config.early_stopping), report=report,
                    plot=lambda history: _plot(history, before, run / "curves.png"), best_key="best_score",
                    patience=config.patience, patience_what=STOPPING_SCORES[config.early_stopping][0],
                    train_mode=frozen_statistics_train_mode)
    if resume:
        state = engine.resume()
        if "best_score" not in state:  # a run started before early_stopping had a choice: the loss
            state["best_score"] = -float(state.pop("best_loss"))
        before = json.loads(scores_path.read_text(encoding="utf-8"))["before"]
    else:
        log.info("scoring the base model %r before fine-tuning", base.name)
        base_net = base.network.to(device)
        before = {"val": _scores(network, data, model, config, device, weights, with_points=False),
                  "test": evaluate_tests(base_net, base.config, tests, model, device, config.test.radius_um)}
        items = point_items(data.val)
        if items:
            before["val"]["points"] = point_scores(base_net, items, base.config, device, config.test.radius_um)
        if data.val_tiles:  # the base model's own classes (a class it lacks counts as wrong)
            known = _remap_tiles(data.val_tiles, model, base.config)
            acc = _tile_accuracy(base_net, known, base.config, device) if known else 0.0
            before["val"]["tile_accuracy"] = acc * len(known) / len(data.val_tiles)
        base.network.cpu()
        scores_path.write_text(json.dumps(jsonable({"before": before}), indent=1), encoding="utf-8")
        state = {"step": 0, "epoch": 0, "best_score": stopping_score(before["val"], config.early_stopping),
                 "best_epoch": 0, "stale": 0, "history": [], "train_seconds": 0.0, "done": False}
        engine.save_best({"epoch": 0})
    stream = (sampler.batch(step, model.mpp) for step in range(state["step"], config.total_steps))
    if not engine.run_epochs(state, stream, started=started, progress=progress, stop_after=stop_after):
        return None
    return _finish(config, run, best_dir, device, base, network, model, data, tests, state, before, command,
                   weights)


def _finish(config: FinetuneConfig, run: Path, best_dir: Path, device: torch.device, base: LoadedModel,
            network: nn.Module, model: ModelConfig, data: FinetuneData, tests: HeldOutData, state: dict[str, Any],
            before: dict[str, Any], command: str | None, weights: torch.Tensor | None) -> FinetuneResult:
    network.load_state_dict(load_file(str(best_dir / WEIGHTS), device=str(device)))
    for p in network.parameters():
        p.requires_grad_(True)
    network.eval()
    tuning = None
    if config.fit_thresholds:
        model, tuning = fit_point_thresholds(network, model, data.val, config, device, command)
    after = {"val": _scores(network, data, model, config, device, weights),
             "test": evaluate_tests(network, model, tests, model, device, config.test.radius_um)}
    (run / "scores.json").write_text(json.dumps(jsonable({"before": before, "after": after}), indent=1),
                                     encoding="utf-8")
    record = jsonable({
        "kind": "finetune",
        "histopan_version": __version__,
        "command": command,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the base's own training record travels along, so a model fine-tuned in stages keeps its whole history
        "base": {"name": base.name, "path": str(base.path), "weights_sha256": base.weights_sha256,
                 "training": base.config.training},
        "trainable": config.trainable,
        "data": {
            "annotations": [{"images": str(s.images), "geojson": str(s.geojson), "mpp": s.mpp,
                             "classes": dict(s.classes), "val": list(s.val)} for s in config.annotations],
            "slides": [{"slide": str(s.slide), "geojson": str(s.geojson), "val": s.val} for s in config.slides],
            "tiles": [{"path": str(s.path), "mpp": s.mpp, "classes": dict(s.classes), "val": list(s.val)}
                      for s in config.tiles],
            **data.summary(),
            "held_back": [s.name for s in data.val] + [s.name for s in data.val_tiles],
        },
        "steps": state["step"], "epochs": state["epoch"], "best_epoch": state["best_epoch"],
        "crop": config.crop, "batch_size": config.batch_size, "lr": config.lr,
        "type_weights": None if weights is None else dict(zip(model.type_names, weights.tolist())),
        "train_minutes": round(state["train_seconds"] / 60, 1),
        "hardware": hardware(device, config),
        "before": before, "after": after,
        **({"postprocess_tuning": tuning} if tuning is not None else {}),
    })
    final = dataclasses.replace(model, training=record)
    model_dir = run / "model"
    save_model(model_dir, network.cpu(), final, card=model_card(final, config, record))
    log.info("exported %s (best epoch %d)", model_dir, state["best_epoch"])
    return FinetuneResult(run, model_dir, state["best_epoch"], before, after)


# -- reporting -------------------------------------------------------------------------------------------------
def _plot(history: list[dict[str, Any]], before: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train"].get("loss", math.nan) for h in history], marker=".", label="train loss")
    ax1.plot([0, *epochs], [before["val"]["loss"].get("loss", math.nan)]
             + [h["val"]["loss"].get("loss", math.nan) for h in history], marker="o", label="held-back loss")
    ax1.set_xlabel("epoch (0 = base model)")
    ax1.set_ylabel("masked loss")
    ax1.legend()
    if any("points" in h["val"] for h in history):
        f1 = [(h["val"].get("points") or {}).get("detection", {}).get("f1") for h in history]
        ax2.plot(epochs, [math.nan if v is None else v for v in f1], marker="o", label="held-back point F1")
        acc = [(h["val"].get("points") or {}).get("type_accuracy") for h in history]
        ax2.plot(epochs, [math.nan if v is None else v for v in acc], marker="s", label="held-back type accuracy")
    if any("tile_accuracy" in h["val"] for h in history):
        ax2.plot(epochs, [h["val"].get("tile_accuracy", math.nan) for h in history], marker="^",
                 label="held-back tile accuracy")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _f(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}" if isinstance(v, float) else str(v)


def score_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown rows "figure | before | after" for the scores both runs share (or after has)."""
    rows = []

    def add(label: str, get) -> None:
        try:
            b = get(before)
        except (KeyError, TypeError):
            b = None
        try:
            a = get(after)
        except (KeyError, TypeError):
            return
        rows.append(f"| {label} | {_f(b)} | {_f(a)} |")

    add("held-back masked loss", lambda s: s["val"]["loss"]["loss"])
    add("held-back point detection F1", lambda s: s["val"]["points"]["detection"]["f1"])
    add("held-back type accuracy (matched nuclei)", lambda s: s["val"]["points"]["type_accuracy"])
    add("held-back tile accuracy", lambda s: s["val"]["tile_accuracy"])
    add("test point detection precision", lambda s: s["test"]["points"]["detection"]["precision"])
    add("test point detection recall", lambda s: s["test"]["points"]["detection"]["recall"])
    add("test point detection F1", lambda s: s["test"]["points"]["detection"]["f1"])
    for name in sorted((after.get("test", {}).get("points", {}).get("types") or {})):
        add(f"test F1 {name} (HoVer-Net CRC convention)", lambda s, n=name: s["test"]["points"]["types"][n]["f1"])
    add("test type accuracy (matched nuclei)", lambda s: s["test"]["points"]["type_accuracy"])
    add("test type weighted F1 (matched nuclei)", lambda s: s["test"]["points"]["type_weighted_f1"])
    add("test type accuracy (every typed point, given nuclei)",
        lambda s: s["test"]["points"]["types_at_points"]["accuracy"])
    add("test type weighted F1 (every typed point, given nuclei)",
        lambda s: s["test"]["points"]["types_at_points"]["weighted_f1"])
    add("test nucleus PQ", lambda s: s["test"]["nuclei"]["pq"])
    add("test nucleus SQ", lambda s: s["test"]["nuclei"]["sq"])
    add("test nucleus RQ", lambda s: s["test"]["nuclei"]["rq"])
    add("test AJI", lambda s: s["test"]["nuclei"]["aji"])
    add("test tile accuracy", lambda s: s["test"]["tiles"]["accuracy"])
    return "\n".join(["| figure | before (base) | after |", "|---|---|---|", *rows])


def _postprocess_row(model: ModelConfig, record: dict[str, Any]) -> str:
    tuning = record.get("postprocess_tuning")
    if tuning is None:
        return "| post-processing | the base model's thresholds (`model.yaml`, `postprocess:`) |"
    pp = ", ".join(f"{k} {getattr(model.postprocess, k)}" for k in tuning["grid"])
    return (f"| post-processing | fitted to the held-back points after training (`fit_thresholds`, "
            f"{tuning['trials']} trials): {pp}; held-back detection F1 "
            f"{tuning['before']['detection']['f1']:.3f} -> {tuning['validation']['detection']['f1']:.3f} |")


def model_card(model: ModelConfig, config: FinetuneConfig, record: dict[str, Any]) -> str:
    """The ``README.md`` of a fine-tuned model folder: base, data, how it was trained, before / after figures."""
    d = record["data"]
    lines = [
        f"# {model.name}",
        "",
        config.description.strip() or f"Fine-tuned from `{record['base']['name']}` on sparse annotations.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{record['base']['name']}` (weights sha256 `{record['base']['weights_sha256'][:16]}...`) |",
        f"| classes | {', '.join(model.class_names)} |",
        f"| nucleus types | {', '.join(model.type_names) or 'none'} |",
        f"| working resolution | {model.mpp} um/px, tile {model.tile} px, halo {model.halo} px |",
        f"| trained layers | {config.trainable}"
        + (f"; outputs kept close to the base model where nothing is annotated (distill {config.distill})"
           if config.distill else "") + " |",
        *([f"| type loss weights | "
           + ", ".join(f"{n} {v:.2f}" for n, v in record["type_weights"].items())
           + f" (inverse frequency to the power {config.type_balance}) |"] if record.get("type_weights") else []),
        _postprocess_row(model, record),
        "",
        "## Data",
        "",
        f"- training: {d['train_images']} annotated images / regions ({d['train_points']} nucleus points, "
        f"{d['train_polygons']} nucleus outlines, {d['train_regions']} regions), {d['train_tiles']} tile-class tiles",
        f"- held back for early stopping: {d['val_images']} images / regions, {d['val_tiles']} tiles",
    ]
    for s in d["annotations"]:
        lines.append(f"- annotations: `{s['images']}` with GeoJSON `{s['geojson']}`")
    for s in d["slides"]:
        lines.append(f"- slide: `{s['slide']}` with GeoJSON `{s['geojson']}`")
    for s in d["tiles"]:
        lines.append(f"- tiles: `{s['path']}` ({s['mpp']} um/px)")
    test = config.test
    for s in test.points:
        lines.append(f"- test (points, never trained on): `{s.images}`")
    for s in test.nuclei:
        lines.append(f"- test (nucleus outlines, never trained on): `{s.path}`")
    for s in test.tiles:
        lines.append(f"- test (tile classes, never trained on): `{s.path}`")
    lines += [
        "",
        "Unannotated pixels train nothing: nucleus outlines supervise their pixels and a "
        f"{config.geometry.ring_um} um ring around them, points a {config.geometry.point_core_um} um nucleus core, "
        "the centre map around them and (typed points) the type head within "
        f"{config.geometry.type_radius_um} um; regions and tiles supervise the tissue class.",
        *([f"Sets marked `complete_points` (every nucleus clicked) also train the centre map on the whole image "
           f"and \"not a nucleus\" farther than {config.geometry.point_extent_um} um from every point."]
          if any(s.complete_points for s in config.annotations) else []),
        "",
        "## Training",
        "",
        f"- command: `{record.get('command') or 'histopan finetune'}`",
        f"- {record['steps']} steps of {config.batch_size} x {config.crop}^2 crops, best epoch {record['best_epoch']} "
        f"of {record['epochs']} (early stopping on the {STOPPING_SCORES[config.early_stopping][0]}, "
        f"patience {config.patience}); "
        f"{'' if config.ema is None else f'moving average of the weights (decay {config.ema}) scored and kept; '}"
        f"AdamW lr {config.lr}, {record['train_minutes']} min on {record['hardware']['device']} "
        f"({record['hardware']['threads']} threads)",
        "",
        "## Figures (before = the base model, after = this model)",
        "",
        score_table(record["before"], record["after"]),
        "",
        f"Point matching radius {test.radius_um} um (Hungarian, `histopan.metrics.point_detection`).",
        "",
    ]
    return "\n".join(lines)
