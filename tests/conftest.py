"""Shared test fixtures: where the real data in ../shared lives, a tiny random model, a small nucleus set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("HISTOPAN_SHARED")
    return Path(env) if env else REPO.parent / "shared"


SHARED = _shared_dir()
SLIDES = SHARED / "slides"
DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        raise FileNotFoundError(
            f"the real test data folder {SHARED} is missing; check out ../shared beside the repo "
            "or set HISTOPAN_SHARED"
        )
    return SHARED


@pytest.fixture(scope="session")
def slides_dir(shared_dir: Path) -> Path:
    return shared_dir / "slides"


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data"


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (tiny networks run faster and identically so), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_random_model(tmp_path_factory) -> Path:
    """A small untrained U-Net (2 um/px, tiles of 64 + 16) whose sharpened random maps give blobs the watershed
    keeps: enough for pipeline, batch and fault tests that need real nuclei fast."""
    import torch

    from histopan.model.checkpoint import save_model
    from histopan.model.config import ArchitectureConfig, ModelConfig
    from histopan.model.network import build_network
    from histopan.postprocess import PostprocessConfig

    config = ModelConfig(name="tiny-random", architecture=ArchitectureConfig(decoder_channels=(32, 16, 16, 8, 8)),
                         mpp=2.0, tile=64, halo=16,
                         postprocess=PostprocessConfig(nucleus_threshold=0.25, centre_threshold=0.5,
                                                       min_area_um2=16.0, min_distance_um=4.0))
    torch.manual_seed(0)
    network = build_network(config).eval()
    with torch.no_grad():
        network.segmentation_head[0].weight.mul_(25.0)  # sharper random maps: blobs the watershed keeps
    return save_model(tmp_path_factory.mktemp("model") / "tiny", network, config)


def write_disc_nucleus_set(root: Path) -> Path:
    """A nucleus data set: three pale 96 x 96 images with six dark discs each (nuclei) and their instance maps,
    at 0.5 um/px (images s0, s1, s2)."""
    import json

    import numpy as np
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:96, :96]
    for i in range(3):
        img = np.full((96, 96, 3), (230, 200, 220), np.uint8)
        lab = np.zeros((96, 96), np.uint16)
        for k in range(1, 7):
            cy, cx = rng.integers(10, 86, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
            lab[disc] = k
            img[disc] = (80, 40, 140)
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        tifffile.imwrite(root / "labels" / f"s{i}.tif", lab)
    (root / "meta.json").write_text(json.dumps({"mpp": 0.5}))
    return root


@pytest.fixture(scope="session")
def disc_nucleus_set():
    """:func:`write_disc_nucleus_set`, for tests that make the set in a folder of their own."""
    return write_disc_nucleus_set
