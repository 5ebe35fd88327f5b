"""Faults around the outputs and the model of ``histopan segment`` and ``batch``: real slides, real stores, real
processes killed with SIGKILL.

A tiny random-weights model (2 um/px, 64 px tiles; as in test_batch.py) on generated 1280 x 1280 slides at
0.5 um/px (25 tiles, two pyramid levels) keeps each run to a second or two.  A killed run is a real
``histopan segment``
subprocess that sends itself SIGKILL at a chosen point of the run (:data:`KILLER` wraps one of histopan's own
functions; nothing of zarr, torch or the slide readers is replaced).  For every fault the test asserts: exit 2
(for a user's error) and one line on stderr naming the file, the value and the fix, no traceback, nothing left
under the output's name that looks complete unless it is, and that rerunning works, giving a store
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from histopan.cli import main
from histopan.errors import StoreError
from histopan.outputs import lock_path, output_lock, read_histopan_attrs, replaced_path, staging_path
from histopan.store import open_store
from histopan.testing import write_test_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slides")
    out = {}
    for seed, name in enumerate(("a", "b")):
        out[name] = folder / f"{name}.svs"
        write_test_slide(out[name], 1280, 1280, mpp=0.5, seed=seed, truth=False)
    return out


def _args(slide: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["-q", "segment", str(slide), "-o", str(out), "--model", str(model), "--batch-size", "2",
            "--min-tissue", "0", "--workers", "1", *extra]


def _snapshot(store: Path) -> dict[str, object]:
    """Every file of a store by relative path: bytes, except the root attributes that record the run's own
    timings and flags (the summary, and whether --overwrite was passed)."""
    files: dict[str, object] = {}
    for path in sorted(store.rglob("*")):
        if path.is_file():
            rel = path.relative_to(store).as_posix()
            if rel == "zarr.json":
                meta = json.loads(path.read_text())
                attrs = meta["attributes"]["histopan"]
                attrs.pop("summary")
                attrs["run"]["options"].pop("overwrite")
                files[rel] = meta
            else:
                files[rel] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(slides, tiny_random_model, tmp_path_factory) -> dict[str, dict[str, object]]:
    """Uninterrupted runs of both slides: their store snapshots."""
    folder = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)  # module fixtures run before the function fixture one_torch_thread
    snaps = {}
    for name, slide in slides.items():
        assert main(_args(slide, folder / f"{name}.zarr", tiny_random_model)) == 0
        snaps[name] = _snapshot(folder / f"{name}.zarr")
    assert any(k.startswith("labels/nuclei/0/c/") for k in snaps["a"])  # nuclei were found: a real comparison
    return snaps


def _one_line_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("histopan ") and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _siblings(out: Path) -> set[str]:
    """What a run on ``out`` has beside it (the store, and any of its partial, lock or temporary names)."""
    return {p.name for p in out.parent.iterdir() if p.name.startswith(out.name)}


def _assert_nothing_incomplete_visible(out: Path) -> None:
    """The output's name holds a complete store or nothing; the nucleus table only in a complete store."""
    attrs = read_histopan_attrs(out)
    if out.exists():
        assert attrs is not None and attrs["complete"], f"{out} exists but is not a complete store"
    else:
        assert not (out / "tables" / "nuclei.parquet").exists()
        with pytest.raises(StoreError):
            open_store(out)


# ------------------------------------------------------------------------------------- killed subprocesses

#: ``python KILLER PHASE N MODE ARGS...``: run ``histopan ARGS`` and, at the N-th call of PHASE's function,
#: SIGKILL this process (MODE kill) or announce it on stdout and wait to be killed (MODE pause).  ``after``
#: phases stop once the call returned, ``before`` ones before it starts.
KILLER = r"""
import os, signal, sys, time
import histopan.outputs, histopan.pipeline, histopan.store
from histopan.cli import main

PHASES = {
    "create": (histopan.store, "_multiscales", "after"),  # the root zarr.json written, the labels not yet
    "tiles": (histopan.store.SlideStore, "save_tile", "after"),
    "chunks": (histopan.store.SlideStore, "mark_chunk_done", "after"),
    "table": (histopan.store.NucleusTableWriter, "write", "after"),  # the table half written
    "overview": (histopan.store.SlideStore, "write_overview", "before"),  # the table in place, no overview
    "pyramids": (histopan.store, "_downsample_array", "after"),
    "publish": (histopan.pipeline, "publish", "before"),  # complete, not yet swapped in
    "swap": (histopan.outputs, "_set_aside", "after"),  # the old store set aside, the new one not yet in place
}
phase, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
owner, name, when = PHASES[phase]
original = getattr(owner, name)
calls = [0]

def stop():
    if mode == "pause":
        print("paused", flush=True)
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)

def wrapper(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == n:
        stop()
    result = original(*args, **kwargs)
    if when == "after" and calls[0] == n:
        stop()
    return result

setattr(owner, name, wrapper)
sys.exit(main(sys.argv[4:]))
"""


def _env() -> dict[str, str]:
    # the killed run's tiles must come from the same torch thread count as the in-process rerun's
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _kill_at(tmp_path: Path, phase: str, n: int, args: list[str]) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), phase, str(n), "kill", *args], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {phase}: {proc.stderr}"


@pytest.fixture
def paused_run(tmp_path):
    """Start ``histopan ARGS`` in a subprocess that stops at PHASE's N-th call and waits; yields the process
    once it is there, and kills it at the end."""
    procs: list[subprocess.Popen] = []

    def start(phase: str, n: int, args: list[str]) -> subprocess.Popen:
        script = tmp_path / "pauser.py"
        script.write_text(KILLER)
        proc = subprocess.Popen([sys.executable, str(script), phase, str(n), "pause", *args], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()  # blocks until the run reaches the phase (or ends)
        assert line.strip() == "paused", f"the run did not pause: {line!r} {proc.stderr.read()}"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


KILL_POINTS = [("create", 2), ("tiles", 3), ("chunks", 3), ("table", 1), ("overview", 1), ("pyramids", 1),
               ("publish", 1)]


@pytest.mark.parametrize("phase, n", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_kill_at_every_phase_then_rerun_is_byte_identical(phase, n, slides, tiny_random_model, reference, tmp_path):
    out = tmp_path / "out" / "a.zarr"
    out.parent.mkdir()
    args = _args(slides["a"], out, tiny_random_model)
    _kill_at(tmp_path, phase, n, args)
    _assert_nothing_incomplete_visible(out)
    assert not out.exists()  # killed before the swap: nothing under the final name
    if phase not in ("create", "publish"):  # the partial store is readable on request (export/qc --partial)
        with pytest.raises(StoreError, match="incomplete.*a.zarr.partial.*--partial"):
            open_store(out)
        store = open_store(out, partial=True)
        assert store.path == staging_path(out) and not store.complete
    assert main(args) == 0  # the same command resumes (or, killed during creation, starts afresh)
    assert _snapshot(out) == reference["a"]
    assert _siblings(out) == {"a.zarr"}  # no partial store, lock or temporary folder left


OVERWRITE_KILL_POINTS = [("create", 2), ("publish", 1), ("swap", 1)]


@pytest.mark.parametrize("phase, n", OVERWRITE_KILL_POINTS, ids=[p for p, _ in OVERWRITE_KILL_POINTS])
def test_killed_overwrite_keeps_the_old_store(phase, n, slides, tiny_random_model, reference, tmp_path):
    """--overwrite of b's complete store with a run of slide a, killed at each phase: until the swap the old
    store stays complete and byte for byte as it was; rerunning the command finishes the replacement."""
    out = tmp_path / "out" / "x.zarr"
    out.parent.mkdir()
    assert main(_args(slides["b"], out, tiny_random_model)) == 0
    old = _snapshot(out)
    args = _args(slides["a"], out, tiny_random_model, "--overwrite")
    _kill_at(tmp_path, phase, n, args)
    if phase == "swap":  # killed between the two renames: the old store waits beside, the new one is complete
        assert not out.exists() and _snapshot(replaced_path(out)) == old
    else:
        assert _snapshot(out) == old
    _assert_nothing_incomplete_visible(out)
    assert main(args) == 0
    assert _snapshot(out) == reference["a"]
    assert _siblings(out) == {"x.zarr"}


# ------------------------------------------------------------------------------------------ user errors


def test_failed_device_check_keeps_the_old_store_and_creates_nothing(slides, tiny_random_model, reference, tmp_path,
                                                                      capsys):
    out = tmp_path / "good.zarr"
    assert main(_args(slides["a"], out, tiny_random_model)) == 0
    before = _snapshot(out)
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert main(_args(slides["a"], out, tiny_random_model, "--device", device, "--overwrite")) == 2
    _one_line_error(capsys.readouterr().err, device, "Fix:")
    assert _snapshot(out) == before == reference["a"]
    assert _siblings(out) == {"good.zarr"}  # no partial store was started, the lock is gone
    fresh = tmp_path / "fresh.zarr"
    assert main(_args(slides["a"], fresh, tiny_random_model, "--device", device)) == 2
    _one_line_error(capsys.readouterr().err, device)
    assert _siblings(fresh) == set()


def test_batch_device_check_fails_before_any_store(slides, tiny_random_model, tmp_path, capsys):
    out = tmp_path / "out"
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    code = main(["-q", "batch", str(slides["a"]), "-o", str(out), "--model", str(tiny_random_model), "--device", device,
                 "--dashboard-address", ":0"])
    assert code == 2
    _one_line_error(capsys.readouterr().err, device)
    assert not out.exists() or not any(out.iterdir())


def test_a_second_run_on_the_same_output_is_refused(slides, tiny_random_model, reference, tmp_path, capsys, paused_run):
    out = tmp_path / "a.zarr"
    args = _args(slides["a"], out, tiny_random_model)
    first = paused_run("tiles", 2, args)  # holds the lock, its store half done
    assert main(args) == 2
    _one_line_error(capsys.readouterr().err, str(out), "another histopan run", "a.zarr.lock")
    code = main(["-q", "batch", str(slides["a"]), "-o", str(tmp_path), "--model", str(tiny_random_model),
                 "--dashboard-address", ":0"])
    assert code == 2  # batch takes every output's lock before it starts a cluster
    _one_line_error(capsys.readouterr().err, str(out), "another histopan run")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert main(args) == 0  # the lock died with its holder; the half-done store is resumed
    assert _snapshot(out) == reference["a"]
    assert _siblings(out) == {"a.zarr"}


def test_lock_is_exclusive_and_reentrant_within_a_process(tmp_path):
    out = tmp_path / "x.zarr"
    with output_lock(out) as path, output_lock(out):
        assert path == lock_path(out).absolute() and path.is_file()
        held = subprocess.run([sys.executable, "-c", "import sys; from histopan.outputs import output_lock\n"
                               f"with output_lock({str(out)!r}): pass"], env=_env(), capture_output=True, text=True)
        assert held.returncode == 1 and "another histopan run is writing this output" in held.stderr
    assert not lock_path(out).exists()  # removed on release
    with output_lock(out):  # and taken again
        pass


def test_complete_store_without_overwrite_is_refused_before_torch(slides, tiny_random_model, reference, tmp_path):
    out = tmp_path / "a.zarr"
    assert main(_args(slides["a"], out, tiny_random_model)) == 0
    code, err, imported = _cli_without_torch(_args(slides["a"], out, tiny_random_model))
    assert code == 2 and not imported
    _one_line_error(err, str(out), "already exists and is complete", "--overwrite")
    assert _snapshot(out) == reference["a"] and _siblings(out) == {"a.zarr"}


def _cli_without_torch(args: list[str]) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter: exit code, stderr, and whether torch got imported."""
    code = ("import sys\nfrom histopan.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
            "except SystemExit as stop:  # argparse's own errors exit here\n    code = stop.code\n"
            "print(sorted({'torch'} & set(sys.modules)), file=sys.stdout)\nsys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(), capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr, proc.stdout.strip() != "[]"


def test_user_errors_are_reported_before_torch_loads(slides, tiny_random_model, tmp_path):
    """Missing slide, bad --mpp, missing model folder, a folder that is not a store in the way, a missing output
    parent: one line, exit 2, and torch not imported."""
    out = tmp_path / "o.zarr"
    cases = [
        (_args(tmp_path / "missing.svs", out, tiny_random_model), ["missing.svs", "not found"]),
        (_args(slides["a"], out, tiny_random_model, "--mpp", "inf"), ["--mpp", "inf", "Fix:"]),
        (_args(slides["a"], out, tmp_path / "no-model"), ["no-model", "model folder not found"]),
        (_args(slides["a"], tmp_path / "nowhere" / "o.zarr", tiny_random_model), ["nowhere", "mkdir -p"]),
    ]
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's data")
    cases.append((_args(slides["a"], other, tiny_random_model, "--overwrite"), [str(other), "not a histopan store"]))
    for args, needles in cases:
        t = time.perf_counter()
        code, err, imported = _cli_without_torch(args)
        assert code == 2 and not imported, (args, err)
        _one_line_error(err, *needles)
        assert time.perf_counter() - t < 20  # the interpreter's start included; torch alone takes longer here
    assert not out.exists() and _siblings(out) == set()
    assert (other / "notes.txt").read_text() == "someone else's data"
    code, err, imported = _cli_without_torch(["-q", "batch", str(slides["a"]), "-o", str(tmp_path / "y"),
                                              "--model", str(tmp_path / "no-model")])
    assert code == 2 and not imported
    _one_line_error(err, "no-model")
    code, err, imported = _cli_without_torch(["-q", "batch", str(tmp_path / "no-slides"), "-o", str(tmp_path / "y"),
                                              "--model", str(tiny_random_model)])
    assert code == 2 and not imported
    _one_line_error(err, "no-slides", "Fix:")


def _swap_two_classes(model: Path, folder: Path) -> Path:
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes((model / "weights.safetensors").read_bytes())
    config = yaml.safe_load((model / "model.yaml").read_text())
    classes = config["classes"]
    names = [c["name"] for c in classes]
    i, j = names.index("stroma"), names.index("necrosis")
    classes[i], classes[j] = classes[j], classes[i]
    (folder / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def test_swapped_class_names_are_refused(slides, tiny_random_model, tmp_path, capsys):
    swapped = _swap_two_classes(tiny_random_model, tmp_path / "swapped")
    out = tmp_path / "a.zarr"
    code, err, imported = _cli_without_torch(_args(slides["a"], out, swapped))
    assert code == 2 and not imported  # refused from the safetensors header, before torch
    line = _one_line_error(err, str(swapped / "model.yaml"), "another order", "Fix:")
    assert "'necrosis', 'stroma'" in line and "stroma, necrosis" in line  # the value, and the order to write
    assert _siblings(out) == set()
    from histopan.errors import ModelError
    from histopan.model.checkpoint import load_model

    with pytest.raises(ModelError, match="another order"):  # the library refuses it too
        load_model(swapped)
    code = main(["-q", "batch", str(slides["a"]), "-o", str(tmp_path / "b"), "--model", str(swapped)])
    assert code == 2
    _one_line_error(capsys.readouterr().err, "model.yaml", "another order")


def test_renamed_class_and_format_version_are_refused(tiny_random_model, tmp_path):
    from histopan.errors import ModelError
    from histopan.model.folder import check_model_folder

    renamed = _swap_two_classes(tiny_random_model, tmp_path / "renamed")
    config = yaml.safe_load((renamed / "model.yaml").read_text())
    config["classes"][1]["name"] = "fat"
    (renamed / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ModelError, match="names the classes differently") as info:
        check_model_folder(renamed)
    assert "'fat'" in str(info.value) and str(renamed / "model.yaml") in str(info.value)
    meta_version = json.loads(_header(tiny_random_model / "weights.safetensors"))["__metadata__"]["format_version"]
    config = yaml.safe_load((tiny_random_model / "model.yaml").read_text())
    config["format_version"] = int(meta_version) + 1
    (renamed / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ModelError, match=f"format_version {meta_version}"):
        check_model_folder(renamed)


def _header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8:8 + int.from_bytes(data[:8], "little")]


def test_pickled_weights_are_refused_without_unpickling(slides, tiny_random_model, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "model.yaml").write_text((tiny_random_model / "model.yaml").read_text())
    marker = tmp_path / "unpickled"
    # a pickle that would create the marker file if anything ever unpickled it
    payload = (b"\x80\x04cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.")
    (folder / "weights.safetensors").write_bytes(payload)
    code, err, imported = _cli_without_torch(_args(slides["a"], tmp_path / "a.zarr", folder))
    assert code == 2 and not imported
    _one_line_error(err, "weights.safetensors", "pickle", "save_model")
    assert not marker.exists() and _siblings(tmp_path / "a.zarr") == set()


def test_full_disk_during_an_overwrite_keeps_the_old_store(slides, tiny_random_model, reference, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes fail as on a full disk) stops an --overwrite run while it creates
    its store: one line, exit 2, the old store untouched, and no leftovers; without the limit the rerun works."""
    out = tmp_path / "good.zarr"
    assert main(_args(slides["b"], out, tiny_random_model)) == 0
    old = _snapshot(out)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    args = _args(slides["a"], out, tiny_random_model, "--overwrite")
    proc = subprocess.run([sys.executable, "-m", "histopan.cli", *args], env=_env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc.stderr, "cannot write the store", "File too large", "rerun")
    assert _snapshot(out) == old
    assert _siblings(out) <= {"good.zarr", "good.zarr.partial"}
    assert main(args) == 0
    assert _snapshot(out) == reference["a"] and _siblings(out) == {"good.zarr"}


def test_a_folder_in_the_way_of_the_partial_store_is_refused(slides, tiny_random_model, tmp_path, capsys):
    out = tmp_path / "a.zarr"
    staging_path(out).mkdir()
    (staging_path(out) / "mine.txt").write_text("keep me")
    assert main(_args(slides["a"], out, tiny_random_model)) == 2
    _one_line_error(capsys.readouterr().err, str(staging_path(out)), "not a histopan store", "Fix:")
    assert (staging_path(out) / "mine.txt").read_text() == "keep me" and not out.exists()
