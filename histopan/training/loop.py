"""The training loop: AdamW + warm-up/cosine schedule, validation PQ every epoch, resume, threshold tuning.

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
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from histopan import __version__
from histopan.config import to_dict
from histopan.errors import ConfigError, DataError
from histopan.metrics import PQStats, aji, binary_pq
from histopan.model.checkpoint import load_model, save_model
from histopan.model.config import ModelConfig
from histopan.model.network import INPUT_MULTIPLE, build_network, grow_heads, normalize_input, split_outputs
from histopan.postprocess import PostprocessConfig, ProbabilityMaps, postprocess_tile
from histopan.training.config import TrainConfig, TuneConfig, write_train_config
from histopan.training.data import CropSampler, Sample, TrainingData, load_training_data
from histopan.training.losses import total_loss

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "ValidationMaps", "learning_rate", "predict_maps", "score_maps", "train",
           "tune_postprocess"]

STATE_FILE = "state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
EMA = "ema.safetensors"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    model_dir: Path
    best_epoch: int
    best_pq: float
    scores: dict[str, Any]
    postprocess: PostprocessConfig


# -- schedule ------------------------------------------------------------------------------------------
def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``config.lr`` over ``warmup_steps``, then cosine decay to 2% of it."""
    total = config.total_steps
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


# -- device / determinism ------------------------------------------------------------------------------
def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available", value=config.device,
                          fix="set 'device: auto' or 'device: cpu'")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


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


def _hardware(device: torch.device, config: TrainConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "threads": config.threads, "workers": config.workers,
                            "cpu": platform.processor() or platform.machine(), "torch": str(torch.__version__)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- checkpoints ---------------------------------------------------------------------------------------
def _tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}


def _save_checkpoint(folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any], ema: AveragedModel | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(network), str(tmp / WEIGHTS))
    names = [WEIGHTS, OPTIMIZER, STATE_FILE]
    if ema is not None:
        save_file({**_tensors(ema.module), "n_averaged": ema.n_averaged.detach().cpu()}, str(tmp / EMA))
        names.append(EMA)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_state = optimizer.state_dict()
    for pid, pstate in opt_state["state"].items():
        for key, value in pstate.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            opt_tensors[f"{pid}.{key}"] = tensor.detach().cpu().contiguous()
    opt_tensors["torch_rng"] = torch.get_rng_state()
    save_file(opt_tensors, str(tmp / OPTIMIZER))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, allow_nan=True), encoding="utf-8")
    for name in names:
        (tmp / name).replace(folder / name)
    tmp.rmdir()


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the run state: {exc}", path=path,
                        fix="start a new run (without --resume) or point --out at a complete run") from exc


def _load_checkpoint(folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                     device: torch.device, ema: AveragedModel | None = None) -> dict[str, Any]:
    for name in (WEIGHTS, OPTIMIZER, STATE_FILE) + ((EMA,) if ema is not None else ()):
        if not (folder / name).is_file():
            raise DataError(f"resume checkpoint is incomplete: {name} is missing", path=folder,
                            fix="start a new run (without --resume) or point --out at a complete run")
    network.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)))
    tensors = load_file(str(folder / OPTIMIZER))
    torch.set_rng_state(tensors.pop("torch_rng"))
    opt_state = optimizer.state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
    opt_state["state"] = per_param
    optimizer.load_state_dict(opt_state)
    if ema is not None:
        averaged = load_file(str(folder / EMA), device=str(device))
        ema.n_averaged.copy_(averaged.pop("n_averaged"))
        ema.module.load_state_dict(averaged)
    return _read_state(folder)


# -- prediction and scoring ----------------------------------------------------------------------------
def forward_padded(network: nn.Module, image: np.ndarray, model: ModelConfig, device: torch.device) -> torch.Tensor:
    """Raw float32 network output (1, C, H, W) of one RGB uint8 image, reflect-padded to a multiple of 32."""
    h, w = image.shape[:2]
    ph, pw = (-h) % INPUT_MULTIPLE, (-w) % INPUT_MULTIPLE
    x = normalize_input(torch.from_numpy(np.array(image, dtype=np.uint8)).unsqueeze(0).to(device), model)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return network(x)[:, :, :h, :w].float()


def predict_maps(network: nn.Module, image: np.ndarray, model: ModelConfig, device: torch.device,
                 out_shape: tuple[int, int] | None = None) -> ProbabilityMaps:
    """Probabilities of one whole RGB uint8 image at the model's mpp (padded to a multiple of 32).

    ``out_shape`` resizes the maps (bilinear) to another resolution, e.g. the data's own.
    """
    h, w = image.shape[:2]
    with torch.no_grad():
        out = forward_padded(network, image, model, device)
        if out_shape is not None and tuple(out_shape) != (h, w):
            out = F.interpolate(out, size=tuple(out_shape), mode="bilinear", align_corners=False)
        heads = split_outputs(out, model)
        sem = torch.softmax(heads["semantic"], dim=1)[0].cpu().numpy()
        centre = torch.sigmoid(heads["centre"])[0].cpu().numpy()
        boundary = torch.sigmoid(heads["boundary"])[0].cpu().numpy()
        types = None if heads["types"] is None else torch.softmax(heads["types"], dim=1)[0].cpu().numpy()
    return ProbabilityMaps(semantic=sem, centre=centre, boundary=boundary, types=types)


#: validation tiles of tile-class sets are scored on their central VAL_TILE_MAX x VAL_TILE_MAX pixels at most.
VAL_TILE_MAX = 1024


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[y:y + size, x:x + size]


@dataclass(frozen=True)
class ValidationMaps:
    """Predicted maps of the validation split, kept for threshold tuning."""

    nuclei: tuple[tuple[Sample, ProbabilityMaps], ...]
    tiles: tuple[tuple[Sample, ProbabilityMaps], ...]


def _validation_maps(network: nn.Module, data: TrainingData, config: TrainConfig,
                     device: torch.device) -> ValidationMaps:
    k = config.val_max_images
    network.eval()
    nuclei = tuple((s, predict_maps(network, s.image, config.model, device, s.native_shape))
                   for s in data.val_nuclei[:k])
    tiles = tuple((s, predict_maps(network, _centre_crop(s.image, VAL_TILE_MAX), config.model, device))
                  for s in data.val_tiles[:k])
    network.train()
    return ValidationMaps(nuclei, tiles)


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
    return _jsonable({
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


def _jsonable(obj: Any) -> Any:
    """Plain JSON / YAML data: numpy scalars to Python numbers, NaN to None."""
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# -- shared by the training and fine-tuning loops -------------------------------------------------------
def amp_setup(device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with a gradient scaler); off on CPU."""
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    return use_amp, amp_dtype, torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor) -> None:
    """One backward pass and parameter update (through the AMP gradient scaler)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def log_step(state: dict[str, Any], terms: dict[str, float], lr: float, started: float, n: int,
             progress: bool) -> None:
    """Without a progress bar (log files), a line every 50 steps."""
    if not progress and state["step"] % 50 == 0:
        log.info("step %d: loss %.4f (lr %.2e, %.2f s/step)", state["step"], terms["loss"], lr,
                 (time.time() - started) / n)


def append_record(history: list[dict[str, Any]], path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Add an epoch's record to the run state's history and to ``metrics.jsonl``; returns it as plain data."""
    record = _jsonable(record)
    history.append(record)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


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
    last_dir, best_dir = run / "checkpoints" / "last", run / "checkpoints" / "best"
    if not resume and (last_dir / STATE_FILE).exists():
        raise ConfigError("run folder already holds a training run", path=run,
                          fix="pass --resume to continue it, or choose another --out folder")
    if resume and not (last_dir / STATE_FILE).exists():
        raise DataError("nothing to resume: no checkpoints/last in the run folder", path=run,
                        fix="start the run without --resume")
    run.mkdir(parents=True, exist_ok=True)
    write_train_config(config, run / "train.yaml")

    device = _device(config)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    benchmark_before = torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:  # fixed crop size: let cuDNN pick the fastest convolution algorithms once
        torch.backends.cudnn.benchmark = True
    try:
        return _train(config, run, last_dir, best_dir, device, resume, progress, data, stop_after, command, export)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.backends.cudnn.benchmark = benchmark_before
        torch.set_num_threads(threads_before)


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
        finished = _read_state(last_dir)
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
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_amp, amp_dtype, scaler = amp_setup(device)
    # the moving average also averages the batch-norm statistics (use_buffers), so it needs no extra pass
    ema = None if config.ema is None else AveragedModel(
        network, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
    evaluated = network if ema is None else ema.module

    # the init model as it was when the run started (its folder may be overwritten before the export)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_pq": -1.0, "best_epoch": -1, "history": [],
                             "train_seconds": 0.0, "done": False, **provenance}
    if resume:
        state = _load_checkpoint(last_dir, network, optimizer, device, ema)
        log.info("resuming %s at step %d (epoch %d)", run, state["step"], state["epoch"])
    state["hardware"] = _hardware(device, config)
    state.setdefault("command", command)  # the command that started the run, kept when it is resumed
    network.train()
    deadline = None if config.max_minutes is None else started + 60 * config.max_minutes - state["train_seconds"]
    metrics_path = run / "metrics.jsonl"
    epochs_this_call = 0
    stream = batches(sampler, state["step"], config.total_steps, config.workers, pin_memory=device.type == "cuda")

    while not state["done"] and state["epoch"] < config.epochs:
        epoch = state["epoch"]
        sums: dict[str, float] = {}
        t0 = time.time()
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False)
        n = 0
        for _ in bar:
            step = state["step"]
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = _to_tensors(next(stream), device)
            x = normalize_input(batch["image"], model)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = network(x)
            loss, terms = total_loss(split_outputs(out.float(), model), batch, model.nucleus_index, config.loss)
            optimizer_step(optimizer, scaler, loss)
            if ema is not None:
                ema.update_parameters(network)
            state["step"] = step + 1
            n += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}")
            log_step(state, terms, lr, t0, n, progress)
            if deadline is not None and time.time() > deadline:
                state["done"] = True
                log.warning("max_minutes reached at step %d; stopping early", state["step"])
                break
        bar.close()
        state["train_seconds"] += time.time() - t0
        val = score_maps(_validation_maps(evaluated, data, config, device), model, model.postprocess)
        state["epoch"] = epoch + 1
        record = append_record(state["history"], metrics_path, {
            "epoch": epoch + 1, "step": state["step"], "lr": lr, "seconds": round(time.time() - t0, 1),
            "train": {k: v / max(n, 1) for k, v in sums.items()}, "val": val})
        log.info("epoch %d: loss %.4f, val PQ %.4f (SQ %.3f RQ %.3f AJI %.3f)%s", epoch + 1,
                 record["train"].get("loss", math.nan), val["pq"], val["sq"], val["rq"], val.get("aji", math.nan),
                 f", stuff acc {val['stuff_tile_accuracy']:.2f} (true-class share {val['stuff_tile_true_share']:.2f})"
                 if "stuff_tile_accuracy" in val else "")
        if val["pq"] > state["best_pq"]:
            state["best_pq"], state["best_epoch"] = float(val["pq"]), epoch + 1
            _save_checkpoint(best_dir, evaluated, optimizer, {"epoch": epoch + 1, "val": _jsonable(val)})
        if state["epoch"] >= config.epochs:
            state["done"] = True
        _save_checkpoint(last_dir, network, optimizer, state, ema)
        _plot(state["history"], run / "curves.png")
        epochs_this_call += 1
        if stop_after is not None and epochs_this_call >= stop_after and not state["done"]:
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
    (run / "tuning.json").write_text(json.dumps(_jsonable({"best": to_dict(pp), "scores": scores,
                                                          "trials": trials}), indent=1), encoding="utf-8")
    record = {
        "histopan_version": __version__,
        "command": state.get("command") or command,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "nuclei": [{"path": str(s.path), "mpp": s.mpp, "val": list(s.val)} for s in config.nuclei],
            "tiles": [{"path": str(s.path), "mpp": s.mpp, "classes": dict(s.classes), "val": list(s.val)}
                      for s in config.tiles],
            "train_images": len(data.train_nuclei), "train_tiles": len(data.train_tiles),
            "val_images": len(data.val_nuclei), "val_tiles": len(data.val_tiles),
        },
        "init": None if config.init is None else str(config.init),
        **{k: state[k] for k in ("init_weights_sha256", "init_training") if k in state},
        "steps": state["step"], "epochs": state["epoch"], "best_epoch": state["best_epoch"],
        "crop": config.crop, "batch_size": config.batch_size,
        "train_minutes": round(state["train_seconds"] / 60, 1),
        # where the network was trained (a finished run may be tuned and exported on another machine)
        "hardware": state.get("hardware") or _hardware(device, config),
        "validation": {"resolution": "scored at each image's own resolution", **scores},
    }
    record = _jsonable(record)
    final = dataclasses.replace(model, postprocess=pp, training=record)
    model_dir = run / "model"
    save_model(model_dir, network.cpu(), final)
    log.info("exported %s: validation PQ %.4f (SQ %.3f, RQ %.3f, AJI %.3f)", model_dir, scores["pq"], scores["sq"],
             scores["rq"], scores.get("aji", math.nan))
    return TrainResult(run_dir=run, model_dir=model_dir, best_epoch=state["best_epoch"], best_pq=scores["pq"],
                       scores=scores, postprocess=pp)
