"""``histopan batch`` on a real two-process Dask LocalCluster: failure isolation, resume, a killed worker.

A small random-weights network (its segmentation head scaled up and its thresholds lowered, so that the
watershed finds nuclei) at 2 um/px, 64 px tiles, runs on generated 1024 x 1024 slides at 0.5 um/px (16 tiles
each, 8 batches of 2).  One cluster serves every test of the module.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from histopan.batch import BatchOptions, SlideJob, find_slides, run_batch
from histopan.cli import main
from histopan.errors import ConfigError
from histopan.pipeline import SegmentOptions
from histopan.store import open_store
from histopan.testing import write_test_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slides_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for seed, name in enumerate(("a", "b")):
        write_test_slide(folder / f"{name}.svs", 1024, 1024, mpp=0.5, seed=seed, truth=False)
    (folder / "corrupt.svs").write_bytes((folder / "a.svs").read_bytes()[:5000])  # truncated
    return folder


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def _cli(slides: Path | str, out: Path, model: Path, client) -> int:
    return main(["-q", "batch", str(slides), "-o", str(out), "--scheduler", client.scheduler.address,
                 "--model", str(model), "--batch-size", "2"])


def _options(model: Path) -> BatchOptions:
    return BatchOptions(segment=SegmentOptions(model=str(model), batch_size=2), in_flight=2)


@pytest.fixture(scope="module")
def first_run(slides_folder, tiny_random_model, client, tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("out")
    return _cli(slides_folder, out, tiny_random_model, client), out


def _report(out: Path) -> dict[str, dict]:
    data = json.loads((out / "batch_report.json").read_text())
    return {row["name"]: row for row in data["slides"]}


def _labels(store_path: Path) -> tuple[np.ndarray, np.ndarray]:
    store = open_store(store_path)
    return store.semantic[:], store.nuclei[:]


def test_a_corrupt_slide_is_recorded_and_the_others_complete(first_run):
    code, out = first_run
    assert code == 1  # a slide failed
    rows = _report(out)
    assert {name: row["status"] for name, row in rows.items()} == {"a": "done", "b": "done", "corrupt": "failed"}
    assert "corrupt.svs" in rows["corrupt"]["error"] and "SlideError" in rows["corrupt"]["error"]
    assert "Traceback" in rows["corrupt"]["traceback"]
    assert not (out / "corrupt.zarr").exists()
    for name in ("a", "b"):
        store = open_store(out / f"{name}.zarr")  # complete (open_store refuses an incomplete one)
        table = store.read_table()
        assert rows[name]["n_nuclei"] == len(table) > 0
        assert set(table["id"]) == set(np.unique(store.nuclei[:])[1:].tolist())
        assert rows[name]["n_tissue_tiles"] == store.attrs["summary"]["n_tissue_tiles"] > 0
        assert rows[name]["seconds"] > 0 and rows[name]["megapixels_per_second"] > 0
        assert sum(rows[name]["stuff_area_mm2"].values()) > 0
    with (out / "batch_report.csv").open(newline="") as fh:
        table_rows = list(csv.DictReader(fh))
    assert [r["name"] for r in table_rows] == ["a", "b", "corrupt"]
    assert "area_mm2_stroma" in table_rows[0] and table_rows[2]["status"] == "failed"


def test_rerun_skips_complete_stores(first_run, slides_folder, tiny_random_model, client):
    _, out = first_run
    stamps = {p: p.stat().st_mtime_ns for name in ("a", "b") for p in (out / f"{name}.zarr").rglob("*")}
    assert _cli(slides_folder, out, tiny_random_model, client) == 1  # the corrupt slide still fails
    rows = _report(out)
    assert rows["a"]["status"] == rows["b"]["status"] == "already_complete"
    assert rows["a"]["n_nuclei"] > 0 and rows["corrupt"]["status"] == "failed"
    after = {p: p.stat().st_mtime_ns for name in ("a", "b") for p in (out / f"{name}.zarr").rglob("*")}
    assert after == stamps  # nothing rewritten


def test_a_slide_failing_mid_run_does_not_stop_the_others(slides_folder, tiny_random_model, client, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(slides_folder / "a.svs", src / "ok.svs")
    shutil.copy(slides_folder / "b.svs", src / "breaks.svs")

    def break_it(event: str, data: dict) -> None:
        if event == "slide_start" and data["name"] == "breaks":  # planned fine; its tiles cannot be read
            (src / "breaks.svs").write_bytes(b"overwritten while the batch runs")

    result = run_batch(find_slides(src, tmp_path / "out"), _options(tiny_random_model), progress=break_it,
                       client=client)
    reports = {r.name: r for r in result.reports}
    assert reports["ok"].status == "done" and reports["breaks"].status == "failed"
    assert result.n_failed == 1
    assert "breaks.svs" in reports["breaks"].error and "_read_task" in reports["breaks"].traceback
    assert not open_store(tmp_path / "out" / "breaks.zarr", partial=True).complete
    assert open_store(tmp_path / "out" / "ok.zarr").complete


def test_a_killed_worker_does_not_change_the_result(first_run, slides_folder, tiny_random_model, client, tmp_path):
    _, reference = first_run
    jobs = find_slides(str(slides_folder / "[ab].svs"), tmp_path)
    killed: list[str] = []

    def kill_once(event: str, data: dict) -> None:
        if event == "slide_tiles" and not killed:
            victim = sorted(client.scheduler_info()["workers"])[0]
            killed.append(victim)
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)  # the nanny starts a fresh worker; the scheduler reassigns its work

    result = run_batch(jobs, _options(tiny_random_model), progress=kill_once, client=client)
    assert killed and killed[0] not in client.scheduler_info()["workers"]
    assert [r.status for r in result.reports] == ["done", "done"]
    for name in ("a", "b"):
        for got, want in zip(_labels(tmp_path / f"{name}.zarr"), _labels(reference / f"{name}.zarr")):
            assert np.array_equal(got, want)


def test_an_interrupted_batch_resumes_per_tile(first_run, slides_folder, tiny_random_model, client, tmp_path):
    _, reference = first_run
    jobs = [SlideJob(slides_folder / "a.svs", tmp_path / "a.zarr")]

    def interrupt(event: str, data: dict) -> None:
        if event == "slide_tiles":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, _options(tiny_random_model), progress=interrupt, client=client)
    store = open_store(tmp_path / "a.zarr", partial=True)
    assert not store.complete
    recorded = len(list((store.work_dir / "tiles").glob("*.npz")))
    assert 0 < recorded < store.attrs["tiling"]["n_tissue_tiles"]

    result = run_batch(jobs, _options(tiny_random_model), client=client)
    report = result.reports[0]
    assert report.status == "done" and report.resumed_tiles >= 2
    for got, want in zip(_labels(tmp_path / "a.zarr"), _labels(reference / "a.zarr")):
        assert np.array_equal(got, want)


def test_manifest_sets_names_and_mpp(slides_folder, tmp_path):
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,mpp,name\n{slides_folder / 'a.svs'},0.25,case_1\nb.svs,,\n")
    (tmp_path / "b.svs").write_bytes(b"")  # relative paths are relative to the manifest's folder
    jobs = find_slides(manifest, tmp_path / "out")
    assert jobs == [SlideJob(slides_folder / "a.svs", tmp_path / "out" / "case_1.zarr", 0.25),
                    SlideJob(tmp_path / "b.svs", tmp_path / "out" / "b.zarr", None)]
    manifest.write_text("path,mpp\na.svs,fast\n")
    with pytest.raises(ConfigError, match="line 2"):
        find_slides(manifest, tmp_path)
    manifest.write_text("path,name\na.svs,x\nb.svs,x\n")
    with pytest.raises(ConfigError, match="same store x.zarr"):
        find_slides(manifest, tmp_path)
    with pytest.raises(ConfigError, match="no slides found"):
        find_slides(str(tmp_path / "*.ndpi"), tmp_path)
