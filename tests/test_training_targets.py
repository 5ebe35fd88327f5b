"""Targets from hand-made label maps: centre peaks at centroids, boundaries on edges, ignore masks."""

import numpy as np

import pytest

from histopan.training.targets import (boundary_map, centre_heatmap, class_bits, contact_map, nucleus_targets,
                                       tile_class_targets)


def _two_discs() -> np.ndarray:
    yy, xx = np.mgrid[:40, :60]
    lab = np.zeros((40, 60), dtype=np.int32)
    lab[(yy - 12) ** 2 + (xx - 15) ** 2 <= 36] = 1
    lab[(yy - 25) ** 2 + (xx - 40) ** 2 <= 49] = 2
    return lab


def test_centre_heatmap_peaks_at_centroids():
    lab = _two_discs()
    heat = centre_heatmap(lab, sigma_px=2.0)
    assert heat.dtype == np.float32 and heat.shape == lab.shape
    assert heat[12, 15] == 1.0 and heat[25, 40] == 1.0
    assert heat.max() == 1.0
    # Gaussian fall-off: one sigma away is exp(-1/2)
    np.testing.assert_allclose(heat[12, 17], np.exp(-0.5), rtol=1e-5)
    # far from both nuclei: zero
    assert heat[0, 59] == 0.0


def test_centre_heatmap_empty_labels():
    assert not centre_heatmap(np.zeros((8, 8), dtype=np.int32), 2.0).any()


def test_boundary_on_instance_edges_including_touching():
    lab = np.zeros((10, 12), dtype=np.int32)
    lab[2:8, 1:6] = 1
    lab[2:8, 6:11] = 2  # touches nucleus 1
    b = boundary_map(lab)
    assert b[2, 3] == 1 and b[7, 3] == 1 and b[4, 1] == 1   # outer edge of 1
    assert b[4, 5] == 1 and b[4, 6] == 1                    # where 1 and 2 touch
    assert b[4, 3] == 0 and b[0, 0] == 0                    # interior and background
    assert set(np.unique(b)) == {0.0, 1.0}


def test_contact_where_nuclei_touch_or_nearly_touch_only():
    lab = np.zeros((12, 24), dtype=np.int32)
    lab[2:9, 1:6] = 1
    lab[2:9, 6:11] = 2     # touches 1 along columns 5 | 6
    lab[2:9, 12:17] = 3    # a one-pixel gap (column 11) from 2
    lab[2:9, 20:23] = 4    # three pixels from 3: no contact at radius 1
    c = contact_map(lab, radius_px=1)
    assert c[5, 5] and c[5, 6]                  # both sides of the touching line
    assert c[5, 11] and not c[5, 10] and not c[5, 12]   # the gap (its edges need radius 2)
    assert not c[5, 3] and not c[5, 8]          # interiors
    assert not c[5, 16] and not c[5, 18] and not c[5, 20]   # 3 and 4 are too far apart
    assert not c[0, 0] and not c[:, 17:].any()
    assert not c[0].any() and not c[10:].any()  # edges facing background only
    wider = contact_map(lab, radius_px=2)
    assert wider[5, 10] and wider[5, 12] and wider[5, 4] and not wider[5, 3]
    assert wider[5, 18] and not wider[5, 16]    # a 3-pixel gap: its middle is within 2 px of both
    assert not contact_map(np.zeros((5, 5), np.int32), 1).any()
    lone = np.zeros((9, 9), np.int32)
    lone[2:7, 2:7] = 7
    assert not contact_map(lone, 2).any()
    with pytest.raises(ValueError, match="radius_px"):
        contact_map(lab, 0)


def test_nucleus_targets_label_sets_and_ignore_mask():
    lab = _two_discs()
    valid = np.ones(lab.shape, dtype=bool)
    valid[:, 50:] = False  # unannotated strip
    t = nucleus_targets(lab, valid, mpp=0.5, centre_sigma_um=1.0, nucleus_index=4, stuff_indices=(0, 1, 2, 3))
    assert t.label_bits[12, 15] == 1 << 4                     # nucleus pixel: {nucleus}
    assert t.label_bits[0, 0] == 0b01111                      # other annotated pixel: any stuff class
    assert (t.label_bits[:, 50:] == 0).all()                  # unannotated: no label
    assert (t.centre[:, 50:] == 0).all() and (t.boundary[:, 50:] == 0).all()
    assert t.nucleus.sum() == np.count_nonzero(lab[:, :50])
    assert t.nucleus_valid.sum() == valid.sum()
    assert t.centre[12, 15] == 1.0                            # sigma 1 um = 2 px at 0.5 mpp
    np.testing.assert_allclose(t.centre[12, 17], np.exp(-0.5), rtol=1e-5)
    assert not t.contact.any()                                # the two discs are far apart
    touching = np.zeros((8, 12), np.int32)
    touching[1:7, 1:6], touching[1:7, 6:11] = 1, 2
    t = nucleus_targets(touching, np.ones(touching.shape, bool), mpp=0.5, centre_sigma_um=1.0, nucleus_index=4,
                        stuff_indices=(0, 1, 2, 3), contact_um=0.5)
    np.testing.assert_array_equal(t.contact, contact_map(touching, 1))   # 0.5 um = 1 px at 0.5 mpp


def test_tile_class_targets_allow_class_or_nucleus_and_no_nucleus_maps():
    valid = np.zeros((6, 6), dtype=bool)
    valid[:4, :4] = True
    t = tile_class_targets(valid, class_index=2, nucleus_index=4)
    assert (t.label_bits[:4, :4] == class_bits([2, 4])).all()
    assert (t.label_bits[4:, :] == 0).all()
    assert not t.nucleus_valid.any() and not t.centre.any() and not t.boundary.any()


def test_glass_and_background_tiles_train_no_nuclei():
    from histopan.training.data import glass_mask

    image = np.full((8, 8, 3), 0.6, np.float32)
    image[:, :4] = 0.95  # bare glass on the left half
    glass = glass_mask(image)
    assert glass[:, :4].all() and not glass[:, 4:].any()
    valid = np.ones((8, 8), bool)
    t = tile_class_targets(valid, class_index=1, nucleus_index=4, no_nucleus=glass)
    assert (t.label_bits[:, :4] == class_bits([1])).all()  # glass: the tile class only
    assert (t.label_bits[:, 4:] == class_bits([1, 4])).all()  # tissue: the tile class or a nucleus
    assert t.nucleus_valid[:, :4].all() and not t.nucleus_valid[:, 4:].any()
    assert (t.nucleus == 0).all() and (t.centre == 0).all()
