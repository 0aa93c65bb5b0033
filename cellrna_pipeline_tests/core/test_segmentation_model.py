"""The Mask R-CNN builder, model folders, and Mask R-CNN inference on a volume (tiny, untrained)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.segmentation import CellSegmentationConfig, segment_cells
from cellrna_pipeline.core.segmentation.model import (
    MaskRCNNConfig,
    build_model,
    count_parameters,
    load_model_folder,
    save_model_folder,
)

TINY = MaskRCNNConfig(
    fpn_channels=32,
    input_size_px=64,
    box_head_dim=64,
    mask_head_channels=32,
    mask_head_layers=1,
    semantic_channels=16,
    anchor_sizes_px=(8, 16, 32, 64),
)


def _target(h: int = 64, w: int = 64) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 4:20, 6:24] = 1
    masks[1, 30:50, 30:56] = 1
    semantic = torch.zeros(h, w, dtype=torch.int64)
    semantic[masks.bool().any(0)] = 2
    semantic[8:14, 10:18] = 1
    return {
        "boxes": torch.tensor([[6.0, 4.0, 24.0, 20.0], [30.0, 30.0, 56.0, 50.0]]),
        "labels": torch.ones(2, dtype=torch.int64),
        "masks": masks,
        "semantic": semantic,
    }


def test_training_forward_returns_detector_and_semantic_losses():
    torch.manual_seed(0)
    model = build_model(TINY).train()
    losses = model([torch.rand(2, 64, 64), torch.rand(2, 64, 64)], [_target(), _target()])
    assert {"loss_objectness", "loss_classifier", "loss_mask", "loss_semantic"} <= set(losses)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.semantic_head.fuse[-1].weight.grad is not None


def test_eval_keeps_input_size_no_800px_resize():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    with torch.no_grad():
        out = model([torch.rand(2, 70, 90)])[0]
    assert out["semantic"].shape == (3, 70, 90)  # padded to /32 inside, cropped back
    assert out["masks"].ndim == 4 and out["boxes"].shape[1] == 4


@pytest.mark.parametrize(("depth", "stages"), [(34, 4), (50, 3)])
def test_backbone_depths_and_stages_build(depth, stages):
    config = MaskRCNNConfig(
        backbone_depth=depth,
        backbone_stages=stages,
        fpn_channels=32,
        anchor_sizes_px=tuple(8 * 2**i for i in range(stages + 1)),
        input_channels=("nucleus",),
        box_head_dim=32,
        mask_head_channels=16,
        semantic_channels=16,
    )
    model = build_model(config).eval()
    with torch.no_grad():
        out = model([torch.rand(1, 64, 64)])[0]
    assert out["semantic"].shape == (3, 64, 64)
    assert count_parameters(model) > 1e5


def test_config_validation():
    with pytest.raises(ValidationError, match="anchor_sizes_px"):
        MaskRCNNConfig(anchor_sizes_px=(8, 16))
    with pytest.raises(ValidationError, match="input_channels"):
        MaskRCNNConfig(input_channels=("dapi",))
    with pytest.raises(ValidationError):
        MaskRCNNConfig(fpn=64)


def test_model_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    folder = save_model_folder(
        model, tmp_path / "m", metrics={"val_ap50": 0.5}, model_card="# card\n"
    )
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "weights.pt",
        "metrics.json",
        "model_card.md",
    }
    loaded = load_model_folder(folder)
    assert loaded.config == model.config
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=2e-3, rtol=1e-3), k  # stored as float16


def test_load_model_folder_errors(tmp_path):
    with pytest.raises(InputError, match=r"config\.json"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "cellrna-rna-maskrcnn"}))
    with pytest.raises(InputError, match="not 'cellrna-cell-maskrcnn'"):
        load_model_folder(tmp_path)


def test_maskrcnn_segmentation_of_a_volume_is_consistent(tiny_config):
    """An untrained model gives arbitrary instances, but the 3D assembly must still hold
    its invariants: input shape, nuclei inside their cells, one object per id."""
    from skimage.measure import label

    from cellrna_pipeline.core.synth import synthesize

    torch.manual_seed(3)
    model = build_model(TINY).eval()
    acq = synthesize(tiny_config)
    config = CellSegmentationConfig(
        diameter_px=12, inference={"score_threshold": 0.0, "batch_size": 8}
    )
    seg = segment_cells(
        acq.image[0, 0], acq.image[0, 1], voxel_size=acq.voxel_size, model=model, config=config
    )
    assert seg.cells.shape == acq.cells[0].shape
    inside = seg.nuclei > 0
    assert (seg.cells[inside] == seg.nuclei[inside]).all()
    for obj in np.unique(seg.cells)[1:][:20]:
        assert label(seg.cells == obj, connectivity=1).max() == 1
    assert seg.info["method"] == "maskrcnn" and seg.info["scale"] == pytest.approx(2.0)


def test_z_context_model_starts_as_its_2d_parent():
    from cellrna_pipeline.core.segmentation.model import expand_z_context

    flat = MaskRCNNConfig(
        fpn_channels=32,
        input_size_px=64,
        box_head_dim=32,
        mask_head_channels=16,
        semantic_channels=16,
    )
    deep = flat.model_copy(update={"z_context": 1})
    assert deep.n_input_channels == 6
    torch.manual_seed(0)
    parent = build_model(flat).eval()
    child = build_model(deep).eval()
    child.load_state_dict(expand_z_context(parent.state_dict(), flat, deep))
    image = torch.rand(2, 64, 64)
    stacked = torch.rand(6, 64, 64)  # other slices: anything, their weights are zero
    stacked[1], stacked[4] = image[0], image[1]
    with torch.no_grad():
        a, b = parent([image])[0], child([stacked])[0]
    assert torch.allclose(a["semantic"], b["semantic"], atol=1e-5)
    assert torch.allclose(a["scores"], b["scores"], atol=1e-5)
