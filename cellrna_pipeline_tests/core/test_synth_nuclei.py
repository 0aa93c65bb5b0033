"""Tests of the dense-nuclei generator: touching nuclei, exact labels, determinism, checks."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth.nuclei import NucleiConfig, synthesize_nuclei

# 16 x 64 x 64 voxels of 0.5 x 0.25 x 0.25 um, nuclei of ~2 um radius: ~0.1 s
TINY = {"shape_zyx": (16, 64, 64), "nucleus_radius_um": 2.0}


@pytest.fixture(scope="module")
def dense():
    return synthesize_nuclei(NucleiConfig(seed=3, volume_fraction=0.45, contact=0.8, **TINY))


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)[:-1].ravel()
        b = np.moveaxis(labels, axis, 0)[1:].ravel()
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= {(int(min(p, q)), int(max(p, q))) for p, q in zip(a[touch], b[touch], strict=True)}
    return pairs


def test_dense_nuclei_touch_laterally_and_in_z(dense):
    labels = dense.labels
    assert labels.dtype == np.uint32 and dense.image.dtype == np.uint16
    assert labels.shape == dense.image.shape == TINY["shape_zyx"]
    n = int(labels.max())
    assert n >= 10
    pairs = _touching_pairs(labels)
    assert len(pairs) >= n // 2  # packed: most nuclei have a neighbour sharing a border
    z_contacts = labels[:-1] != labels[1:]
    assert (z_contacts & (labels[:-1] > 0) & (labels[1:] > 0)).any()  # stacked nuclei too


def test_labels_are_exact_instances(dense):
    labels = dense.labels
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # 1..n, none empty
    cross = ndi.generate_binary_structure(3, 1)
    for obj, box in enumerate(ndi.find_objects(labels), start=1):
        _, pieces = ndi.label(labels[box] == obj, structure=cross)
        assert pieces == 1, f"nucleus {obj} is in {pieces} pieces"
    # the image is made from the labels: nuclei are brighter than the space between them
    image = dense.image.astype(np.float64)
    assert image[labels > 0].mean() > image[labels == 0].mean() + 20


def test_no_touching_when_nuclei_keep_apart():
    sparse = synthesize_nuclei(NucleiConfig(seed=3, volume_fraction=0.05, contact=1.2, **TINY))
    assert sparse.labels.max() >= 1 and not _touching_pairs(sparse.labels)


def test_same_config_same_bytes_and_seeds_differ():
    a = synthesize_nuclei(NucleiConfig(seed=1, **TINY))
    b = synthesize_nuclei(NucleiConfig(seed=1, **TINY))
    c = synthesize_nuclei(NucleiConfig(seed=2, **TINY))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_sizes_follow_the_radius_and_anisotropy():
    vox = (1.0, 0.25, 0.25)
    acq = synthesize_nuclei(
        NucleiConfig(
            seed=0,
            shape_zyx=(24, 96, 96),
            voxel_size_um=vox,
            nucleus_radius_um=3.0,
            nucleus_radius_cv=0.0,
            elongation_max=1.0,
            irregularity=0.0,
            z_aspect=1.0,
            volume_fraction=0.05,
            contact=1.2,
        )
    )
    assert acq.anisotropy == pytest.approx(4.0)
    sizes = np.bincount(acq.labels.ravel())[1:]
    whole = sizes.max()  # the largest is a sphere not cut by the border
    sphere_voxels = 4 / 3 * np.pi * 3.0**3 / np.prod(vox)
    assert whole == pytest.approx(sphere_voxels, rel=0.15)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("volume_fraction", 0.9, "volume_fraction"),
        ("contact", 0.1, "contact"),
        ("nucleus_radius_um", 0.0, "nucleus_radius_um"),
        ("shape_zyx", (4, 4, 4), "shape_zyx"),
        ("irregularity", float("nan"), "irregularity"),
    ],
)
def test_bad_values_give_one_line_errors(field, value, message):
    with pytest.raises(InputError, match=message) as info:
        NucleiConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError):
        NucleiConfig(n_cells=3)


def test_a_layer_of_nuclei_leaves_slices_of_out_of_focus_light():
    deep = {**TINY, "shape_zyx": (40, 64, 64)}
    layer = NucleiConfig(seed=4, volume_fraction=0.3, layer_fraction=0.3, layer_offset=0.0, **deep)
    acq = synthesize_nuclei(layer)
    with_nuclei = np.flatnonzero(acq.labels.any(axis=(1, 2)))
    assert with_nuclei.min() == 0 and with_nuclei.max() < 30  # the layer is at the bottom
    empty = slice(with_nuclei.max() + 1, None)
    assert not acq.labels[empty].any()
    # the haze reaching further along z puts more of the nuclei's light in those slices
    far = layer.model_copy(update={"haze": 1.0, "haze_axial_factor": 6.0})
    near = layer.model_copy(update={"haze": 1.0, "haze_axial_factor": 1.0})
    assert synthesize_nuclei(far).image[empty].mean() > synthesize_nuclei(near).image[empty].mean()
    with pytest.raises((InputError, ValidationError)):
        NucleiConfig(layer_fraction=0.0, **TINY)
