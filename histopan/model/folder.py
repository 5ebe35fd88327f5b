"""A model folder on disk, without torch: where a model name points, what its files are, and the facts its
weights record (the safetensors header's metadata) checked against its ``model.yaml``.

:mod:`histopan.model.checkpoint` loads the network; everything here runs before torch is imported, so
``histopan segment`` and ``batch`` can refuse a wrong model folder in a fraction of a second
(:func:`check_model_folder`).  Nothing is ever unpickled: a pickle or zip (torch.save) checkpoint is refused by
its name or its first bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from histopan.errors import ConfigError, ModelError

__all__ = ["CARD_FILE", "CONFIG_FILE", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "ModelFolder", "available_models",
           "check_model_folder", "check_weights_metadata", "model_search_paths", "read_weights_metadata",
           "resolve_model_path"]

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "model.yaml"
CARD_FILE = "README.md"
#: file suffixes of pickle-based checkpoints, which are never loaded.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_REFUSE_FIX = ("histopan only loads safetensors; convert it once, in an environment you trust, by loading the "
               "state dict and calling histopan.model.checkpoint.save_model(folder, network, config)")


# -- locating models -----------------------------------------------------------------------------------
def _repo_models_dir() -> Path:
    import histopan

    return Path(histopan.__file__).resolve().parents[1] / "models"


def model_search_paths() -> list[Path]:
    """Folders searched for a bare model name: ``$HISTOPAN_MODELS`` entries, then ``<repo>/models``."""
    paths = [Path(p) for p in os.environ.get("HISTOPAN_MODELS", "").split(os.pathsep) if p]
    paths.append(_repo_models_dir())
    return paths


def available_models() -> list[str]:
    """Names of the model folders (those holding a ``model.yaml``) found in :func:`model_search_paths`."""
    names: list[str] = []
    for root in model_search_paths():
        if root.is_dir():
            for sub in sorted(root.iterdir()):
                if (sub / CONFIG_FILE).is_file() and sub.name not in names:
                    names.append(sub.name)
    return names


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith(".") or text.startswith("~") or Path(text).exists()


def resolve_model_path(name_or_path: str | PathLike[str]) -> Path:
    """The model folder for a model name or a path (a folder, its ``model.yaml`` or ``weights.safetensors``).

    A pickle checkpoint (``.pt/.pth/.ckpt/.pkl``) is refused here, before anything reads it.
    """
    if isinstance(name_or_path, PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError("refusing to load a pickle checkpoint (it can run arbitrary code)", path=path,
                             fix=_REFUSE_FIX)
        if path.is_file():
            if path.name in (CONFIG_FILE, WEIGHTS_FILE):
                return path.parent
            raise ModelError("expected a model folder (weights.safetensors + model.yaml), got a file",
                             path=path, fix="pass the folder that holds model.yaml and weights.safetensors")
        if not path.is_dir():
            raise ModelError("model folder not found", path=path,
                             fix=f"check the path; known model names: {available_models() or 'none'}")
        return path
    name = str(name_or_path)
    searched = model_search_paths()
    for root in searched:
        candidate = root / name
        if (candidate / CONFIG_FILE).is_file() or (candidate / WEIGHTS_FILE).is_file():
            return candidate
    known = available_models()
    raise ModelError(
        f"unknown model name (searched {', '.join(str(p) for p in searched)})",
        value=name,
        fix=(f"use one of {known}" if known else "no models are installed yet")
        + ", pass a model folder path, or set HISTOPAN_MODELS to a folder of models",
    )


# -- checking, without torch -----------------------------------------------------------------------
def _check_weights_bytes(path: Path) -> None:
    """Refuse pickles / zips and anything that does not start like a safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > size - 8:
            raise ModelError("the safetensors file is truncated (header longer than the file)", path=path,
                             value=size, fix="copy the model folder again or re-save it")
        return
    if head[:4] == b"PK\x03\x04":
        raise ModelError("this is a zip file (torch.save format), not safetensors; refusing to unpickle it",
                         path=path, fix=_REFUSE_FIX)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ModelError("this is a pickle file, not safetensors; refusing to unpickle it", path=path,
                         fix=_REFUSE_FIX)
    raise ModelError("not a safetensors file (bad header)", path=path, value=head[:9],
                     fix="re-save the model with histopan.model.checkpoint.save_model")

#: the largest safetensors header read (the format's own limit)
MAX_HEADER_BYTES = 100_000_000


def read_weights_metadata(path: str | PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file ``path`` (what :func:`~histopan.model.checkpoint.save_model`
    records: architecture, classes, nucleus types, ...), read from its JSON header alone."""
    path = Path(path)
    _check_weights_bytes(path)
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > MAX_HEADER_BYTES:
            raise ModelError("the safetensors header is implausibly large", path=path, value=length,
                             fix="copy the model folder again or re-save it")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"corrupt safetensors header: {exc}", path=path,
                         fix="copy the model folder again or re-save it") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _names(metadata: Mapping[str, str], key: str, path: Path) -> list[str] | None:
    if key not in metadata:
        return None
    try:
        names = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f"the weights' metadata {key!r} is not JSON", path=path, value=metadata[key],
                         fix="re-save the model with histopan.model.checkpoint.save_model") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelError(f"the weights' metadata {key!r} is not a list of names", path=path, value=names,
                         fix="re-save the model with histopan.model.checkpoint.save_model")
    return names


def check_weights_metadata(metadata: Mapping[str, str], *, weights: Path, config: Path,
                           class_names: Sequence[str] | None = None, type_names: Sequence[str] | None = None,
                           arch: str | None = None, encoder: str | None = None,
                           format_version: int | None = None) -> None:
    """Raise :class:`~histopan.errors.ModelError` unless what ``model.yaml`` (the file ``config``) says agrees with
    the facts the weights (the file ``weights``) recorded when they were saved: architecture and encoder,
    format version, and the class and nucleus type names in their order (channel ``i`` of the semantic head is
    the ``i``-th class: two swapped names would silently mislabel the areas).  A fact left out on either side
    (None, or absent from older weights' metadata) is not checked."""
    saved_arch = metadata.get("arch"), metadata.get("encoder")
    if arch is not None and encoder is not None and all(saved_arch) and saved_arch != (arch, encoder):
        raise ModelError(
            f"the weights were saved for {saved_arch[0]} with encoder {saved_arch[1]!r}, but model.yaml says "
            f"{arch} with encoder {encoder!r}",
            path=weights, value=encoder,
            fix=f"set architecture.arch: {saved_arch[0]} and architecture.encoder: {saved_arch[1]} in {config}, "
                "or use the weights trained for that config",
        )
    saved_version = metadata.get("format_version")
    if format_version is not None and saved_version is not None and saved_version != str(format_version):
        raise ModelError(f"the weights were saved with model format_version {saved_version}, but model.yaml says "
                         f"{format_version}", path=config, value=format_version,
                         fix=f"set format_version: {saved_version} in {config}")
    saved_classes, saved_types = _names(metadata, "classes", weights), _names(metadata, "nucleus_types", weights)
    if None not in (class_names, type_names, saved_classes, saved_types):
        n, n_saved = len(class_names) + 2 + len(type_names), len(saved_classes) + 2 + len(saved_types)
        if n != n_saved:
            raise ModelError(
                f"the weights have {n_saved} output channels (saved with classes {saved_classes} and nucleus types "
                f"{saved_types}), but model.yaml describes {n} output channels ({len(class_names)} classes "
                f"{list(class_names)} + centre + boundary + {len(type_names)} nucleus types)",
                path=weights, value=n_saved,
                fix=f"make 'classes' and 'nucleus_types' in {config} match the weights, or grow the heads with "
                    "histopan.model.network.grow_heads and fine-tune")
    for key, what, names, saved in (("classes", "classes", class_names, saved_classes),
                                    ("nucleus_types", "nucleus types", type_names, saved_types)):
        if names is None or saved is None or list(names) == saved:
            continue
        names = list(names)
        if sorted(names) == sorted(saved):
            problem = f"model.yaml lists the {what} in another order than the weights were trained with {saved}"
        elif len(names) == len(saved):
            problem = f"model.yaml names the {what} differently from the weights, which were trained with {saved}"
        else:
            problem = (f"model.yaml lists {len(names)} {what}, but the weights were trained with {len(saved)}: "
                       f"{saved}")
        raise ModelError(problem, path=config, value=names,
                         fix=f"list the {what} under '{key}' in {config} as {', '.join(saved) or 'none'}, in this "
                             f"order (the network's channels follow it); other {what} need other weights "
                             "(grow the heads and fine-tune: 'histopan finetune')")


@dataclass(frozen=True)
class ModelFolder:
    """A model folder that passed :func:`check_model_folder`: its paths and its weights' metadata."""

    path: Path
    config: Path
    weights: Path
    metadata: dict[str, str]


def check_model_folder(name_or_path: str | PathLike[str]) -> ModelFolder:
    """Find the model folder and check it without torch: both files there, the weights a safetensors file (never
    a pickle), and the class and nucleus type names, architecture and format version of ``model.yaml`` (read as
    plain YAML; :func:`~histopan.model.checkpoint.load_model` validates it fully) against the facts in the
    weights' metadata."""
    from histopan.config import load_yaml

    folder = resolve_model_path(name_or_path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"no {WEIGHTS_FILE}, only pickle checkpoint(s) {pickles}, which are never loaded",
                             path=folder, fix=_REFUSE_FIX)
        raise ModelError(f"{WEIGHTS_FILE} is missing", path=folder,
                         fix="copy the complete model folder (weights.safetensors + model.yaml)")
    if not config_path.is_file():
        raise ModelError(f"{CONFIG_FILE} is missing", path=folder,
                         fix="copy the complete model folder (weights.safetensors + model.yaml)")
    metadata = read_weights_metadata(weights_path)
    try:
        raw = load_yaml(config_path)
    except ConfigError as exc:
        raise ModelError(f"invalid model config: {exc.reason}", path=config_path, value=exc.value,
                         fix=exc.fix or "correct model.yaml") from exc
    architecture = raw.get("architecture")
    architecture = architecture if isinstance(architecture, dict) else {}
    version = raw.get("format_version")
    check_weights_metadata(metadata, weights=weights_path, config=config_path,
                           class_names=_yaml_names(raw, "classes"), type_names=_yaml_names(raw, "nucleus_types"),
                           arch=_text(architecture.get("arch")), encoder=_text(architecture.get("encoder")),
                           format_version=version if isinstance(version, int) and not isinstance(version, bool)
                           else None)
    return ModelFolder(folder, config_path, weights_path, metadata)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _yaml_names(raw: Mapping[str, Any], key: str) -> list[str] | None:
    """The names listed under ``key`` in a raw model.yaml, or None where it is absent or malformed (the full
    validation of :func:`~histopan.model.config.read_model_config` reports that)."""
    if key == "nucleus_types" and key not in raw:
        return []  # the config's default: no nucleus types
    entries = raw.get(key)
    if not isinstance(entries, list):
        return None
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    return names if all(isinstance(n, str) for n in names) else None
