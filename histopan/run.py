"""What one slide run is, as data: its options (:class:`SegmentOptions`), its plan (:class:`RunPlan`, decided
once before any tile is read, see :func:`histopan.pipeline.plan_run`) and its result (:class:`SegmentResult`).
No paths are opened here; :mod:`histopan.pipeline` runs the plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histopan.checks import check_mpp
from histopan.engine import ModelRef
from histopan.errors import ConfigError
from histopan.outputs import staging_path
from histopan.stitching import IdScheme
from histopan.store import SlideStore
from histopan.tiling import TileGrid

__all__ = ["RunPlan", "SegmentOptions", "SegmentResult"]


@dataclass(frozen=True)
class SegmentOptions:
    """Settings of one ``histopan segment`` run (the model's own config supplies the rest)."""

    model: str = "default"
    mpp: float | None = None  # slide microns per pixel, overriding the file's metadata
    device: str | None = None  # "cuda", "cpu", "cuda:1"; None = cuda when available
    tile: int | None = None  # core size at the model's mpp; None = the model's
    halo: int | None = None  # None = the model's
    batch_size: int | None = None  # tiles per network batch; None = fit the device (see auto_batch_size)
    workers: int = 2  # threads for reading and post-processing
    overwrite: bool = False
    min_tissue: float = 0.01  # minimum tissue fraction of a core (0: every tile, no tissue detection or glass rule)
    origin: tuple[int, int] = (0, 0)  # grid origin (for seam tests); chunks always start at 0
    tta: bool = False  # test-time augmentation: logits averaged over 8 flips / rotations (8x inference)

    def __post_init__(self) -> None:
        if self.mpp is not None:
            check_mpp(self.mpp, what="--mpp", fix="pass e.g. --mpp 0.25 for a 40x slide or --mpp 0.5 for 20x",
                      error=ConfigError)
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if value is None and name == "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number", value=value,
                                  fix=f"pass e.g. --{name.replace('_', '-')} 4")
        if self.tile is not None and (self.tile < 64 or self.tile % 32):
            raise ConfigError("--tile must be a multiple of 32 and at least 64", value=self.tile,
                              fix="pass e.g. --tile 512")
        if not isinstance(self.tta, bool):
            raise ConfigError("tta must be true or false", value=self.tta, fix="pass --tta to switch it on")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError("the minimum tissue fraction must be in [0, 1]", value=self.min_tissue,
                              fix="use e.g. 0.01")


@dataclass
class SegmentResult:
    """What a finished run reports (also stored as the store's ``summary``)."""

    store: Path
    n_nuclei: int
    n_tiles: int
    n_tissue_tiles: int
    n_cut: int
    stuff_area_mm2: dict[str, float]
    megapixels: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    resumed_tiles: int = 0
    tissue_mask_mm2: float | None = None  # the tissue detector's mask (None: no detection, --min-tissue 0)

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "store": str(self.store),
                "megapixels_per_second": self.megapixels_per_second}

    @classmethod
    def from_json(cls, summary: dict[str, Any]) -> SegmentResult:
        """The result that :meth:`to_json` wrote (a store's ``summary``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in summary.items() if k in names}, "store": Path(summary["store"])})


@dataclass
class RunPlan:
    """Everything one slide's run needs, decided once before any tile is read (see :func:`plan_run`).

    Plain data (paths, the grid, tile indices): it pickles, so a distributed batch can ship it to workers,
    which reopen the slide and the store by path.  Pickling replaces the model by its
    :class:`~histopan.engine.ModelRef`.
    """

    slide: Path
    slide_mpp: float | None  # the user's override, if any (workers reopen the slide with it)
    out: Path
    model: Any  # LoadedModel (a ModelRef once the plan has been pickled)
    grid: TileGrid
    selected: np.ndarray  # tissue tiles, row-major indices
    batches: list[np.ndarray]  # fixed slices of ``selected``: the network always sees the same batches
    ids: IdScheme
    base_mpp: float
    tissue_seconds: float
    batch_size: int = 8  # tiles per network batch (options.batch_size, or fitted to the device)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def staging(self) -> Path:
        """Where the run's store is built until it is complete and swapped in as ``out``."""
        return staging_path(self.out)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": ModelRef.of(self.model)}

    def pending_batches(self, store: SlideStore) -> tuple[list[np.ndarray], int]:
        """Batches with at least one tile not yet recorded (a resumed run recomputes whole batches), and the
        number of tiles in the others (done by an earlier run)."""
        todo = [b for b in self.batches if not all(store.has_tile(int(t)) for t in b)]
        return todo, int(len(self.selected) - sum(len(b) for b in todo))
