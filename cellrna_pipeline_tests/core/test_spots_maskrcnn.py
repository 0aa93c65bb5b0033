"""The spot Mask R-CNN: builder, a two-step training run into tmp_path, save/load, inference."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellrna_pipeline.core.errors import InputError  # noqa: E402
from cellrna_pipeline.core.spots import DETECTION_SCHEMA  # noqa: E402
from cellrna_pipeline.core.spots.maskrcnn import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    SpotMaskRCNNConfig,
    SpotTrainConfig,
    build_spot_model,
    detect_spots_maskrcnn,
    load_spot_model,
    train_spot_model,
)
from cellrna_pipeline.core.types import VoxelSize  # noqa: E402


def test_builder_is_small_and_keeps_the_input_size():
    torch.manual_seed(0)
    net = build_spot_model(SpotMaskRCNNConfig(detections_per_image=10)).eval()
    assert sum(p.numel() for p in net.parameters()) < 5_000_000
    with torch.no_grad():
        out = net([torch.zeros(1, 64, 96)])
    assert set(out[0]) >= {"boxes", "scores", "masks"}
    # no resize to 800 px: the transform keeps the image as it is
    images, _ = net.transform([torch.zeros(1, 64, 96)])
    assert tuple(images.tensors.shape[-2:]) == (64, 96)


def test_configs_forbid_unknown_keys():
    with pytest.raises(ValueError):
        SpotMaskRCNNConfig(anchors=(1, 2))
    with pytest.raises(ValueError):
        SpotTrainConfig(step=3)


@pytest.mark.slow
def test_train_two_steps_save_load_and_detect(tmp_path):
    cfg = SpotTrainConfig(
        seed=1,
        steps=2,
        batch_size=1,
        crop_px=32,
        train_volumes=1,
        volume_shape_zyx=(4, 48, 48),
        validation_snr=(8.0,),
        out_dir=str(tmp_path / "rna-maskrcnn"),
        model=SpotMaskRCNNConfig(detections_per_image=20),
    )
    result = train_spot_model(cfg)
    _model, metrics = result
    assert "f1_snr8" in metrics and 0.0 <= metrics["f1_mean"] <= 1.0
    folder = result.folder
    for name in ("config.json", "weights.pt", "model_card.md", "metrics.json"):
        assert (folder / name).exists()
    assert json.loads((folder / "config.json").read_text())["kind"] == "cellrna-rna-maskrcnn"
    loaded = load_spot_model(folder)
    img = np.random.default_rng(0).normal(100, 10, (3, 40, 40)).astype(np.float32)
    res = detect_spots_maskrcnn(
        img, model=loaded, voxel_size=VoxelSize(0.6, 0.15, 0.15), score_threshold=0.0
    )
    assert set(res.table.columns) == set(DETECTION_SCHEMA)
    res2d = detect_spots_maskrcnn(img[0], model=loaded, voxel_size=VoxelSize(1, 0.15, 0.15))
    assert (res2d.table["z"] == 0).all()


def test_load_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(InputError, match="model folder"):
        load_spot_model(tmp_path)


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "weights.pt").exists(), reason="no shipped champion")
def test_shipped_champion_is_small_and_loads():
    assert (DEFAULT_MODEL_DIR / "weights.pt").stat().st_size <= 25 * 1024 * 1024
    load_spot_model(DEFAULT_MODEL_DIR)
