"""Training data packed into one folder, to train on a machine that does not have the data folders.

``histopan train CONFIG --pack-data DIR`` reads the config's data sets exactly as training does and writes
them to ``DIR``; ``histopan train CONFIG --data DIR --out RUN`` then trains from ``DIR`` (e.g. on a GPU node
that only receives the repository and the pack).  The samples loaded from a pack equal those
:func:`~histopan.training.data.load_training_data` gives, array for array:

- an image that training shrinks to the model's mpp (or keeps) is stored as a lossless PNG at the model's
  mpp, which is smaller than its source;
- an image that training enlarges (a tile scanned coarser than the model's mpp) is stored as a byte copy of
  its source file and resampled when the pack is loaded, with the same function as training;
- instance labels (at the model's mpp, and at the data's own resolution for validation images) go into one
  compressed ``labels.npz`` (read back without pickle).

``index.json`` lists the samples and the data part of the config they were made for (set names, mpp, the
validation split, the tile classes, the model's classes, mpp and crop); a pack made for another data part is
refused.  The sampling weights, the schedule, the loss and everything else may differ from the packing
config.
"""

from __future__ import annotations

import json
import logging
import shutil
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histopan.errors import ConfigError, DataError
from histopan.training.config import TrainConfig
from histopan.training.data import IMAGE_SUFFIXES, Sample, TrainingData, read_rgb, resample_image

log = logging.getLogger(__name__)

__all__ = ["PACK_FORMAT", "data_signature", "load_packed", "pack_training_data"]

PACK_FORMAT = "histopan-training-pack/1"
#: the sample groups of a pack, in the field order of :class:`~histopan.training.data.TrainingData`
GROUPS = ("train_nuclei", "train_tiles", "val_nuclei", "val_tiles", "train_masks", "val_masks")
INDEX = "index.json"
LABELS = "labels.npz"


def data_signature(config: TrainConfig) -> dict[str, Any]:
    """The part of a training config that decides which samples exist and how they are resampled."""
    return {
        "model_mpp": config.model.mpp,
        "classes": list(config.model.class_names),
        "crop": config.crop,
        "nuclei": [{"set": Path(s.path).name, "mpp": s.mpp, "val": sorted(s.val), "exclude": sorted(s.exclude)}
                   for s in config.nuclei],
        "tiles": [{"set": Path(s.path).name, "mpp": s.mpp, "classes": dict(sorted(s.classes.items())),
                   "val": sorted(s.val), "pad_to_crop": s.pad_to_crop} for s in config.tiles],
        "masks": [{"set": Path(s.path).name, "mpp": s.mpp, "group_by": s.group_by,
                   "foreground": {k: s.foreground_classes(k) and list(s.foreground_classes(k))
                                  for k in sorted(s.foreground)},
                   "rest": s.rest, "glass_um2": s.glass_um2, "val": sorted(s.val)} for s in config.masks],
    }


def _tile_source(config: TrainConfig, sample: Sample) -> Path:
    """The file a tile-set sample was read from (``<set>/<class folder>/<name>.<suffix>``)."""
    for tset in config.tiles:
        folder = Path(tset.path)
        if folder.name != sample.dataset:
            continue
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            for suffix in IMAGE_SUFFIXES:
                for candidate in (sub / f"{sample.name}{suffix}", sub / f"{sample.name}{suffix.upper()}"):
                    if candidate.is_file():
                        return candidate
    raise DataError("cannot find the source file of a tile", path=sample.dataset, value=sample.name,
                    fix="pack the data from the same folders the config names")


def pack_training_data(config: TrainConfig, data: TrainingData, folder: str | PathLike[str]) -> Path:
    """Write ``data`` (loaded for ``config``) into ``folder``; returns the folder.

    ``folder`` must not exist yet or be empty, so a pack is never mixed with another one.
    """
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("the pack folder already exists and is not empty", path=out,
                          fix="choose a new folder for --pack-data, or delete this one")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    entries = []
    groups = (("train_nuclei", data.train_nuclei), ("val_nuclei", data.val_nuclei),
              ("train_tiles", data.train_tiles), ("val_tiles", data.val_tiles),
              ("train_masks", data.train_masks), ("val_masks", data.val_masks))
    for group, samples in groups:
        for i, s in enumerate(samples):
            key = f"{group}-{i:05d}"
            entry: dict[str, Any] = {"group": group, "key": key, "name": s.name, "dataset": s.dataset,
                                     "stuff_class": s.stuff_class, "source_mpp": s.source_mpp,
                                     "native_shape": None if s.native_shape is None else list(s.native_shape)}
            if s.regions is not None:  # mask sets: the source file (small), the region map at the model's mpp
                entry["image"] = f"{key}{s.source.suffix.lower()}"
                entry["resample_from"] = s.source_mpp
                entry["region_bits"] = list(s.region_bits)
                shutil.copyfile(s.source, tmp / entry["image"])
                arrays[f"{key}.regions"] = s.regions
            elif s.source_mpp > config.model.mpp * (1 + 1e-9):  # enlarged by training: keep the smaller source
                src = _tile_source(config, s) if s.labels is None else None
                if src is None:
                    raise DataError("a nucleus image coarser than the model's mpp cannot be packed", path=s.dataset,
                                    value=s.name, fix="train at the data's mpp or coarser")
                entry["image"] = f"{key}{src.suffix.lower()}"
                entry["resample_from"] = s.source_mpp
                shutil.copyfile(src, tmp / entry["image"])
            else:
                entry["image"] = f"{key}.png"
                Image.fromarray(s.image).save(tmp / entry["image"], optimize=True)
            if s.labels is not None:
                arrays[f"{key}.labels"] = s.labels
            if s.native_labels is not None:
                arrays[f"{key}.native"] = s.native_labels
            entries.append(entry)
    np.savez_compressed(tmp / LABELS, **arrays)
    index = {"format": PACK_FORMAT, "signature": data_signature(config), "samples": entries}
    (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    log.info("packed %d samples into %s", len(entries), out)
    return out


def load_packed(folder: str | PathLike[str], config: TrainConfig) -> TrainingData:
    """The :class:`TrainingData` of a pack written by :func:`pack_training_data` for the same data config."""
    root = Path(folder)
    index_path = root / INDEX
    if not index_path.is_file():
        raise DataError("not a training-data pack (index.json is missing)", path=root,
                        fix="make one with 'histopan train CONFIG --pack-data DIR'")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"the pack's index is not valid JSON: {exc}", path=index_path,
                        fix="pack the data again with --pack-data") from exc
    if not isinstance(index, dict) or index.get("format") != PACK_FORMAT:
        raise DataError("unknown training-data pack format", path=index_path,
                        value=index.get("format") if isinstance(index, dict) else None,
                        fix=f"pack the data again with this version of histopan ({PACK_FORMAT})")
    want = json.loads(json.dumps(data_signature(config)))
    if index.get("signature") != want:
        have = index.get("signature") or {}
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ConfigError("the pack was made for other data than this config names", path=root, value=differ,
                          fix="pack the data again with this config (--pack-data), or train with the config it was made for")
    groups: dict[str, list[Sample]] = {k: [] for k in GROUPS}
    with np.load(root / LABELS, allow_pickle=False) as npz:
        labels = {k: npz[k] for k in npz.files}
    for e in index["samples"]:
        path = root / e["image"]
        image = read_rgb(path)
        if e.get("resample_from") is not None:
            image = resample_image(image, float(e["resample_from"]), config.model.mpp)
        shape = e.get("native_shape")
        groups[e["group"]].append(Sample(
            name=e["name"], dataset=e["dataset"], image=image, labels=labels.get(f"{e['key']}.labels"),
            stuff_class=e["stuff_class"], source_mpp=float(e["source_mpp"]),
            native_labels=labels.get(f"{e['key']}.native"), native_shape=None if shape is None else tuple(shape),
            regions=labels.get(f"{e['key']}.regions"),
            region_bits=tuple(e.get("region_bits") or (0, 0, 0)), source=path if "region_bits" in e else None))
    log.info("loaded %d samples from the pack %s", len(index["samples"]), root)
    return TrainingData(*(tuple(groups[k]) for k in GROUPS))
