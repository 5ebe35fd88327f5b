"""Panoptic fusion: things over stuff and small-region cleanup."""

from __future__ import annotations

import numpy as np
import pytest

from histopan.panoptic import absorb_small_regions, fuse, stuff_argmax


def test_stuff_argmax_ignores_the_thing_class():
    probs = np.zeros((4, 2, 2), np.float32)
    probs[3] = 0.9  # the nucleus class dominates everywhere
    probs[1, 0, 0] = 0.1
    probs[2, 1, 1] = 0.05
    out = stuff_argmax(probs, np.array([0, 1, 2]))
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 0], [0, 2]]


def test_small_island_absorbed_large_kept():
    stuff = np.ones((60, 60), np.uint8)  # stroma
    stuff[20:24, 20:24] = 2  # 16 px necrosis island
    stuff[35:55, 30:50] = 3  # 400 px tumour region
    out = absorb_small_regions(stuff, min_area_um2=10.0, mpp=0.5)  # 40 px minimum
    assert (out[20:24, 20:24] == 1).all()
    assert (out[35:55, 30:50] == 3).all()
    assert (out == 2).sum() == 0


def test_region_on_the_border_is_kept():
    stuff = np.ones((40, 40), np.uint8)
    stuff[0:3, 10:13] = 2  # small but touches the top edge: may continue outside
    out = absorb_small_regions(stuff, min_area_um2=10.0, mpp=0.5)
    assert (out[0:3, 10:13] == 2).all()


def test_area_threshold_is_physical():
    stuff = np.ones((80, 80), np.uint8)
    stuff[30:40, 30:40] = 2  # 100 px
    # 100 px at 0.5 mpp = 25 um^2: kept with a 20 um^2 minimum, absorbed with 30 um^2.
    assert (absorb_small_regions(stuff, 20.0, 0.5) == 2).sum() == 100
    assert (absorb_small_regions(stuff, 30.0, 0.5) == 2).sum() == 0
    # the same pixels at 0.25 mpp are only 6.25 um^2
    assert (absorb_small_regions(stuff, 10.0, 0.25) == 2).sum() == 0


def test_fuse_things_over_stuff():
    stuff = np.full((5, 5), 1, np.uint8)
    inst = np.zeros((5, 5), np.uint32)
    inst[1:3, 1:3] = 7
    sem = fuse(stuff, inst, thing_id=4)
    assert (sem[inst > 0] == 4).all()
    assert (sem[inst == 0] == 1).all()
    with pytest.raises(ValueError):
        fuse(stuff, inst[:4], 4)
