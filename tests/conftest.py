"""Shared test fixtures: where the real data in ../shared lives."""

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
