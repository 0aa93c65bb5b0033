"""Segmentation without training: size estimate, metrics, clean-up, classical baseline,
tiling without seams and z-stitching (no torch model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.segmentation import (
    CellSegmentationConfig,
    ClassicalConfig,
    estimate_diameter_px,
    instance_scores,
    predict_tiled,
    segment_cells,
    semantic_scores,
    stitch_slices,
)
from cellrna_pipeline.core.segmentation.base import assemble, split_disconnected
from cellrna_pipeline.core.segmentation.inference import (
    Instance2D,
    SlicePrediction,
    paste_instances,
)

_RNG = np.random.default_rng(0)


def _disks(shape, centres, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k
    return out


@pytest.fixture(scope="module")
def tiny_acq(tiny_config):
    from cellrna_pipeline.core.synth import synthesize

    return synthesize(tiny_config)


# --- size estimate -------------------------------------------------------------------------


@pytest.mark.parametrize("diameter", [10, 30, 100])
def test_estimate_diameter_recovers_disk_size(diameter):
    rng = np.random.default_rng(0)
    size = 6 * diameter
    centres = [(size // 4, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, size // 2)]
    labels = _disks((size, size), centres, diameter / 2)
    image = 100 + 400.0 * (labels > 0) + rng.normal(0, 10, labels.shape)
    # a scale estimate: the model tolerates +-40 % (trained with that scale jitter)
    assert estimate_diameter_px(image) == pytest.approx(diameter, rel=0.25)


@pytest.mark.parametrize(("diameter", "noise", "seed"), [(12, 40, 1), (30, 40, 2), (30, 60, 1)])
def test_estimate_diameter_is_not_fooled_by_noise(diameter, noise, seed):
    """At SNR ~1 per pixel the 1-px smoothed threshold makes noise blobs 4-6 px wide
    (measured: 6.0, 4.0, 4.5 px here); the scale search finds the disks."""
    rng = np.random.default_rng(seed)
    size = 8 * diameter
    step = size // 4
    centres = [(y, x) for y in range(step // 2, size, step) for x in range(step // 2, size, step)]
    labels = _disks((size, size), centres, diameter / 2)
    image = 100 + 40.0 * (labels > 0) + rng.normal(0, noise, labels.shape)
    assert estimate_diameter_px(image) == pytest.approx(diameter, rel=0.25)


def test_estimate_diameter_refuses_blank_image():
    with pytest.raises(InputError, match="constant"):
        estimate_diameter_px(np.zeros((32, 32)))


# --- metrics ---------------------------------------------------------------------------


def test_instance_scores_perfect_and_permuted_ids():
    labels = _disks((64, 64), [(16, 16), (16, 48), (48, 32)], 7)
    permuted = np.array([0, 3, 1, 2])[labels]
    s = instance_scores(labels, permuted)
    assert s.ap50 == 1.0 and s.map == 1.0


def test_instance_scores_missing_and_extra_objects():
    labels = _disks((64, 64), [(16, 16), (16, 48), (48, 32)], 7)
    pred = labels.copy()
    pred[pred == 3] = 0
    pred[:4, :4] = 9  # a false positive
    s = instance_scores(labels, pred)
    assert s.tp[0.5] == 2 and s.fp[0.5] == 1 and s.fn[0.5] == 1
    assert s.ap50 == pytest.approx(2 / 4)


def test_instance_scores_iou_threshold_matters():
    true = _disks((64, 64), [(32, 32)], 10)
    pred = _disks((64, 64), [(32, 36)], 10)  # shifted: IoU ~0.6
    s = instance_scores(true, pred)
    assert s.ap[0.5] == 1.0 and s.ap[0.9] == 0.0


def test_semantic_scores():
    t = np.array([[0, 1, 2, 2]])
    p = np.array([[0, 1, 2, 1]])
    s = semantic_scores(t, p)
    assert s["iou_0"] == 1.0 and s["iou_1"] == 0.5 and s["iou_2"] == 0.5
    assert s["accuracy"] == 0.75


# --- clean-up ----------------------------------------------------------------------------


def test_split_disconnected_gives_each_piece_an_id():
    labels = np.zeros((1, 10, 10), np.int32)
    labels[0, 1:3, 1:3] = 5
    labels[0, 6:9, 6:9] = 5
    out = split_disconnected(labels)
    assert len(np.unique(out)) == 3


def test_assemble_keeps_nuclei_inside_their_cells():
    cells = np.zeros((2, 20, 20), np.int32)
    cells[:, 2:10, 2:10] = 1
    cells[:, 10:18, 10:18] = 2
    nucleus = np.zeros(cells.shape, bool)
    nucleus[:, 4:8, 4:8] = True
    nucleus[:, 0:2, 0:2] = True  # outside any cell: ignored
    nucleus[:, 12:16, 12:16] = True
    nucleus[:, 13, 13] = False  # a hole (nucleolus): filled
    seg = assemble(cells, nucleus)
    inside = seg.nuclei > 0
    assert (seg.cells[inside] == seg.nuclei[inside]).all()
    assert seg.nuclei[0, 13, 13] == seg.cells[0, 13, 13]
    assert set(np.unique(seg.semantic)) == {0, 1, 2}
    assert ((seg.semantic == 2) == ((seg.cells > 0) & (seg.nuclei == 0))).all()


# --- classical baseline --------------------------------------------------------------------


def test_classical_on_tiny_synthetic_volume(tiny_acq):
    image = tiny_acq.image[0]
    seg = segment_cells(
        image[0],
        image[1],
        voxel_size=tiny_acq.voxel_size,
        config=CellSegmentationConfig(method="classical"),
    )
    assert seg.cells.shape == image.shape[1:] and seg.cells.dtype == np.uint32
    inside = seg.nuclei > 0
    assert (seg.cells[inside] == seg.nuclei[inside]).all()
    nuclei = instance_scores(tiny_acq.nuclei[0], seg.nuclei)
    assert nuclei.ap50 >= 0.5
    assert seg.info["method"] == "classical"


def test_classical_2d_and_nucleus_only(tiny_acq):
    plane = tiny_acq.image[0, 0, 4]
    seg = segment_cells(plane, None, config=CellSegmentationConfig(method="classical"))
    assert seg.cells.shape == (1, *plane.shape)
    assert seg.n_cells >= 1
    assert (seg.cells == seg.nuclei).all()  # no cell stain: the cell is its nucleus


def test_classical_cell_stain_only(tiny_acq):
    seg = segment_cells(
        None, tiny_acq.image[0, 1], config=CellSegmentationConfig(method="classical")
    )
    assert seg.n_cells >= 1 and not seg.nuclei.any()


@pytest.mark.parametrize(
    ("nucleus", "message"),
    [
        (np.full((16, 16), np.nan), "NaN"),
        (np.zeros(16), "expected a"),
        (np.ones((16, 16)), "constant"),
        (np.zeros((16, 16), dtype=bool), "dtype"),
    ],
)
def test_segment_cells_rejects_bad_input(nucleus, message):
    with pytest.raises(InputError, match=message):
        segment_cells(nucleus, None, config=CellSegmentationConfig(method="classical"))


def test_segment_cells_needs_a_stain_and_equal_shapes():
    with pytest.raises(InputError, match="nucleus stain"):
        segment_cells(None, None)
    with pytest.raises(InputError, match="differ in shape"):
        segment_cells(_RNG.random((16, 16)), _RNG.random((16, 17)))
    with pytest.raises(InputError, match="needs a model"):
        segment_cells(_RNG.random((16, 16)), None, config=CellSegmentationConfig(diameter_px=5))


def test_configs_forbid_unknown_keys():
    with pytest.raises(ValidationError):
        CellSegmentationConfig(metod="classical")
    with pytest.raises(ValidationError):
        ClassicalConfig(smoothing=1.0)


# --- tiling and stitching ----------------------------------------------------------------


def _components_predictor(images):
    """A stand-in 2D model: every connected bright blob is an instance; semantic = channel 0."""
    from scipy import ndimage as ndi

    out = []
    for im in images:
        lab, _ = ndi.label(im[0] > 0.5)
        insts = []
        for k, box in enumerate(ndi.find_objects(lab), start=1):
            prob = (lab[box] == k).astype(np.float32)
            insts.append(Instance2D(float(prob.sum()) / 1000, box[0].start, box[1].start, prob))
        sem = np.stack([1 - im[0], im[0], np.zeros_like(im[0])])
        out.append(SlicePrediction(insts, sem))
    return out


def test_tiled_prediction_has_no_seams():
    rng = np.random.default_rng(1)
    centres = [(int(y), int(x)) for y, x in rng.integers(8, 192, size=(40, 2))]
    labels = _disks((200, 200), centres, 6)
    image = (labels > 0).astype(np.float32)[None]
    whole = _components_predictor([image])[0]
    tiled = predict_tiled([image], _components_predictor, tile_px=64, overlap_px=24)[0]
    a = paste_instances(whole.instances, (200, 200), score_threshold=0)
    b = paste_instances(tiled.instances, (200, 200), score_threshold=0)
    assert instance_scores(a, b).ap[0.95] == 1.0  # same objects, none cut or doubled
    assert np.array_equal(tiled.semantic_logits, whole.semantic_logits)


def test_paste_instances_rescales_and_resolves_overlaps():
    prob = np.ones((10, 10), np.float32)
    insts = [Instance2D(0.9, 0, 0, prob), Instance2D(0.8, 5, 5, prob), Instance2D(0.7, 0, 0, prob)]
    labels = paste_instances(insts, (40, 40), scale=0.5, score_threshold=0.5)
    assert labels.shape == (40, 40)
    assert (labels == 1).sum() == 400  # 10 x 10 at scale 0.5 covers 20 x 20
    assert set(np.unique(labels)) == {0, 1, 2}  # the duplicate (0.7) is dropped


def test_stitch_links_overlaps_and_stops_at_empty_slices():
    disk = _disks((32, 32), [(16, 16)], 6)
    other = _disks((32, 32), [(16, 18)], 6) * 4  # shifted, own 2D id
    labels = np.stack([disk, other, np.zeros_like(disk), disk])
    out = stitch_slices(labels)
    assert out[0, 16, 16] == out[1, 16, 16]  # linked by IoU
    assert out[3, 16, 16] != out[0, 16, 16]  # no link over the empty slice


def test_stitch_never_gives_one_id_to_disconnected_objects():
    from skimage.measure import label

    rng = np.random.default_rng(2)
    labels = np.zeros((6, 48, 48), np.int32)
    for z in range(6):
        centres = [(int(y), int(x)) for y, x in rng.integers(6, 42, size=(4, 2))]
        labels[z] = _disks((48, 48), centres, 5)
    out = stitch_slices(labels)
    for obj in np.unique(out)[1:]:
        assert label(out == obj, connectivity=1).max() == 1


def test_refine_snaps_instances_to_the_semantic_foreground():
    from cellrna_pipeline.core.segmentation.inference import refine_with_foreground

    true = _disks((40, 40), [(12, 12), (28, 28)], 8)
    coarse = _disks((40, 40), [(12, 12), (28, 28)], 5)  # instances too small
    coarse[0:2, 0:2] = 1  # and a stray piece outside the foreground
    out = refine_with_foreground(coarse, true > 0, reach_px=6)
    assert instance_scores(true, out).ap[0.95] == 1.0
    assert out[0, 0] == 0


def test_cells_without_nucleus_merge_into_their_neighbour():
    from cellrna_pipeline.core.segmentation.inference import merge_cells_without_nucleus

    cells = np.zeros((3, 20, 30), np.int32)
    cells[:, 2:18, 2:12] = 1  # a cell with a nucleus
    cells[:, 2:18, 12:16] = 2  # a fragment of it, touching
    cells[:, 2:18, 20:28] = 3  # an isolated cell without nucleus: kept
    nucleus = np.zeros(cells.shape, bool)
    nucleus[:, 6:12, 4:9] = True
    out = merge_cells_without_nucleus(cells, nucleus, min_nucleus_voxels=5)
    assert set(np.unique(out)) == {0, 1, 3}
    assert (out[cells == 2] == 1).all()


def test_dim_end_slices_are_trimmed():
    from cellrna_pipeline.core.segmentation.inference import trim_dim_end_slices

    cells = np.zeros((6, 10, 10), np.int32)
    cells[0:5, 2:8, 2:8] = 1
    stain = np.zeros(cells.shape, np.float32)
    stain[1:5] = 1.0
    stain[0] = 0.2  # out-of-focus light below the object
    stain[4] = 0.6  # dimmer top, but real
    out = trim_dim_end_slices(cells, stain, fraction=0.4)
    assert not out[0].any() and out[1:5].any() and (out[4] == cells[4]).all()


def test_object_contrast_against_the_background_around_each_object():
    from cellrna_pipeline.core.segmentation.inference import object_contrast

    stain = np.full((8, 40, 60), 0.2, np.float32)
    labels = np.zeros(stain.shape, np.int32)
    labels[2:6, 5:15, 5:15] = 1
    stain[2:6, 5:15, 5:15] = 1.0  # a nucleus
    labels[2:6, 25:35, 5:15] = 2
    stain[2:6, 25:35, 5:15] = 0.23  # out-of-focus light: barely above its surroundings
    labels[2:6, 5:15, 40:50] = 4  # id 3 absent
    stain[2:6, 5:15, 40:50] = 0.7
    stain[:, :, 30:] += 0.1  # brighter background on the right: measured locally
    c = object_contrast(labels, stain, radius_px=3.0, anisotropy=2.0)
    assert c.shape == (5,) and np.isnan(c[0]) and np.isnan(c[3])
    assert c[1] == pytest.approx(0.8) and c[2] == pytest.approx(0.03, abs=1e-6)
    assert c[4] == pytest.approx(0.5)  # 0.8 inside, 0.3 around
    assert np.all(
        np.isinf(object_contrast(np.ones((4, 4), np.int32), stain[0, :4, :4], radius_px=2)[1:])
    )


def test_nuclei_snap_to_the_half_way_edge_of_the_nucleus_stain():
    from cellrna_pipeline.core.segmentation.inference import snap_nuclei_to_stain

    yy, xx = np.mgrid[:40, :40]
    disk = (yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2
    stain = np.where(disk, 0.9, 0.3).astype(np.float32)[None].repeat(3, 0)  # 3 slices
    cells = np.zeros(stain.shape, np.int32)
    cells[:, 4:36, 4:36] = 1
    wide = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2)[None].repeat(3, 0)  # 2 px too wide
    narrow = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 7**2)[None].repeat(3, 0)  # 1 px too narrow
    truth = disk[None].repeat(3, 0)
    for predicted in (wide, narrow):
        snapped = snap_nuclei_to_stain(cells, predicted, stain, reach_px=2)
        iou = (snapped & truth).sum() / (snapped | truth).sum()
        before = (predicted & truth).sum() / (predicted | truth).sum()
        assert iou > 0.97 and before < 0.8
    # beyond the reach the border stays near the prediction
    far = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 4**2)[None].repeat(3, 0)
    assert snap_nuclei_to_stain(cells, far, stain, reach_px=1).sum() < disk.sum() * 3
    # no step between nucleus and cytoplasm, or a cell without cytoplasm: unchanged
    flat = np.full(stain.shape, 0.5, np.float32)
    assert np.array_equal(snap_nuclei_to_stain(cells, wide, flat), wide & (cells > 0))
    assert np.array_equal(snap_nuclei_to_stain(cells, cells > 0, stain), cells > 0)


def test_dim_objects_are_dropped_from_a_volume():
    """A nucleus and a patch of out-of-focus light that a 2D model takes for a nucleus."""
    from scipy import ndimage as ndi

    from cellrna_pipeline.core.segmentation.inference import InferenceConfig, segment_volume

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:12, :64, :64]
    nucleus = 100 + rng.normal(0, 2, zz.shape)
    nucleus[(zz - 6) ** 2 * 4 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1000
    nucleus[(np.abs(zz - 6) <= 2) & ((yy - 44) ** 2 + (xx - 44) ** 2 <= 64)] = 170

    def everything_above_the_floor(images):
        out = []
        for im in images:
            lab, _ = ndi.label(im[0] > 0.04)
            insts = [
                Instance2D(0.9, box[0].start, box[1].start, (lab[box] == k).astype(np.float32))
                for k, box in enumerate(ndi.find_objects(lab), start=1)
            ]
            out.append(SlicePrediction(insts, None))
        return out

    def run(min_contrast):
        return segment_volume(
            nucleus.astype(np.float32), None, everything_above_the_floor, diameter_px=16,
            canonical_px=16, config=InferenceConfig(min_contrast=min_contrast),
        )  # fmt: skip

    kept, filtered = run(0.0), run(0.1)
    assert kept.cells.max() == 2
    assert filtered.cells.max() == 1 and filtered.cells[6, 20, 20] == 1
    assert filtered.info["dim_objects_dropped"] == 1


def _ball_slices(n_z, centre_z, radius, centre_yx=(20, 20), shape=(40, 40)) -> np.ndarray:
    """Cross-sections of a sphere of ``radius`` slices at z = ``centre_z`` (2D disks)."""
    out = np.zeros((n_z, *shape), np.int32)
    for z in range(n_z):
        r2 = radius**2 - (z - centre_z) ** 2
        if r2 > 0:
            out[z] = _disks(shape, [centre_yx], np.sqrt(r2))
    return out


def test_area_dip_splits_two_stacked_objects_but_not_one():
    from cellrna_pipeline.core.segmentation.inference import split_at_area_minima

    # two spheres stacked in z, touching: linked end to end into one id
    stacked = np.maximum(_ball_slices(16, 4, 4.5), _ball_slices(16, 11.5, 4.5, (21, 19)))
    joined = stitch_slices(stacked)
    assert len(np.unique(joined)) == 2  # background + one object: the link merged them
    out = split_at_area_minima(joined, ratio=0.6)
    truth = np.where(_ball_slices(16, 4, 4.5) > 0, 1, 0) + np.where(
        (_ball_slices(16, 11.5, 4.5, (21, 19)) > 0) & (_ball_slices(16, 4, 4.5) == 0), 2, 0
    )
    assert instance_scores(truth, out).ap50 == 1.0
    single = stitch_slices(_ball_slices(16, 7.5, 7))
    assert np.array_equal(split_at_area_minima(single, ratio=0.6), single)
    assert np.array_equal(split_at_area_minima(joined, ratio=0.0), joined)


def test_small_z_fragments_merge_but_stack_ends_and_lateral_contacts_do_not():
    from cellrna_pipeline.core.segmentation.inference import merge_z_fragments

    labels = np.zeros((8, 30, 60), np.int32)
    labels[1:6, 5:25, 5:25] = 1  # an object
    labels[6, 10:14, 10:14] = 2  # its tip, cut off above it: merges
    labels[0:6, 5:25, 30:50] = 3  # another object, touching the first slice
    labels[0, 26:29, 30:33] = 4  # small, in the first slice: kept (cut by the stack)
    labels[3, 10:13, 25:28] = 5  # small, touching object 1 laterally only: kept
    out = merge_z_fragments(labels, fraction=0.2)
    assert (out[labels == 2] == 1).all()
    for kept in (3, 4, 5):
        assert (out[labels == kept] == kept).all()
    assert np.array_equal(merge_z_fragments(labels, fraction=0.0), labels)


def test_watershed_assembly_separates_stacked_and_side_by_side_objects():
    from cellrna_pipeline.core.segmentation.inference import watershed_slices

    low, high = _ball_slices(16, 4, 4.5), _ball_slices(16, 11.5, 4.5, (21, 19))
    stacked = np.maximum(low, high * 2)
    truth = np.where(low > 0, 1, np.where(high > 0, 2, 0))
    # per-slice ids are arbitrary: the slice where both meet has two 2D instances
    out = watershed_slices(stacked, diameter_px=9.0)
    assert instance_scores(truth, out).ap50 == 1.0
    left = _ball_slices(12, 5.5, 6, (20, 14))
    right = _ball_slices(12, 5.5, 6, (20, 26)) * 2
    pair = np.where(left > 0, left, right)  # touching side by side in every slice
    out = watershed_slices(pair, diameter_px=12.0)
    assert instance_scores(np.where(pair > 0, pair, 0), out).ap50 == 1.0
    one = _ball_slices(12, 5.5, 6)
    assert watershed_slices(one, diameter_px=12.0).max() == 1


def test_promotion_volumes_are_unseen_and_of_every_kind():
    from cellrna_pipeline.core.segmentation.evaluate import VALIDATION_SEED, promotion_volumes

    volumes, nuclei = promotion_volumes(
        2, 1, shape_zyx=(8, 64, 64), nuclei_max_shape_zyx=(8, 64, 64)
    )
    names = [v.name for v in volumes]
    assert names == [
        f"synth seed {VALIDATION_SEED}",
        f"synth seed {VALIDATION_SEED + 1}",
        f"synth-random seed {VALIDATION_SEED * 1000}",
        f"synth-random seed {VALIDATION_SEED * 1000 + 1}",
    ]
    assert all(v.nucleus is not None and v.cytoplasm is not None for v in volumes)
    assert len(nuclei) == 1 and nuclei[0].cytoplasm is None
    assert nuclei[0].nucleus is not None and nuclei[0].nucleus.shape[1:] == (64, 64)
    assert nuclei[0].cells.max() > 0
