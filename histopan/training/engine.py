"""The training engine shared by ``histopan train`` (:mod:`.loop`) and ``histopan finetune`` (:mod:`.finetune`).

One run folder layout, one epoch loop and one way to checkpoint:

- :func:`run_folders` refuses a new run over an old one and a resume of nothing;
- :func:`torch_settings` sets threads, seed and (on CPU) deterministic algorithms for the run, and restores
  them afterwards;
- :class:`Engine` owns the optimiser (AdamW), the optional moving average of the weights (``ema``, what is
  validated, kept as the best checkpoint and exported), the warm-up / cosine learning rate, mixed precision
  on CUDA, the ``max_minutes`` deadline, one validation per epoch, the best checkpoint (highest score, with
  optional ``patience``) and ``checkpoints/last`` after every epoch;
- checkpoints are safetensors + JSON (:func:`save_checkpoint`, :func:`load_checkpoint`): weights, optimiser
  state, the torch random state and the run state, so a resumed run continues exactly as an uninterrupted
  one would.

The two commands differ only in what they plug in: how a batch becomes a loss, how the evaluated network is
scored, which score picks the best epoch, and what is logged and plotted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from histopan.errors import ConfigError, DataError, OutputError

log = logging.getLogger(__name__)

__all__ = ["EMA", "OPTIMIZER", "STATE_FILE", "WEIGHTS", "Engine", "RunConfig", "append_record", "autocast", "freeze",
           "frozen_statistics_train_mode", "hardware", "jsonable", "learning_rate", "load_checkpoint", "read_state",
           "run_folders", "save_checkpoint", "torch_settings", "training_device"]

STATE_FILE = "state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
EMA = "ema.safetensors"


class RunConfig(Protocol):
    """What the engine reads from a :class:`~.config.TrainConfig` or :class:`~.config.FinetuneConfig`."""

    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    warmup_steps: int
    seed: int
    threads: int
    device: str
    max_minutes: float | None
    ema: float | None

    @property
    def total_steps(self) -> int: ...


# -- schedule, device, precision -------------------------------------------------------------------------
def learning_rate(step: int, config: RunConfig) -> float:
    """Linear warm-up to ``config.lr`` over ``warmup_steps``, then cosine decay to 2% of it."""
    total = config.total_steps
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def training_device(config: RunConfig) -> torch.device:
    """The device of ``config.device`` (``auto``: CUDA when available); ``cuda`` without a GPU is refused."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available", value=config.device,
                          fix="set 'device: auto' or 'device: cpu'")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> torch.autocast:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); off on CPU."""
    return torch.autocast(device.type, dtype=_amp_dtype(device), enabled=device.type == "cuda")


def hardware(device: torch.device, config: RunConfig) -> dict[str, Any]:
    """Where a run trains: device (and GPU), threads, data workers, CPU and torch version."""
    info: dict[str, Any] = {"device": str(device), "threads": config.threads, "workers": getattr(config, "workers", 0),
                            "cpu": platform.processor() or platform.machine(), "torch": str(torch.__version__)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextlib.contextmanager
def torch_settings(config: RunConfig, device: torch.device, *, cudnn_benchmark: bool = False) -> Iterator[None]:
    """For the run: ``config.threads`` threads, the seed, deterministic algorithms on CPU, and (on CUDA, with
    ``cudnn_benchmark``, for fixed crop sizes) cuDNN's fastest algorithms; restored afterwards."""
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    benchmark_before = torch.backends.cudnn.benchmark
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.backends.cudnn.benchmark = benchmark_before
        torch.set_num_threads(threads_before)


# -- run folder and checkpoints ----------------------------------------------------------------------------
def run_folders(run: Path, resume: bool, kind: str) -> tuple[Path, Path]:
    """``run/checkpoints/last`` and ``run/checkpoints/best``; a new run over an existing ``kind`` run (e.g.
    "training") and a resume without one are refused, naming the folder and the fix."""
    check_new_folder(run)
    last_dir, best_dir = run / "checkpoints" / "last", run / "checkpoints" / "best"
    if not resume and (last_dir / STATE_FILE).exists():
        raise ConfigError(f"run folder already holds a {kind} run", path=run,
                          fix="pass --resume to continue it, or choose another --out folder")
    if resume and not (last_dir / STATE_FILE).exists():
        raise DataError("nothing to resume: no checkpoints/last in the run folder", path=run,
                        fix="start the run without --resume")
    return last_dir, best_dir


def check_new_folder(folder: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse, before any work, an output folder (made with its parents when missing) that cannot be made: a
    file at its place or at a parent's place, or a nearest existing folder that is not writable.  ``option``
    names the command-line option in the fix."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise OutputError("a file is in the way of the output folder", path=existing,
                          fix=f"choose another {option} folder, or move that file away (the folder is {folder})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError("the output folder cannot be written here", path=existing,
                          fix=f"choose an {option} folder you can write to, or fix its permissions")


def make_run_folder(run: Path) -> None:
    """Create the run folder (and its parents); an OutputError naming it when that is impossible."""
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the run folder: {exc.strerror or exc}", path=run,
                          fix="choose an --out folder you can write to") from exc


def jsonable(obj: Any) -> Any:
    """Plain JSON / YAML data: numpy scalars to Python numbers, NaN to None."""
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}


def save_checkpoint(folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], ema: AveragedModel | None = None) -> None:
    """Weights, optimiser state (with the torch random state), the run ``state`` and the moving average into
    ``folder``, written beside it first and then moved in, so ``folder`` never holds a mix of two epochs."""
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


def read_state(folder: Path) -> dict[str, Any]:
    """The run state saved in checkpoint ``folder``."""
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the run state: {exc}", path=path,
                        fix="start a new run (without --resume) or point --out at a complete run") from exc


def load_checkpoint(folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, ema: AveragedModel | None = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (the torch random state included); returns the run state."""
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
    return read_state(folder)


def append_record(history: list[dict[str, Any]], path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Add an epoch's record to the run state's history and to ``metrics.jsonl``; returns it as plain data."""
    record = jsonable(record)
    history.append(record)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


# -- the engine --------------------------------------------------------------------------------------------
class Engine:
    """The epoch loop of one run in ``run`` (see the module docstring).

    ``params`` are the parameters to train (default: all of ``network``).  What the command plugs in:

    - ``loss(batch)``: the loss tensor and its terms (floats, ``"loss"`` among them) of one batch, forward
      pass included (under :func:`autocast`);
    - ``validate(network)``: the held-out scores of the evaluated network (the moving average when there is
      one), recorded in ``metrics.jsonl``;
    - ``score(scores)``: the number (higher is better) that picks the best epoch, kept in the run state
      under ``best_key``; with ``patience`` the run stops after that many epochs without improvement
      (``patience_what`` names the score in the log);
    - ``report(record, scores)``: logs an epoch's record (plain data) and its scores as ``validate`` gave
      them; ``plot(history)``: draws the curves;
    - ``train_mode(network)``: puts the network in training mode at the start of each epoch.
    """

    def __init__(self, config: RunConfig, run: Path, device: torch.device, network: nn.Module, *,
                 loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
                 validate: Callable[[nn.Module], dict[str, Any]], score: Callable[[dict[str, Any]], float],
                 report: Callable[[dict[str, Any], dict[str, Any]], None], plot: Callable[[list[dict[str, Any]]], None],
                 params: Iterable[nn.Parameter] | None = None, best_key: str = "best_pq",
                 patience: int | None = None, patience_what: str = "score",
                 train_mode: Callable[[nn.Module], Any] = nn.Module.train) -> None:
        self.config, self.run, self.device, self.network = config, run, device, network
        self.last_dir, self.best_dir = run / "checkpoints" / "last", run / "checkpoints" / "best"
        self.optimizer = torch.optim.AdamW(network.parameters() if params is None else params, lr=config.lr,
                                           weight_decay=config.weight_decay)
        # the moving average also averages the batch-norm statistics (use_buffers), so it needs no extra pass
        self.ema = None if config.ema is None else AveragedModel(
            network, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        self.loss, self.validate, self.score, self.report, self.plot = loss, validate, score, report, plot
        self.best_key, self.patience, self.patience_what, self.train_mode = best_key, patience, patience_what, train_mode

    @property
    def evaluated(self) -> nn.Module:
        """The network that is validated, kept as the best checkpoint and exported."""
        return self.network if self.ema is None else self.ema.module

    def resume(self) -> dict[str, Any]:
        """Restore ``checkpoints/last``; returns the run state."""
        state = load_checkpoint(self.last_dir, self.network, self.optimizer, self.device, self.ema)
        log.info("resuming %s at step %d (epoch %d)", self.run, state["step"], state["epoch"])
        return state

    def save_best(self, state: dict[str, Any]) -> None:
        """The evaluated network as ``checkpoints/best`` with ``state``."""
        save_checkpoint(self.best_dir, self.evaluated, self.optimizer, state)

    def run_epochs(self, state: dict[str, Any], batches: Iterator[Any], *, started: float, progress: bool,
                   stop_after: int | None = None) -> bool:
        """Train from ``state`` on ``batches`` (the stream from ``state["step"]`` on) until the run is done:
        all epochs, the ``max_minutes`` deadline (counted from ``started``, less the time trained before a
        resume) or ``patience``.  Returns False when ``stop_after`` epochs of this call ended it first."""
        config, network, optimizer = self.config, self.network, self.optimizer
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda"
                                      and _amp_dtype(self.device) == torch.float16)
        deadline = None if config.max_minutes is None else started + 60 * config.max_minutes - state["train_seconds"]
        metrics_path = self.run / "metrics.jsonl"
        epochs_this_call = 0
        while not state["done"] and state["epoch"] < config.epochs:
            epoch = state["epoch"]
            self.train_mode(network)
            sums: dict[str, float] = {}
            t0 = time.time()
            bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not progress, leave=False)
            n = 0
            lr = learning_rate(state["step"], config)
            for _ in bar:
                step = state["step"]
                lr = learning_rate(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, terms = self.loss(next(batches))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if self.ema is not None:
                    self.ema.update_parameters(network)
                state["step"] = step + 1
                n += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}")
                if not progress and state["step"] % 50 == 0:  # log files get a line every 50 steps
                    log.info("step %d: loss %.4f (lr %.2e, %.2f s/step)", state["step"], terms["loss"], lr,
                             (time.time() - t0) / n)
                if deadline is not None and time.time() > deadline:
                    state["done"] = True
                    log.warning("max_minutes reached at step %d; stopping early", state["step"])
                    break
            bar.close()
            state["train_seconds"] += time.time() - t0
            val = self.validate(self.evaluated)
            state["epoch"] = epoch + 1
            record = append_record(state["history"], metrics_path, {
                "epoch": epoch + 1, "step": state["step"], "lr": lr, "seconds": round(time.time() - t0, 1),
                "train": {k: v / max(n, 1) for k, v in sums.items()}, "val": val})
            self.report(record, val)
            score = float(self.score(val))
            if score > state[self.best_key]:
                state[self.best_key], state["best_epoch"] = score, epoch + 1
                if self.patience is not None:
                    state["stale"] = 0
                self.save_best({"epoch": epoch + 1, "val": jsonable(val)})
            elif self.patience is not None:
                state["stale"] += 1
                if state["stale"] >= self.patience:
                    log.info("no improvement of the %s for %d epochs: stopping early", self.patience_what,
                             self.patience)
                    state["done"] = True
            if state["epoch"] >= config.epochs:
                state["done"] = True
            save_checkpoint(self.last_dir, network, optimizer, state, self.ema)
            self.plot(state["history"])
            epochs_this_call += 1
            if stop_after is not None and epochs_this_call >= stop_after and not state["done"]:
                return False
        return True


def freeze(network: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Set requires_grad by ``trainable`` (all / decoder / head); the parameters left to train."""
    head = ("segmentation_head.",)
    keep = {"all": None, "decoder": ("decoder.", *head), "head": head}[trainable]
    params = []
    for name, p in network.named_parameters():
        p.requires_grad_(keep is None or name.startswith(keep))
        if p.requires_grad:
            params.append(p)
    return params


def frozen_statistics_train_mode(network: nn.Module) -> None:
    """Train mode with every batch-norm layer's running statistics kept as the base model learnt them.

    Small batches of sparsely labelled crops give noisy batch statistics; with the base model's the
    network starts out exactly as the base model (and equal to the distillation teacher).  The affine
    batch-norm parameters of trainable layers still train.
    """
    network.train()
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
