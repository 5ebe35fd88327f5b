"""Model folders: ``weights.safetensors`` + ``model.yaml`` (+ an optional ``README.md`` model card).

Only safetensors are read: a ``.pt/.pth/.ckpt/.pkl`` file, or a weights file whose bytes are a pickle or a
zip (torch.save format), is refused with a :class:`~histopan.errors.ModelError`; nothing is ever unpickled.
On load the weights are checked against ``model.yaml``: the output-channel count of the final convolution
against the class / type lists, the facts recorded in the file's metadata (architecture, format version,
class and nucleus type names in their order: :func:`histopan.model.folder.check_weights_metadata`), missing
and unexpected keys and tensor shapes.  Each failure names the file, the value and the fix.

A bare model name is looked up in ``$HISTOPAN_MODELS`` (one or more folders separated by ``os.pathsep``)
and then in the ``models/`` folder of the repository this package lives in (:mod:`histopan.model.folder`,
which finds and checks a model folder without torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from histopan.config import from_dict, to_dict
from histopan.errors import ConfigError, ModelError
from histopan.model.config import ModelConfig, read_model_config
from histopan.model.folder import (CARD_FILE, CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, _check_weights_bytes,
                                   available_models, check_model_folder, check_weights_metadata, model_search_paths,
                                   resolve_model_path)
from histopan.model.network import HEAD_KEY, build_network

log = logging.getLogger(__name__)

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "LoadedModel",
    "PICKLE_SUFFIXES",
    "WEIGHTS_FILE",
    "available_models",
    "load_model",
    "model_search_paths",
    "resolve_model_path",
    "save_config",
    "save_model",
]

_METADATA_FORMAT = "histopan-model"



@dataclass(frozen=True)
class LoadedModel:
    """A validated model: its config, the network (eval mode, on CPU after loading) and where it came from."""

    config: ModelConfig
    network: nn.Module
    path: Path
    weights_sha256: str

    def for_tta(self, tta: bool) -> LoadedModel:
        """This model with the config a run with ``tta`` uses (:meth:`ModelConfig.for_tta`); same network."""
        config = self.config.for_tta(tta)
        return self if config is self.config else dataclasses.replace(self, config=config)

    @property
    def name(self) -> str:
        return self.config.name


# -- reading ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_weights_bytes(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except SafetensorError as exc:
        raise ModelError(f"corrupt safetensors file: {exc}", path=path,
                         fix="copy the model folder again or re-save it") from exc
    return state, metadata


def _describe_outputs(config: ModelConfig) -> str:
    return (f"{config.n_outputs} output channels ({config.n_classes} classes {list(config.class_names)} "
            f"+ centre + boundary + {config.n_types} nucleus types)")


def _check_state(state: dict[str, torch.Tensor], metadata: dict[str, str], config: ModelConfig,
                 path: Path, network: nn.Module) -> None:
    """Raise ModelError unless ``state`` fits ``network`` built from ``config``."""
    arch = config.architecture
    head_w = state.get(f"{HEAD_KEY}.weight")
    if head_w is not None and head_w.ndim == 4 and head_w.shape[0] != config.n_outputs:
        saved = ""
        if "classes" in metadata:
            saved = (f" (saved with classes {json.loads(metadata['classes'])} and nucleus types "
                     f"{json.loads(metadata.get('nucleus_types', '[]'))})")
        raise ModelError(
            f"the weights have {head_w.shape[0]} output channels{saved}, but model.yaml describes "
            f"{_describe_outputs(config)}",
            path=path, value=int(head_w.shape[0]),
            fix=f"make 'classes' and 'nucleus_types' in {path.parent / CONFIG_FILE} match the weights, or grow "
                "the heads with histopan.model.network.grow_heads and fine-tune",
        )
    check_weights_metadata(metadata, weights=path, config=path.parent / CONFIG_FILE, class_names=config.class_names,
                           type_names=config.type_names, arch=arch.arch, encoder=arch.encoder,
                           format_version=config.format_version)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelError(
            f"the weights do not fit {arch.arch} with encoder {arch.encoder!r} (as in model.yaml): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}",
            path=path, value=arch.encoder,
            fix=f"set 'architecture' in {path.parent / CONFIG_FILE} to the one these weights were trained with",
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ModelError(
                f"tensor {key!r} has shape {tuple(state[key].shape)} but the architecture in model.yaml needs "
                f"{tuple(ref.shape)}",
                path=path, value=tuple(state[key].shape),
                fix=f"set 'architecture' (e.g. decoder_channels) in {path.parent / CONFIG_FILE} to the values "
                    "used in training",
            )


# -- save / load ---------------------------------------------------------------------------------------
def _config_text(config: ModelConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def _text_writer(text: str) -> Callable[[Path], Any]:
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def _write_files(folder: Path, files: dict[str, Callable[[Path], Any]]) -> None:
    """Write each file of ``folder`` through its writer under a temporary name, then rename it into place,
    so a reader never sees a half-written file."""
    for name, write in files.items():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, folder / name)
        finally:
            if tmp.exists():
                tmp.unlink()


def save_model(folder: str | PathLike[str], network: nn.Module, config: ModelConfig, *,
               half: bool = False, card: str | None = None) -> Path:
    """Write ``network``'s weights and ``config`` into ``folder`` (created if needed) and return it.

    Both files are written under temporary names and then renamed, so a reader never sees a half-written
    model.  ``half=True`` stores floating-point tensors as float16 (half the size); :func:`load_model`
    converts them back to float32.  ``card`` (Markdown) is written as the model card ``README.md``.
    The weights are checked against ``config`` first, so an inconsistent model is never written.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in network.state_dict().items():
        value = value.detach().to("cpu")
        if half and value.is_floating_point():
            value = value.to(torch.float16)
        state[key] = value.contiguous()
    metadata = {
        "format": _METADATA_FORMAT,
        "format_version": str(config.format_version),
        "arch": config.architecture.arch,
        "encoder": config.architecture.encoder,
        "n_outputs": str(config.n_outputs),
        "classes": json.dumps(list(config.class_names)),
        "nucleus_types": json.dumps(list(config.type_names)),
        "dtype": "float16" if half else "float32",
    }
    _check_state(state, metadata, config, out / WEIGHTS_FILE, build_network(config))
    files: dict[str, Callable[[Path], Any]] = {
        WEIGHTS_FILE: lambda tmp: save_file(state, str(tmp), metadata=metadata),
        CONFIG_FILE: _text_writer(_config_text(config)),
    }
    if card is not None:
        files[CARD_FILE] = _text_writer(card)
    _write_files(out, files)
    log.info("saved model %r to %s", config.name, out)
    return out


def save_config(model: LoadedModel, config: ModelConfig, folder: str | PathLike[str]) -> Path:
    """Write ``model``'s folder to ``folder`` with ``config`` as its ``model.yaml`` (e.g. re-tuned thresholds).

    The weights file and the card are copied byte for byte, so the weights' sha256 (which provenance and
    derived models record) stays the same; ``folder`` may be the model's own.  ``config`` must read back and
    describe the same network (checked before anything is written); files go in as :func:`save_model`'s do.
    """
    out = Path(folder)
    text = _config_text(config)
    config = from_dict(ModelConfig, yaml.safe_load(text), source=out / CONFIG_FILE)
    if config.n_outputs != model.config.n_outputs or config.architecture != model.config.architecture:
        raise ModelError("the new model.yaml describes another network than the weights", path=out / CONFIG_FILE,
                         fix="change only the post-processing or the records of a saved model")
    out.mkdir(parents=True, exist_ok=True)
    files = {CONFIG_FILE: _text_writer(text)}
    if out.resolve() != model.path.resolve():
        for name in (WEIGHTS_FILE, CARD_FILE):
            if (model.path / name).is_file():
                files[name] = lambda tmp, src=model.path / name: shutil.copyfile(src, tmp)
    _write_files(out, files)
    log.info("saved model %r to %s (weights sha256 %s)", config.name, out, model.weights_sha256[:12])
    return out


def load_model(name_or_path: str | PathLike[str]) -> LoadedModel:
    """Load and validate a model folder (or a model name, see :func:`resolve_model_path`).

    Returns a :class:`LoadedModel` whose network is in eval mode on the CPU, with float32 weights.
    """
    found = check_model_folder(name_or_path)  # files, bytes and the recorded facts, before any tensor is read
    folder, config_path, weights_path = found.path, found.config, found.weights
    try:
        config = read_model_config(config_path)
    except ConfigError as exc:
        raise ModelError(f"invalid model config: {exc.reason}", path=config_path, value=exc.value,
                         fix=exc.fix or "correct model.yaml") from exc
    state, metadata = _read_safetensors(weights_path)
    network = build_network(config)
    _check_state(state, metadata, config, weights_path, network)
    network.load_state_dict(state, strict=True)  # copies (and casts float16 -> float32) into the parameters
    network.eval()
    sha = _sha256(weights_path)
    log.info("loaded model %r from %s (sha256 %s)", config.name, folder, sha[:12])
    return LoadedModel(config=config, network=network, path=folder, weights_sha256=sha)
