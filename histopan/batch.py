"""Many slides on a Dask distributed cluster: ``histopan batch``.

The single-slide pipeline's building blocks become Dask tasks:

- *plan* (one per slide): tissue detection, the tile grid, and creating or resuming the slide's store
  (:func:`~histopan.pipeline.plan_run`); a store that is already complete is reported, not redone;
- *read -> infer -> record* (one chain per fixed batch of tissue tiles): pass 1's engine
  (:mod:`histopan.engine`, the same functions ``histopan segment`` runs): the windows are read, the network
  runs on a worker holding a ``GPU`` resource when the cluster has any, and each tile's record is made and
  saved in the store's resume state by a worker that reopens the store by path;
- *finish* (one per slide, after all its chains): pass 2, the nucleus table, the pyramids, and marking the
  store complete (:func:`~histopan.pipeline.finish_run`).

Batches are the plan's fixed slices, so a slide segmented here gives the same arrays as ``histopan
segment`` with the same options and device.  Workers open slides, the model (checked against its
sha256) and the network once per process (the engine's caches).  The client keeps a bounded number of
batches in flight, taken round-robin from a few open slides, so tiles of several slides interleave and
memory stays bounded however many slides are queued.  A slide whose task fails is recorded with its error
and traceback and its other tasks are cancelled; the other slides go on.  A worker that dies is replaced (by
its nanny) and the scheduler recomputes what it held; records are written atomically, so nothing is
half-written.

Stores are written by path from the workers: every worker must see ``OUTDIR`` (and the slides and the
model) at the same path, e.g. on a shared filesystem.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import math
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from histopan import __version__
from histopan.engine import ModelRef, Timer, cached_inferencer, cached_model, cached_reader, infer_batch, \
    read_batch, record_tile
from histopan.checks import check_mpp, check_output
from histopan.errors import ConfigError, HistopanError
from histopan.outputs import output_lock
from histopan.pipeline import RunPlan, SegmentOptions, finish_run, plan_run

log = logging.getLogger(__name__)

__all__ = ["BatchOptions", "BatchResult", "SlideJob", "SlideReport", "SLIDE_SUFFIXES", "batch_client",
           "default_batch_size", "find_slides", "local_address", "local_cluster", "run_batch", "write_report"]

#: file suffixes picked up when SLIDES is a folder (a DICOM WSI, several files per slide, needs a manifest).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif", ".tiff")
_OME_SUFFIXES = (".ome.tif", ".ome.tiff")
REPORT_NAME = "batch_report"

Progress = Callable[[str, dict[str, Any]], None]


# ------------------------------------------------------------------------------------------------ input


@dataclass(frozen=True)
class SlideJob:
    """One slide of a batch: its file, the store it goes to, and an optional mpp override."""

    slide: Path
    out: Path
    mpp: float | None = None

    @property
    def name(self) -> str:
        return self.out.name[: -len(".zarr")]


def _stem(path: Path) -> str:
    lower = path.name.lower()
    for suffix in _OME_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"{where}: not a usable output name", value=name,
                          fix="use a plain file name without slashes, e.g. case_001")
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def _read_manifest(path: Path, outdir: Path) -> list[SlideJob]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise ConfigError("the CSV manifest has no 'path' column", path=path, value=reader.fieldnames,
                              fix="start the file with a header line 'path,mpp,name' (mpp and name optional)")
        jobs = []
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            if not row.get("path"):
                raise ConfigError(f"line {line} of the manifest has no slide path", path=path,
                                  fix="fill in the path column (relative paths are relative to the CSV's folder)")
            slide = Path(row["path"]).expanduser()
            slide = slide if slide.is_absolute() else path.parent / slide
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                except ValueError:
                    mpp = row["mpp"]  # refused as text below
                mpp = check_mpp(mpp, what=f"line {line} of the manifest: mpp", path=path, error=ConfigError,
                                fix="write e.g. 0.25 for 40x, 0.5 for 20x, or leave it empty")
            name = _check_name(row["name"], f"{path} line {line}") if row.get("name") else _stem(slide)
            jobs.append(SlideJob(slide, outdir / f"{name}.zarr", mpp))
    return jobs


def find_slides(slides: str | PathLike[str], outdir: str | PathLike[str]) -> list[SlideJob]:
    """The slides of a batch and their stores ``OUTDIR/<name>.zarr``.

    ``slides`` is a folder (its files with a :data:`SLIDE_SUFFIXES` suffix), a glob pattern (``"in/*.svs"``),
    a single slide file, or a CSV manifest with a header and the columns ``path`` and optionally ``mpp``
    (overrides the file's metadata) and ``name`` (the store's name; default: the file name without suffix).
    Two slides with the same output name are refused.
    """
    text = os.fspath(slides)
    path = Path(text).expanduser()
    outdir = Path(outdir)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(SLIDE_SUFFIXES))
        jobs = [SlideJob(p, outdir / f"{_stem(p)}.zarr") for p in files]
        where = f"the folder {path} (suffixes {', '.join(SLIDE_SUFFIXES)})"
    elif path.is_file() and path.suffix.lower() == ".csv":
        jobs = _read_manifest(path, outdir)
        where = f"the manifest {path}"
    elif path.is_file():
        jobs = [SlideJob(path, outdir / f"{_stem(path)}.zarr")]
        where = str(path)
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        jobs = [SlideJob(p, outdir / f"{_stem(p)}.zarr") for p in files]
        where = f"the pattern {text!r}"
    else:
        raise ConfigError("SLIDES is not a folder, a slide file, a CSV manifest or a glob pattern", path=path,
                          fix="pass a folder of slides, a quoted pattern like 'slides/*.svs', or a manifest.csv")
    if not jobs:
        raise ConfigError(f"no slides found in {where}", path=path,
                          fix="check the path; list other files in a CSV manifest (column 'path')")
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.out in seen:
            raise ConfigError(f"two slides would write the same store {job.out.name}", path=job.slide,
                              value=str(seen[job.out]),
                              fix="give them distinct names in a CSV manifest (column 'name')")
        seen[job.out] = job.slide
    return jobs


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs: the per-slide settings and the cluster.

    ``scheduler`` joins an existing cluster (``tcp://host:8786``); otherwise a local cluster is started with
    ``gpus`` single-threaded GPU workers (resource ``GPU=1`` each, pinned with ``CUDA_VISIBLE_DEVICES``)
    and ``workers`` CPU worker processes of ``threads_per_worker`` threads (default: one per CPU core, less
    one per GPU).  ``in_flight`` bounds the tile batches submitted at once (default: two per worker thread)
    and ``open_slides`` the slides whose batches are interleaved (default: one per worker, at least two).
    """

    segment: SegmentOptions = field(default_factory=SegmentOptions)
    scheduler: str | None = None
    workers: int | None = None
    gpus: int = 0
    threads_per_worker: int = 1
    in_flight: int | None = None
    open_slides: int | None = None
    dashboard_address: str | None = "127.0.0.1:8787"

    def __post_init__(self) -> None:
        for name in ("workers", "in_flight", "open_slides"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number", value=value,
                                  fix=f"pass e.g. --{name.replace('_', '-')} 2")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ConfigError("--gpus must be a whole number >= 0", value=self.gpus, fix="pass e.g. --gpus 4")
        if isinstance(self.threads_per_worker, bool) or not isinstance(self.threads_per_worker, int) \
                or self.threads_per_worker < 1:
            raise ConfigError("--threads-per-worker must be a positive whole number", value=self.threads_per_worker,
                              fix="pass e.g. --threads-per-worker 1")
        if self.scheduler is not None and (self.gpus or self.workers):
            raise ConfigError("--gpus and --workers describe a local cluster; they cannot be used with --scheduler",
                              value=self.scheduler, fix="start the workers of the existing cluster with the "
                                                        "resources they need (see workflows/batch-gpu/README.md)")


# ------------------------------------------------------------------------------------------------ report


@dataclass
class SlideReport:
    """One line of the batch report."""

    slide: str
    name: str
    store: str
    status: str  # "done", "already_complete" or "failed"
    n_nuclei: int | None = None
    stuff_area_mm2: dict[str, float] = field(default_factory=dict)
    n_tissue_tiles: int | None = None
    resumed_tiles: int | None = None
    megapixels: float | None = None
    seconds: float | None = None
    megapixels_per_second: float | None = None
    error: str = ""
    traceback: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class BatchResult:
    """The outcome of :func:`run_batch`: one report per slide, in the input order."""

    reports: list[SlideReport]
    seconds: float
    dashboard: str | None = None
    cluster: dict[str, Any] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.reports)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.reports) for s in ("done", "already_complete", "failed")}

    def to_json(self) -> dict[str, Any]:
        return {"histopan": __version__, "seconds": self.seconds, "cluster": self.cluster, **self.counts(),
                "slides": [r.to_json() for r in self.reports]}


def write_report(result: BatchResult, outdir: str | PathLike[str]) -> tuple[Path, Path]:
    """Write ``OUTDIR/batch_report.csv`` (one row per slide, one ``area_mm2_<class>`` column per class) and
    ``OUTDIR/batch_report.json``; returns both paths."""
    outdir = Path(outdir)
    classes: list[str] = []
    for r in result.reports:
        classes += [c for c in r.stuff_area_mm2 if c not in classes]
    csv_path, json_path = outdir / f"{REPORT_NAME}.csv", outdir / f"{REPORT_NAME}.json"
    columns = ["slide", "name", "store", "status", "n_nuclei", *[f"area_mm2_{c}" for c in classes],
               "n_tissue_tiles", "resumed_tiles", "megapixels", "seconds", "megapixels_per_second", "error",
               "traceback"]
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in result.reports:
            row = r.to_json()
            areas = row.pop("stuff_area_mm2")
            row.update({f"area_mm2_{c}": areas.get(c) for c in classes})
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    json_path.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return csv_path, json_path


# ------------------------------------------------------------------------------------------------ tasks


@dataclass
class _Planned:
    """What the plan task returns: a plan and its pending batches, or the summary of a complete store."""

    plan: RunPlan | None
    pending: list[np.ndarray]
    resumed: int
    started: float  # wall-clock time (time.time) the slide's work began
    summary: dict[str, Any] | None = None
    error: str | None = None  # a user error that stopped the plan (a bad slide): its one-line message
    traceback: str = ""  # and where it was raised, for the report's traceback column


def _plan_or_refuse(job: SlideJob, options: SegmentOptions, model: ModelRef) -> _Planned:
    """:func:`_plan_task`, with a bad slide's :class:`HistopanError` returned as the plan's ``error`` rather than
    raised: it is the slide's one-line report (its traceback goes to the report file only), not a failure of
    the cluster, which Dask would log on the worker's console with the traceback."""
    try:
        return _plan_task(job, options, model)
    except HistopanError as exc:
        return _Planned(None, [], 0, time.time(), error=f"{type(exc).__name__}: {exc}",
                        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _plan_task(job: SlideJob, options: SegmentOptions, model: ModelRef) -> _Planned:
    from histopan.outputs import publish, recover
    from histopan.store import open_store

    started = time.time()
    recover(job.out)  # the client holds the output's lock
    if not options.overwrite and (job.out / "zarr.json").is_file():
        store = open_store(job.out, partial=True)
        if store.complete:
            return _Planned(None, [], 0, started, summary=dict(store.attrs.get("summary", {})))
    if job.mpp is not None:
        options = dataclasses.replace(options, mpp=job.mpp)
    plan, store = plan_run(cached_reader(job.slide, options.mpp), job.out, options, model=cached_model(model))
    if store.complete:  # finished before, but stopped before its store was swapped in
        publish(job.out)
        return _Planned(None, [], 0, started, summary=dict(store.attrs.get("summary", {})))
    pending, resumed = plan.pending_batches(store)
    return _Planned(plan, pending, resumed, started)


def _read_task(plan: RunPlan, batch: np.ndarray) -> tuple[np.ndarray, float]:
    return read_batch(cached_reader(plan.slide, plan.slide_mpp), plan.grid, batch)


def _infer_task(plan: RunPlan, read: tuple[np.ndarray, float], device: str | None, batch_size: int,
                tta: bool = False) -> tuple[list[Any], float, float]:
    windows, t_read = read
    maps, t_model = infer_batch(cached_inferencer(plan.model, device, batch_size, tta), windows)
    return maps, t_read, t_model


def _post_task(plan: RunPlan, inferred: tuple[list[Any], float, float], batch: np.ndarray) -> dict[str, float]:
    from histopan.store import open_store

    maps, t_read, t_model = inferred
    store = open_store(plan.staging, partial=True)
    tissue = store.tissue_region()
    nuclei, t_post = 0, 0.0
    for m, index in zip(maps, batch):
        record, seconds = record_tile(m, plan.grid, int(index), plan.config, plan.ids, tissue=tissue)
        store.save_tile(int(index), record.to_arrays())
        nuclei += len(record)
        t_post += seconds
    return {"tiles": len(batch), "nuclei": nuclei, "read": t_read, "model": t_model, "postprocess": t_post}


def _finish_task(plan: RunPlan, resumed: int, started: float, *batches: dict[str, float]) -> dict[str, Any]:
    from histopan.outputs import publish
    from histopan.store import open_store

    # a retry of a finish that completed (and swapped the store in, or not yet) on a worker that died before
    # reporting
    if not plan.staging.exists():
        return dict(open_store(plan.out).attrs["summary"])
    store = open_store(plan.staging, partial=True)
    if store.complete:
        publish(plan.out)
        return dict(store.attrs["summary"])
    timer = Timer()
    timer.add("tissue", plan.tissue_seconds)
    for b in batches:
        for stage in ("read", "model", "postprocess"):
            timer.add(stage, b[stage])
    t_start = time.perf_counter() - (time.time() - started)  # the slide's wall clock, on this process's timer
    reader = cached_reader(plan.slide, plan.slide_mpp)
    return finish_run(plan, store, reader, lambda event, data: None, timer, t_start, resumed).to_json()


# ------------------------------------------------------------------------------------------------ cluster


def local_cluster(workers: int | None = None, gpus: int = 0, threads_per_worker: int = 1,
                  dashboard_address: str | None = "127.0.0.1:8787") -> Any:
    """A local Dask cluster for a batch: ``workers`` CPU worker processes (default: one per core, less one
    per GPU) and, with ``gpus``, one single-threaded worker per GPU holding the resource ``GPU=1`` and seeing
    only its own device (``CUDA_VISIBLE_DEVICES``); the CPU workers then hold ``CPU=<threads>`` and see no
    GPU, so reading and post-processing stay off the GPU workers."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    n_cpu = workers if workers is not None else max(1, (os.cpu_count() or 1) - gpus)
    dashboard_address = local_address(dashboard_address)
    if gpus == 0:
        return LocalCluster(n_workers=n_cpu, threads_per_worker=threads_per_worker, processes=True,
                            host=LOCALHOST, dashboard_address=dashboard_address)
    specs: dict[str, dict[str, Any]] = {}
    for i in range(gpus):
        specs[f"gpu-{i}"] = {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                                       "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
    for i in range(n_cpu):
        specs[f"cpu-{i}"] = {"cls": Nanny, "options": {"nthreads": threads_per_worker,
                                                       "resources": {"CPU": threads_per_worker},
                                                       "env": {"CUDA_VISIBLE_DEVICES": ""}}}
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"host": LOCALHOST,
                                                                              "dashboard_address": dashboard_address}})


#: the interface a local cluster's scheduler and dashboard listen on: this machine only
LOCALHOST = "127.0.0.1"


def local_address(address: str | None) -> str | None:
    """``address`` for a local cluster's dashboard, bound to localhost when it names no host (``":8787"``,
    ``"8787"``, ``":0"``); an explicit host (``"0.0.0.0:8787"``) is kept, and None (no dashboard) stays None."""
    if address is None:
        return None
    text = str(address).strip()
    if text.startswith(":"):
        return f"{LOCALHOST}{text}"
    if text.isdigit():
        return f"{LOCALHOST}:{text}"
    return text


@contextmanager
def batch_client(options: BatchOptions, connect_timeout: float = 60.0) -> Iterator[Any]:
    """A ``distributed.Client`` for ``options``: connected to ``options.scheduler``, or to a local cluster
    started (and shut down afterwards) here."""
    from distributed import Client

    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout=connect_timeout)
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler: {exc}", value=options.scheduler,
                              fix="check the address (tcp://host:8786) and that the scheduler is running") from exc
        with client:
            yield client
        return
    cluster = local_cluster(options.workers, options.gpus, options.threads_per_worker, options.dashboard_address)
    with cluster, Client(cluster) as client:
        yield client


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class _Slide:
    index: int
    job: SlideJob
    report: SlideReport
    planned: _Planned | None = None
    view: RunPlan | None = None  # the plan without its tile lists, shipped with every tile task
    queue: deque[np.ndarray] = field(default_factory=deque)
    futures: list[Any] = field(default_factory=list)  # plan, post-process and finish futures (not read/infer:
    posts: list[Any] = field(default_factory=list)  # dropping those lets the cluster free them early)
    n_submitted: int = 0
    n_tiles: int = 0
    done_tiles: int = 0
    nuclei: int = 0


class _Runner:
    """The client's loop: plans a few slides ahead, keeps ``in_flight`` tile batches submitted (round-robin
    over the open slides), submits each slide's finish once all its batches are submitted, and records what
    comes back."""

    def __init__(self, client: Any, jobs: Sequence[SlideJob], options: BatchOptions, model: ModelRef,
                 emit: Progress) -> None:
        self.client, self.options, self.model, self.emit = client, options, model, emit
        self.slides = [_Slide(i, job, SlideReport(str(job.slide), job.name, str(job.out), "running"))
                       for i, job in enumerate(jobs)]
        self.token = uuid.uuid4().hex[:8]
        info = list(client.scheduler_info()["workers"].values())
        self.threads = sum(int(w.get("nthreads", 1)) for w in info)
        self.gpus = sum(float(w.get("resources", {}).get("GPU", 0)) for w in info)
        has_cpu_resource = any(w.get("resources", {}).get("CPU", 0) for w in info)
        self.gpu_resources = {"GPU": 1} if self.gpus else None
        self.cpu_resources = {"CPU": 1} if has_cpu_resource else None
        self.in_flight = options.in_flight or max(2, 2 * self.threads)
        self.open_limit = options.open_slides or max(2, len(info))
        self.cluster = {"workers": len(info), "threads": self.threads, "gpus": self.gpus,
                        "in_flight": self.in_flight, "open_slides": self.open_limit}
        self.to_plan: deque[_Slide] = deque(self.slides)
        self.planning: set[int] = set()
        self.open: deque[_Slide] = deque()
        self.meta: dict[str, tuple[str, _Slide, int]] = {}
        self.busy = 0
        self.ac: Any = None

    def _submit(self, func: Callable[..., Any], *args: Any, kind: str, slide: _Slide, resources: Any,
                priority: int, track: bool = True) -> Any:
        """Submit one task; downstream stages get higher priority, so started chains finish first."""
        key = f"histopan-{kind}-{self.token}-{slide.index}-{slide.n_submitted}"
        slide.n_submitted += 1
        future = self.client.submit(func, *args, key=key, resources=resources, priority=priority)
        if track:
            slide.futures.append(future)
            self.meta[future.key] = (kind, slide, 0)
            self.ac.add(future)
        return future

    def _submit_plans(self) -> None:
        while self.to_plan and len(self.planning) + len(self.open) < self.open_limit:
            s = self.to_plan.popleft()
            self._submit(_plan_or_refuse, s.job, self.options.segment, self.model, kind="plan", slide=s,
                         resources=self.cpu_resources, priority=0)
            self.planning.add(s.index)

    def _submit_batches(self) -> None:
        seg = self.options.segment
        while self.busy < self.in_flight and self.open:
            s = self.open[0]
            self.open.rotate(-1)
            batch = s.queue.popleft()
            read = self._submit(_read_task, s.view, batch, kind="read", slide=s, resources=self.cpu_resources,
                                priority=1, track=False)
            maps = self._submit(_infer_task, s.view, read, seg.device, s.view.batch_size, seg.tta, kind="infer", slide=s,
                                resources=self.gpu_resources, priority=2, track=False)
            post = self._submit(_post_task, s.view, maps, batch, kind="post", slide=s,
                                resources=self.cpu_resources, priority=3)
            self.meta[post.key] = ("post", s, len(batch))
            s.posts.append(post)
            self.busy += 1
            if not s.queue:
                self.open.remove(s)
                self._submit_finish(s)

    def _submit_finish(self, s: _Slide) -> None:
        assert s.planned is not None and s.planned.plan is not None  # internal: only planned slides get here
        self._submit(_finish_task, s.planned.plan, s.planned.resumed, s.planned.started, *s.posts, kind="finish",
                     slide=s, resources=self.cpu_resources, priority=4)

    def run(self) -> list[SlideReport]:
        from distributed import as_completed

        self.ac = as_completed()
        try:
            self._loop()
        finally:  # interrupted (e.g. Ctrl-C): leave nothing of this run queued on the cluster
            self.client.cancel([f for s in self.slides for f in s.futures if not f.done()])
        return [s.report for s in self.slides]

    def _loop(self) -> None:
        self._submit_plans()
        for fut in self.ac:
            kind, s, n = self.meta.pop(fut.key)
            if kind == "post":
                self.busy -= 1
            if s.report.status != "running":
                pass  # the leftovers of a failed slide
            elif fut.status != "finished":
                self._fail(s, fut)
            elif kind == "plan":
                self.planning.discard(s.index)
                # forget the plan's future: were its worker lost, the scheduler would otherwise re-run the plan
                # (with --overwrite, deleting the store its tiles are being written to)
                s.futures.remove(fut)
                self._planned(s, fut.result())
            elif kind == "post":
                summary = fut.result()
                s.done_tiles += n
                s.nuclei += int(summary["nuclei"])
                self.emit("slide_tiles", {"index": s.index, "name": s.job.name, "done": s.done_tiles,
                                          "tiles": s.n_tiles, "nuclei": s.nuclei})
            else:
                self._end(s, "done", fut.result())
            self._submit_plans()
            self._submit_batches()
            self._submit_plans()

    def _planned(self, s: _Slide, planned: _Planned) -> None:
        s.planned = planned
        if planned.error is not None:
            self._fail(s, error=planned.error, trace=planned.traceback)
            return
        if planned.plan is None:
            self._end(s, "already_complete", planned.summary or {})
            return
        plan = planned.plan
        s.view = dataclasses.replace(plan, selected=np.empty(0, np.int64), batches=[])
        s.queue = deque(planned.pending)
        s.n_tiles = int(len(plan.selected))
        s.done_tiles = planned.resumed
        self.emit("slide_start", {"index": s.index, "name": s.job.name, "tiles": s.n_tiles, "done": s.done_tiles})
        if s.queue:
            self.open.append(s)
        else:  # every tile recorded by an earlier run: only the finish is left
            self._submit_finish(s)

    def _release(self, s: _Slide) -> None:
        """Forget a slide's futures (cancelling those still pending), so the cluster drops its data."""
        self.client.cancel([f for f in s.futures if not f.done()])
        s.futures.clear()
        s.posts.clear()
        s.queue.clear()
        self.planning.discard(s.index)
        if s in self.open:
            self.open.remove(s)

    def _fail(self, s: _Slide, fut: Any = None, error: str | None = None, trace: str = "") -> None:
        if error is not None:
            s.report.error = error
            s.report.traceback = trace
        elif fut.status == "error":
            exc, tb = fut.exception(), fut.traceback()
            s.report.error = f"{type(exc).__name__}: {exc}"
            s.report.traceback = "".join(traceback.format_exception(type(exc), exc, tb))
        else:
            s.report.error = f"the task {fut.key} was {fut.status}"
        s.report.status = "failed"
        log.error("%s failed: %s", s.job.slide, s.report.error)
        self._release(s)
        self.emit("slide_end", {"index": s.index, "name": s.job.name, "status": "failed", "report": s.report})

    def _end(self, s: _Slide, status: str, summary: dict[str, Any]) -> None:
        r = s.report
        r.status = status
        r.n_nuclei = summary.get("n_nuclei")
        r.stuff_area_mm2 = dict(summary.get("stuff_area_mm2", {}))
        r.n_tissue_tiles = summary.get("n_tissue_tiles")
        r.megapixels = summary.get("megapixels")
        r.seconds = summary.get("seconds")
        r.megapixels_per_second = summary.get("megapixels_per_second")
        r.resumed_tiles = summary.get("n_tissue_tiles") if status == "already_complete" else summary.get(
            "resumed_tiles")
        self._release(s)
        self.emit("slide_end", {"index": s.index, "name": s.job.name, "status": status, "report": r})


#: tiles per network batch of a batch whose inference may run on GPUs (a --scheduler cluster, --gpus, or a
#: cuda --device) when --batch-size is not given
GPU_CLUSTER_BATCH = 8
#: tiles per network batch (and per task chain) on a local CPU-only cluster: about 2.5 GB per CPU worker
CPU_CLUSTER_BATCH = 2


def default_batch_size(options: BatchOptions) -> int:
    """The network batch of a batch run without ``--batch-size``: :data:`GPU_CLUSTER_BATCH` when inference may
    run on GPUs, else :data:`CPU_CLUSTER_BATCH` (a task chain per 2 tiles keeps the scheduler's share small and
    each CPU worker near 2.5 GB)."""
    device = options.segment.device or ""
    if options.gpus or options.scheduler or device.startswith("cuda"):
        return GPU_CLUSTER_BATCH
    return CPU_CLUSTER_BATCH


def run_batch(jobs: Sequence[SlideJob], options: BatchOptions = BatchOptions(), progress: Progress | None = None,
              client: Any = None) -> BatchResult:
    """Segment every slide of ``jobs`` into its store on a Dask cluster (see the module docstring).

    ``client`` (a ``distributed.Client``) runs the batch on its cluster; otherwise one is made from
    ``options`` (:func:`batch_client`).  ``progress(event, data)`` is called on this thread with
    ``"cluster"`` (dashboard link, workers), ``"slide_start"`` (tiles, already done), ``"slide_tiles"``
    (tiles done, nuclei so far) and ``"slide_end"`` (status, report).  Failed slides are reported, not
    raised; the model is checked here first, so a bad ``--model`` fails before any slide is touched.  The
    stores' folder is created if its parent exists.
    """
    from histopan.model.checkpoint import load_model

    if not jobs:
        raise ConfigError("no slides to process", fix="pass a folder, a glob pattern or a CSV manifest of slides")
    emit = progress or (lambda event, data: None)
    loaded = load_model(options.segment.model)
    if options.segment.batch_size is None:  # one batch size for every slide, whichever worker plans it
        options = dataclasses.replace(options, segment=dataclasses.replace(
            options.segment, batch_size=default_batch_size(options)))
    ref = ModelRef(Path(loaded.path).resolve(), loaded.weights_sha256, loaded.config)
    if options.scheduler is None and options.segment.device is not None:
        from histopan.inference import resolve_device

        resolve_device(options.segment.device)  # a local cluster has this machine's devices: fail before any store
    for parent in sorted({job.out.parent for job in jobs}):
        check_output(parent, folder=True).mkdir(exist_ok=True)
    with ExitStack() as locks:  # every output of the batch, held by this process while the workers write
        for job in jobs:
            locks.enter_context(output_lock(job.out))
        if client is None:
            with batch_client(options) as own:
                return _run(own, jobs, options, ref, emit)
        return _run(client, jobs, options, ref, emit)


def _run(client: Any, jobs: Sequence[SlideJob], options: BatchOptions, ref: ModelRef, emit: Progress) -> BatchResult:
    t0 = time.perf_counter()
    if options.scheduler:
        try:
            client.wait_for_workers(1, timeout=60)
        except TimeoutError as exc:
            raise ConfigError("the Dask cluster has no workers", value=options.scheduler,
                              fix="start workers with 'dask worker <scheduler address>'") from exc
    runner = _Runner(client, jobs, options, ref, emit)
    dashboard = client.dashboard_link if _has_dashboard(client) else None
    emit("cluster", {"dashboard": dashboard, **runner.cluster})
    log.info("batch of %d slides on %d workers (%d threads, %g GPUs)%s", len(jobs), runner.cluster["workers"],
             runner.threads, runner.gpus, f"; dashboard {dashboard}" if dashboard else "")
    reports = runner.run()
    return BatchResult(reports, time.perf_counter() - t0, dashboard, runner.cluster)


def _has_dashboard(client: Any) -> bool:
    services = client.scheduler_info().get("services", {})
    return "dashboard" in services
