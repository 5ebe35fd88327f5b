"""Sparse annotations -> pixel targets: what each kind of QuPath object supervises, and the masked losses on them."""

import json

import numpy as np
import pytest
import shapely
import torch
from scipy import ndimage as ndi

from histopan.errors import AnnotationError
from histopan.export.qupath import Annotation, read_geojson
from histopan.model.config import ModelConfig, NucleusTypeSpec
from histopan.model.network import split_outputs
from histopan.training.config import LossConfig
from histopan.training.losses import total_loss
from histopan.training.sparse import (annotation_counts, check_extent, rasterize_annotations, resolve_classes,
                                      tile_targets)
from histopan.training.targets import class_bits

CLASS_NAMES = ("background", "stroma", "necrosis", "tumour", "nucleus")
STUFF_NAMES = CLASS_NAMES[:4]
STUFF = (0, 1, 2, 3)
NUCLEUS = 4
TYPES = ("epithelial", "fibroblast")
MPP = 0.5
SHAPE = (64, 64)

NUC_BIT = class_bits([NUCLEUS])
STUFF_BITS = class_bits(list(STUFF))
STROMA_BIT = class_bits([1])
BG_BIT = class_bits([0])

#: a square nucleus outline whose pixel centres are rows / columns 27..37 (centroid pixel (32, 32))
NUCLEUS_BOX = shapely.box(27.2, 27.2, 37.8, 37.8)


def _mapping(annotations, classes=None):
    seen = sorted({a.class_name for a in annotations if a.class_name is not None})
    return resolve_classes(classes or {}, CLASS_NAMES, STUFF_NAMES, "nucleus", TYPES, seen, "test.geojson")


def _raster(annotations, shape=SHAPE, scale=1.0, offset=(0.0, 0.0), classes=None, complete_points=False):
    return rasterize_annotations(annotations, shape, scale, MPP, _mapping(annotations, classes), NUCLEUS, STUFF,
                                 offset=offset, source="test.geojson", complete_points=complete_points)


def _disc_count(r):
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return int((yy * yy + xx * xx <= r * r).sum())


# -- nucleus outlines ------------------------------------------------------------------------------------
def test_nucleus_polygon_supervises_itself_and_a_ring_and_nothing_else():
    t = _raster([Annotation(NUCLEUS_BOX, class_name="nucleus")])
    inside = np.zeros(SHAPE, bool)
    inside[27:38, 27:38] = True
    np.testing.assert_array_equal(t.label_bits == NUC_BIT, inside)
    # the ring: within 1 um (2 px) of the outline, "any stuff class, not a nucleus"
    ring = ndi.binary_dilation(inside, structure=ndi.generate_binary_structure(2, 1), iterations=1) & ~inside
    assert np.all(t.label_bits[ring] == STUFF_BITS) and np.all(t.nucleus[ring] == 0)
    assert t.label_bits[32, 39] == STUFF_BITS and t.label_bits[25, 32] == STUFF_BITS  # 2 px out
    assert t.label_bits[32, 40] == 0 and t.label_bits[32, 41] == 0                    # 3 px out: untrained
    known = t.label_bits != 0
    for mask in (t.nucleus_valid, t.centre_valid, t.boundary_valid):
        np.testing.assert_array_equal(mask, known)
    np.testing.assert_array_equal(t.nucleus, inside.astype(np.float32))
    # far away nothing is trained
    assert t.label_bits[5, 5] == 0 and not (t.nucleus_valid[5, 5] or t.centre_valid[5, 5] or t.boundary_valid[5, 5])
    assert known.sum() < 0.1 * known.size
    # centre peaks at the centroid; boundary is 1 exactly on the outline's inner edge
    assert np.unravel_index(np.argmax(t.centre), SHAPE) == (32, 32)
    assert t.centre[32, 32] == pytest.approx(1.0)
    edge = inside & ~ndi.binary_erosion(inside)
    np.testing.assert_array_equal(t.boundary == 1, edge)
    assert t.boundary[27, 32] == 1 and t.boundary[32, 32] == 0 and np.all(t.boundary[ring] == 0)
    assert np.all(t.types == -1)  # untyped outline: no type supervision


def test_typed_nucleus_polygon_trains_the_type_on_its_pixels():
    t = _raster([Annotation(NUCLEUS_BOX, class_name="fibroblast")])
    inside = t.label_bits == NUC_BIT
    assert inside.sum() == 11 * 11
    assert np.all(t.types[inside] == 1) and np.all(t.types[~inside] == -1)


def test_detection_without_class_is_a_nucleus_but_an_unclassified_annotation_polygon_is_an_error():
    t = _raster([Annotation(NUCLEUS_BOX, object_type="detection")])
    assert (t.label_bits == NUC_BIT).sum() == 11 * 11
    with pytest.raises(AnnotationError, match="unclassified polygon"):
        _raster([Annotation(NUCLEUS_BOX)])


def test_cell_object_trains_its_nucleus_geometry_not_the_cell_outline():
    cell = Annotation(shapely.box(20, 20, 45, 45), object_type="cell", class_name="epithelial",
                      nucleus_geometry=NUCLEUS_BOX)
    t = _raster([cell])
    inside = np.zeros(SHAPE, bool)
    inside[27:38, 27:38] = True
    np.testing.assert_array_equal(t.label_bits == NUC_BIT, inside)
    assert t.label_bits[21, 21] == 0  # inside the cell, outside nucleus + ring: untrained
    assert np.all(t.types[inside] == 0)


# -- points ----------------------------------------------------------------------------------------------
def test_typed_point_gives_a_core_a_centre_patch_and_a_type_disc_but_no_boundary():
    t = _raster([Annotation(shapely.Point(20.5, 20.5), class_name="epithelial")])  # centre of pixel (20, 20)
    core = t.label_bits == NUC_BIT
    assert core.sum() == _disc_count(2)  # point_core_um 1 um = 2 px
    assert core[20, 20] and core[20, 22] and not core[20, 23]
    np.testing.assert_array_equal(t.label_bits != 0, core)  # nothing else gets a class
    np.testing.assert_array_equal(t.nucleus_valid, core)
    assert np.all(t.nucleus[core] == 1)
    # centre known within 3 sigma (3 * 1.5 um = 9 px) of the point, peak 1 there
    assert t.centre_valid[20, 29] and not t.centre_valid[20, 30] and not t.centre_valid[50, 50]
    assert t.centre[20, 20] == pytest.approx(1.0) and np.unravel_index(np.argmax(t.centre), SHAPE) == (20, 20)
    assert not t.boundary_valid.any()
    # the type head trains within type_radius_um (2 um = 4 px) of the point, nowhere else
    typed = t.types >= 0
    assert typed.sum() == _disc_count(4) and np.all(t.types[typed] == 0)
    assert t.types[20, 24] == 0 and t.types[20, 25] == -1 and t.types[50, 50] == -1


def test_untyped_point_and_multipoint_mark_nuclei_without_types():
    t = _raster([Annotation(shapely.MultiPoint([(10.5, 10.5), (50.5, 40.5)]))])
    assert t.label_bits[10, 10] == NUC_BIT and t.label_bits[40, 50] == NUC_BIT
    assert np.all(t.types == -1)


def test_complete_points_train_the_centre_map_everywhere_zero_away_from_them():
    points = [Annotation(shapely.Point(20.5, 20.5), class_name="epithelial"), Annotation(shapely.Point(50.5, 40.5))]
    sparse, complete = _raster(points), _raster(points, complete_points=True)
    # the same heat around the points; everywhere else known to be 0 instead of unknown
    assert complete.centre_valid.all() and not sparse.centre_valid.all()
    np.testing.assert_array_equal(complete.centre[sparse.centre_valid], sparse.centre[sparse.centre_valid])
    # outside 3 sigma only the Gaussian's tail (< exp(-4.5)), and 0 beyond it
    assert complete.centre[~sparse.centre_valid].max() < np.exp(-4.5)
    assert complete.centre[5, 60] == 0 and complete.centre[60, 5] == 0
    assert complete.centre[20, 20] == pytest.approx(1.0) and complete.centre[40, 50] == pytest.approx(1.0)
    # within point_extent_um (7 um = 14 px) of a point: what sparse points give (the nucleus core, the type
    # disc, no boundary); farther from every point: "not a nucleus" (any stuff class), with no boundary
    rows, cols = np.indices(SHAPE)
    far = ((rows - 20) ** 2 + (cols - 20) ** 2 > 14 ** 2) & ((rows - 40) ** 2 + (cols - 50) ** 2 > 14 ** 2)
    near = ~far
    np.testing.assert_array_equal(complete.label_bits[near], sparse.label_bits[near])
    np.testing.assert_array_equal(complete.nucleus_valid[near], sparse.nucleus_valid[near])
    assert not complete.boundary_valid[near].any()
    assert np.all(complete.label_bits[far] == STUFF_BITS)
    assert complete.nucleus_valid[far].all() and np.all(complete.nucleus[far] == 0)
    assert complete.boundary_valid[far].all() and np.all(complete.boundary[far] == 0)
    assert not sparse.nucleus_valid[far].any()  # a sparse point says nothing away from itself
    np.testing.assert_array_equal(complete.types, sparse.types)
    # an image whose complete count is "no nucleus here" (a region only): its centre map is all 0, all known;
    # the region is its class without nuclei, the rest any stuff class
    empty = _raster([Annotation(shapely.box(4, 4, 40, 40), class_name="stroma")], complete_points=True)
    assert empty.centre_valid.all() and np.all(empty.centre == 0)
    assert np.all(empty.label_bits[4:40, 4:40] == STROMA_BIT) and np.all(empty.label_bits[50:, 50:] == STUFF_BITS)
    assert empty.nucleus_valid.all() and np.all(empty.nucleus == 0)


def test_complete_points_leave_nucleus_outlines_alone():
    """A nucleus outline far from every point keeps its own supervision (nucleus inside, ring around)."""
    annotations = [Annotation(shapely.Point(5.5, 5.5)), Annotation(NUCLEUS_BOX, class_name="nucleus")]
    sparse, complete = _raster(annotations), _raster(annotations, complete_points=True)
    np.testing.assert_array_equal(complete.label_bits[27:38, 27:38], sparse.label_bits[27:38, 27:38])
    assert np.all(complete.label_bits[27:38, 27:38] == NUC_BIT) and np.all(complete.nucleus[27:38, 27:38] == 1)
    assert complete.label_bits[60, 60] == STUFF_BITS and complete.nucleus_valid[60, 60]


def test_point_with_a_stuff_class_is_an_error():
    with pytest.raises(AnnotationError, match="point with the stuff class 'stroma'"):
        _raster([Annotation(shapely.Point(20, 20), class_name="stroma")])


# -- regions ----------------------------------------------------------------------------------------------
def test_region_polygon_means_its_class_or_a_nucleus_inside_and_nothing_outside():
    t = _raster([Annotation(shapely.box(4, 4, 40, 40), class_name="stroma")])
    region = np.zeros(SHAPE, bool)
    region[4:40, 4:40] = True
    assert np.all(t.label_bits[region] == STROMA_BIT | NUC_BIT)
    assert np.all(t.label_bits[~region] == 0)
    # whether a pixel is a nucleus is unknown inside a tissue region
    assert not (t.nucleus_valid.any() or t.centre_valid.any() or t.boundary_valid.any())


def test_line_with_a_stuff_class_is_a_buffered_stroke():
    # line_width_um 4 um = 8 px: pixels whose centres are within 4 px of the line
    t = _raster([Annotation(shapely.LineString([(10, 32), (54, 32)]), class_name="stroma")])
    col = t.label_bits[:, 30]
    assert np.all(col[28:36] == STROMA_BIT | NUC_BIT)  # centres 28.5..35.5: within 3.5 px of y = 32
    assert col[27] == 0 and col[36] == 0               # 4.5 px away
    assert t.label_bits[32, 5] == 0 and t.label_bits[32, 59] == 0  # beyond the round caps
    assert t.label_bits[32, 8] != 0 and t.label_bits[32, 56] != 0
    with pytest.raises(AnnotationError, match="line"):
        _raster([Annotation(shapely.LineString([(10, 32), (54, 32)]), class_name="epithelial")])


def test_background_region_means_no_nucleus():
    t = _raster([Annotation(shapely.box(4, 4, 40, 40), class_name="background")])
    region = np.zeros(SHAPE, bool)
    region[4:40, 4:40] = True
    assert np.all(t.label_bits[region] == BG_BIT) and np.all(t.label_bits[~region] == 0)
    np.testing.assert_array_equal(t.nucleus_valid, region)
    np.testing.assert_array_equal(t.centre_valid, region)
    assert np.all(t.nucleus == 0) and np.all(t.centre == 0)


def test_bare_glass_inside_a_region_is_no_nucleus():
    image = np.full(SHAPE + (3,), (200, 120, 170), np.uint8)
    image[:, 32:] = 245  # glass: bright and grey
    region = Annotation(shapely.box(4, 4, 60, 60), class_name="stroma")
    t = rasterize_annotations([region], SHAPE, 1.0, MPP, _mapping([region]), NUCLEUS, STUFF, image=image)
    assert t.label_bits[30, 10] == STROMA_BIT | NUC_BIT and not t.nucleus_valid[30, 10]
    assert t.label_bits[30, 40] == STROMA_BIT and t.nucleus_valid[30, 40] and t.nucleus[30, 40] == 0
    assert t.label_bits[2, 40] == 0 and not t.nucleus_valid[2, 40]  # glass outside the region: untrained


def test_ring_of_a_nucleus_inside_a_region_is_the_regions_class():
    t = _raster([Annotation(shapely.box(4, 4, 60, 60), class_name="stroma"),
                 Annotation(NUCLEUS_BOX, class_name="nucleus")])
    inside = np.zeros(SHAPE, bool)
    inside[27:38, 27:38] = True
    ring = ndi.binary_dilation(inside, structure=np.ones((5, 5), bool)) & ~inside & (t.nucleus_valid)
    assert ring.sum() > 0
    assert np.all(t.label_bits[inside] == NUC_BIT)     # the nucleus wins over the region
    assert np.all(t.label_bits[ring] == STROMA_BIT)    # the ring: stroma, not any stuff class
    assert t.label_bits[10, 10] == STROMA_BIT | NUC_BIT  # the rest of the region
    assert t.label_bits[2, 2] == 0


# -- coordinates -------------------------------------------------------------------------------------------
def test_scale_maps_annotation_pixels_to_the_model_grid():
    # annotations drawn at 0.25 um/px, targets on the 0.5 um/px grid: scale 0.5
    region = Annotation(shapely.box(40.4, 40.4, 60.6, 60.6), class_name="stroma")  # -> 20.2..30.3 px
    point = Annotation(shapely.Point(81, 41), class_name="epithelial")            # -> (40.5, 20.5)
    line = Annotation(shapely.LineString([(20, 100), (100, 100)]), class_name="stroma")  # -> y = 50
    t = _raster([region, point, line], scale=0.5)
    expected = np.zeros(SHAPE, bool)
    expected[20:30, 20:30] = True
    np.testing.assert_array_equal(t.label_bits[:40, :36] == STROMA_BIT | NUC_BIT, expected[:40, :36])
    assert np.unravel_index(np.argmax(t.centre), SHAPE) == (20, 40) and t.label_bits[20, 40] == NUC_BIT
    # the stroke keeps its width in microns (8 model px), not in annotation pixels
    col = t.label_bits[:, 30]
    assert np.all(col[46:54] == STROMA_BIT | NUC_BIT) and col[45] == 0 and col[54] == 0


def test_offset_shifts_annotations_into_the_crop():
    region = Annotation(shapely.box(20.2, 20.2, 30.3, 30.3), class_name="stroma")
    point = Annotation(shapely.Point(30.5, 20.5), class_name="epithelial")
    t = _raster([region, point], offset=(10.0, 5.0))
    labelled = np.argwhere(t.label_bits == STROMA_BIT | NUC_BIT)
    assert labelled[:, 0].min() == 15 and labelled[:, 0].max() == 24  # rows: y - 5
    assert labelled[:, 1].min() == 10 and labelled[:, 1].max() == 19  # columns: x - 10
    assert np.unravel_index(np.argmax(t.centre), SHAPE) == (15, 20)


def test_points_outside_the_crop_are_dropped():
    t = _raster([Annotation(shapely.Point(100.5, 10.5), class_name="epithelial")])
    assert t.labelled_pixels == 0


def test_tile_targets_are_class_or_nucleus_and_class_only_where_no_nucleus():
    valid = np.ones((8, 8), bool)
    no_nucleus = np.zeros((8, 8), bool)
    no_nucleus[:, :3] = True
    t = tile_targets((8, 8), valid, 2, NUCLEUS, no_nucleus)
    assert np.all(t.label_bits[:, 3:] == class_bits([2, NUCLEUS])) and np.all(t.label_bits[:, :3] == class_bits([2]))
    for mask in (t.nucleus_valid, t.centre_valid, t.boundary_valid):
        np.testing.assert_array_equal(mask, no_nucleus)
    assert np.all(t.nucleus == 0) and np.all(t.types == -1)


# -- class mapping ---------------------------------------------------------------------------------------
def test_unmapped_unknown_class_is_an_error_naming_it():
    with pytest.raises(AnnotationError, match="Lymphocyte") as err:
        _mapping([Annotation(shapely.Point(1, 1), class_name="Lymphocyte")])
    assert "does not map" in str(err.value) and "test.geojson" in str(err.value)


def test_class_mapped_to_something_the_model_lacks_is_an_error():
    with pytest.raises(AnnotationError, match="'Tumor' maps to 'mucosa'") as err:
        _mapping([Annotation(shapely.box(0, 0, 5, 5), class_name="Tumor")], {"Tumor": "mucosa"})
    assert "add_classes" in str(err.value)


def test_null_ignores_a_class_and_same_name_maps_to_itself():
    anns = [Annotation(shapely.box(4, 4, 20, 20), class_name="Ignore me"),
            Annotation(shapely.Point(40.5, 40.5), class_name="fibroblast"),
            Annotation(shapely.box(30, 2, 60, 12), class_name="tumour"),
            Annotation(shapely.box(2, 30, 12, 60), class_name="Tumor")]
    mapping = _mapping(anns, {"Ignore me": None, "Tumor": "tumour"})
    assert mapping.targets["Ignore me"] is None
    assert mapping.target("fibroblast").kind == "nucleus" and mapping.target("fibroblast").index == 1
    assert mapping.target("tumour").kind == "stuff" and mapping.target("tumour").index == 3
    assert mapping.target("Tumor") == mapping.target("tumour")
    assert mapping.target(None) is None
    t = _raster(anns, classes={"Ignore me": None, "Tumor": "tumour"})
    assert np.all(t.label_bits[5:19, 5:19] == 0)  # the ignored polygon trains nothing
    tumour = class_bits([3, NUCLEUS])
    assert t.label_bits[5, 40] == tumour and t.label_bits[40, 5] == tumour
    assert t.types[40, 40] == 1
    assert annotation_counts(anns, mapping) == {"points": 1, "polygons": 0, "regions": 2}


# -- extent and geometry types -----------------------------------------------------------------------------
def test_annotation_outside_the_image_names_the_file_and_bounds():
    anns = [Annotation(shapely.Point(10, 10)), Annotation(shapely.box(180, 5, 210, 20), class_name="stroma")]
    with pytest.raises(AnnotationError) as err:
        check_extent(anns, 64, 64, "slide_a.geojson", "its image a.png")
    msg = str(err.value)
    assert "slide_a.geojson" in msg and "a.png" in msg and "64 x 64" in msg
    assert "x 180.0..210.0" in msg and "y 5.0..20.0" in msg and "annotation 1" in msg
    check_extent([Annotation(shapely.box(0, 0, 64.5, 64.5), class_name="stroma")], 64, 64, "ok.geojson", "it")


def test_unusable_geometry_type_is_an_error():
    gc = shapely.GeometryCollection([shapely.Point(5, 5), shapely.box(1, 1, 3, 3)])
    with pytest.raises(AnnotationError, match="geometry type"):
        _raster([Annotation(gc, class_name="nucleus")])


def test_geojson_file_round_trip_gives_the_same_targets(tmp_path):
    path = tmp_path / "img.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [20.5, 20.5]},
         "properties": {"objectType": "annotation", "classification": {"name": "epithelial"}}},
        {"type": "Feature", "geometry": shapely.geometry.mapping(NUCLEUS_BOX),
         "properties": {"objectType": "annotation", "classification": {"name": "nucleus"}}},
    ]}))
    from_file = read_geojson(path)
    direct = [Annotation(shapely.Point(20.5, 20.5), class_name="epithelial"),
              Annotation(NUCLEUS_BOX, class_name="nucleus")]
    for a, b in zip(_raster(from_file).layers(), _raster(direct).layers()):
        np.testing.assert_array_equal(a, b)


# -- masked losses ------------------------------------------------------------------------------------------
def _loss_setup():
    model = ModelConfig(nucleus_types=(NucleusTypeSpec("epithelial", (1, 2, 3)),
                                       NucleusTypeSpec("fibroblast", (4, 5, 6))))
    anns = [Annotation(shapely.box(2.2, 2.2, 8.8, 8.8), class_name="fibroblast"),
            Annotation(shapely.Point(24.5, 8.5), class_name="epithelial"),
            Annotation(shapely.box(2, 20, 14, 30), class_name="stroma")]
    t = _raster(anns, shape=(32, 32))
    batch = {"label_bits": t.label_bits, "nucleus": t.nucleus, "nucleus_valid": t.nucleus_valid,
             "centre": t.centre, "centre_valid": t.centre_valid, "boundary": t.boundary,
             "boundary_valid": t.boundary_valid, "types": t.types.astype(np.int64)}
    batch = {k: torch.from_numpy(v[None]) for k, v in batch.items()}
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((1, model.n_outputs, 32, 32), generator=g, dtype=torch.float64)
    return model, batch, logits


def _loss(model, batch, logits):
    return total_loss(split_outputs(logits, model), batch, model.nucleus_index, LossConfig())


def test_total_loss_masks_each_head_by_its_own_mask():
    model, batch, logits = _loss_setup()
    logits.requires_grad_(True)
    loss, terms = _loss(model, batch, logits)
    assert set(terms) == {"ce", "stuff", "dice", "centre", "boundary", "type", "loss"}
    assert terms["type"] > 0 and terms["centre"] > 0 and terms["boundary"] > 0
    loss.backward()
    grad = logits.grad[0]
    c = model.n_classes
    untrained = (batch["label_bits"][0] == 0) & ~batch["nucleus_valid"][0] & ~batch["centre_valid"][0] \
        & ~batch["boundary_valid"][0] & (batch["types"][0] < 0)
    assert untrained.sum() > 100
    assert torch.all(grad[:, untrained] == 0)
    assert torch.all(grad[c, ~batch["centre_valid"][0]] == 0)
    assert torch.all(grad[c + 1, ~batch["boundary_valid"][0]] == 0)
    assert torch.all(grad[c + 2:, batch["types"][0] < 0] == 0)
    # a point's centre patch is trained though its boundary is not
    point_only = batch["centre_valid"][0] & ~batch["boundary_valid"][0]
    assert point_only.any() and grad[c, point_only].abs().sum() > 0
    assert grad[c + 2:, batch["types"][0] >= 0].abs().sum() > 0


def test_changing_logits_where_masks_are_false_leaves_the_loss_unchanged():
    model, batch, logits = _loss_setup()
    base, _ = _loss(model, batch, logits)
    c = model.n_classes
    changed = logits.clone()
    noise = torch.randn(changed.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    centre_off = ~batch["centre_valid"]
    boundary_off = ~batch["boundary_valid"]
    types_off = batch["types"] < 0
    semantic_off = (batch["label_bits"] == 0) & ~batch["nucleus_valid"]
    changed[:, :c] = torch.where(semantic_off[:, None], changed[:, :c] + noise[:, :c], changed[:, :c])
    changed[:, c] = torch.where(centre_off, noise[:, c], changed[:, c])
    changed[:, c + 1] = torch.where(boundary_off, noise[:, c + 1], changed[:, c + 1])
    changed[:, c + 2:] = torch.where(types_off[:, None], noise[:, c + 2:], changed[:, c + 2:])
    assert not torch.equal(changed, logits)
    other, _ = _loss(model, batch, changed)
    assert other.item() == pytest.approx(base.item(), rel=1e-12)
    # and changing a supervised centre logit does change it
    changed[:, c] = torch.where(batch["centre_valid"], noise[:, c], changed[:, c])
    assert _loss(model, batch, changed)[0].item() != pytest.approx(base.item(), rel=1e-6)


def test_total_loss_without_sparse_masks_or_types_falls_back_to_nucleus_valid():
    model, batch, logits = _loss_setup()
    dense = {k: v for k, v in batch.items() if k not in ("centre_valid", "boundary_valid", "types")}
    loss, terms = _loss(model, dense, logits)
    assert "type" not in terms
    same = dict(dense, centre_valid=batch["nucleus_valid"], boundary_valid=batch["nucleus_valid"])
    assert _loss(model, same, logits)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    # without a type head, types in the batch are ignored
    no_types = ModelConfig()
    _, terms = total_loss(split_outputs(logits[:, :no_types.n_outputs], no_types), batch, no_types.nucleus_index,
                          LossConfig())
    assert "type" not in terms


def test_crop_sampler_picks_a_set_by_weight_then_its_samples_alike():
    from histopan.training.sparse_data import SparseCropSampler, SparseSample

    def sample(ds):
        return SparseSample(name=ds, dataset=ds, image=np.zeros((4, 4, 3), np.uint8), targets=None)

    samples = [sample("a"), sample("a"), sample("a"), sample("b")]
    p = SparseCropSampler._probabilities(samples, {"a": 1.0, "b": 3.0})
    np.testing.assert_allclose(p, [1 / 12, 1 / 12, 1 / 12, 3 / 4])
    np.testing.assert_allclose(SparseCropSampler._probabilities(samples, {}), [1 / 6] * 3 + [1 / 2])
    assert SparseCropSampler._probabilities([], {}) is None


def test_distill_is_zero_for_the_teacher_and_keeps_p_nucleus_on_tile_pixels():
    from histopan.training.losses import distill_loss
    from histopan.training.targets import class_bits

    torch.manual_seed(0)
    n, c, h, w = 1, 5, 8, 8
    teacher = {"semantic": torch.randn(n, c, h, w), "centre": torch.randn(n, h, w), "boundary": torch.randn(n, h, w)}
    bits = torch.full((n, h, w), class_bits([1, 4]), dtype=torch.int64)  # a stroma tile: {stroma, nucleus}
    batch = {"label_bits": bits, "nucleus_valid": torch.zeros(n, h, w, dtype=torch.bool)}
    channels = torch.arange(c)
    same = distill_loss(teacher, teacher, batch, channels, teacher_nucleus=4)
    assert abs(float(same)) < 1e-5
    student = {k: v.clone() for k, v in teacher.items()}
    with torch.no_grad():
        student["semantic"][:, 4] += 3.0  # more "nucleus" on the tile's tissue
    more = distill_loss(student, teacher, batch, channels, teacher_nucleus=4)
    assert float(more) > 0.1
    assert float(distill_loss(student, teacher, batch, channels)) < 1e-5  # without it, tile pixels are free
