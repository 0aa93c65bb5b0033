"""``cell_masks`` (classical and Mask R-CNN from the registry) and the training asset with its
blocking promotion check, materialized into a tmp data root."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance, materialize

from cellrna_pipeline.core.io import (
    create_image,
    list_labels,
    read_label_timepoint,
    timepoints_written,
    write_timepoint,
)
from cellrna_pipeline.defs.assets.cells import (
    CELL_CHECKS,
    cell_masks,
    cell_segmentation_model,
    check_cell_segmentation_model_beats_champion,
)
from cellrna_pipeline.defs.partitions import VOLUMES
from cellrna_pipeline.defs.resources import DataRootResource

MASK_CHECKS = [c for c in CELL_CHECKS if c is not check_cell_segmentation_model_beats_champion]


@pytest.fixture
def processed(data_root, tiny_config):
    """A processed container for experiment ``exp1`` made from the tiny acquisition."""
    from cellrna_pipeline.core.synth import synthesize

    acq = synthesize(tiny_config)
    path = data_root.processed("exp1")
    path.parent.mkdir(parents=True, exist_ok=True)
    create_image(path, acq.meta)
    for t in range(acq.image.shape[0]):
        write_timepoint(path, t, acq.image[t])
    return acq


@pytest.fixture
def instance():
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(VOLUMES, ["exp1__t0000", "exp1__t0001"])
    return instance


def _checks(result) -> dict[str, bool]:
    return {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_cell_masks_classical_writes_consistent_labels(data_root, processed, instance):
    result = materialize(
        [cell_masks, *MASK_CHECKS],
        partition_key="exp1__t0001",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
        run_config={"ops": {"cell_masks": {"config": {"method": "classical"}}}},
    )
    assert result.success
    path = data_root.processed("exp1")
    assert {"cells", "nuclei", "semantic"} <= set(list_labels(path))
    assert timepoints_written(path, label="cells") == [1]
    cells = read_label_timepoint(path, "cells", 1)[0]
    nuclei = read_label_timepoint(path, "nuclei", 1)[0]
    semantic = read_label_timepoint(path, "semantic", 1)[0]
    assert cells.shape == processed.cells[1].shape
    assert ((semantic == 1) == (nuclei > 0)).all() and (
        (semantic == 2) == ((cells > 0) & (nuclei == 0))
    ).all()
    meta = result.asset_materializations_for_node("cell_masks")[0].metadata
    assert meta["method"].value == "classical" and meta["n_cells"].value >= 1
    assert _checks(result) == {
        "check_cell_masks_not_empty": True,
        "check_cell_masks_count_in_range": True,
        "check_cell_masks_nuclei_inside_cells": True,
    }


def test_cell_masks_with_the_registry_champion_records_its_version(
    data_root, processed, instance, tmp_path, monkeypatch
):
    import torch

    from cellrna_pipeline.core.segmentation.model import (
        MaskRCNNConfig,
        build_model,
        save_model_folder,
    )

    torch.manual_seed(0)
    tiny = MaskRCNNConfig(
        fpn_channels=32,
        input_size_px=64,
        box_head_dim=32,
        mask_head_channels=16,
        semantic_channels=16,
    )
    save_model_folder(build_model(tiny), tmp_path / "shipped" / "cell-maskrcnn")
    monkeypatch.setenv("CELLRNA_MODEL_REGISTRY", str(tmp_path / "shipped"))
    result = materialize(
        [cell_masks],
        partition_key="exp1__t0000",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
        run_config={"ops": {"cell_masks": {"config": {"diameter_px": 12.0}}}},
    )
    assert result.success
    meta = result.asset_materializations_for_node("cell_masks")[0].metadata
    assert meta["model"].value == "cellrna-cell-maskrcnn"
    assert meta["model_version"].value == "1"  # the shipped folder, imported on first use
    assert meta["model_uri"].value == "models:/cellrna-cell-maskrcnn@champion"
    assert (data_root.mlruns / "mlflow.db").exists()


def test_cell_masks_missing_nucleus_channel_is_bad_input(data_root, instance, tiny_config):
    from cellrna_pipeline.core.synth import synthesize
    from cellrna_pipeline.core.types import ImageMeta

    acq = synthesize(tiny_config)
    meta = ImageMeta(acq.image.shape, "uint16", acq.voxel_size, ("dapi", "membrane", "rna0"))
    path = data_root.processed("exp1")
    path.parent.mkdir(parents=True, exist_ok=True)
    create_image(path, meta)
    write_timepoint(path, 0, acq.image[0])
    result = materialize(
        [cell_masks],
        partition_key="exp1__t0000",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
        run_config={"ops": {"cell_masks": {"config": {"method": "classical"}}}},
        raise_on_error=False,
    )
    assert not result.success
    assert "cells" not in list_labels(path)


@pytest.mark.slow
def test_training_asset_registers_a_challenger_and_the_check_decides(
    data_root, tmp_path, monkeypatch
):
    import torch

    import cellrna_pipeline.core.segmentation.train as train_module
    from cellrna_pipeline.core.segmentation.model import (
        MaskRCNNConfig,
        build_model,
        save_model_folder,
    )
    from cellrna_pipeline.integrations.mlflow_registry import CELL_MODEL, MlflowRegistry

    tiny = MaskRCNNConfig(
        fpn_channels=32,
        input_size_px=64,
        box_head_dim=32,
        mask_head_channels=16,
        semantic_channels=16,
    )
    torch.manual_seed(1)
    save_model_folder(build_model(tiny), tmp_path / "shipped" / "cell-maskrcnn")
    monkeypatch.setenv("CELLRNA_MODEL_REGISTRY", str(tmp_path / "shipped"))
    real = train_module.run_training
    monkeypatch.setattr(
        train_module,
        "run_training",
        lambda config, out, **kw: real(
            config.model_copy(update={"model": tiny, "val_slices": 2}), out, **kw
        ),
    )
    small = [6, 64, 64]
    result = materialize(
        [cell_segmentation_model, check_cell_segmentation_model_beats_champion],
        instance=DagsterInstance.ephemeral(),
        resources={"data_root": DataRootResource(home=str(data_root.home))},
        run_config={
            "ops": {
                "cell_segmentation_model": {
                    "config": {
                        "steps": 1,
                        "n_volumes": 1,
                        "val_volumes": 1,
                        "shape_zyx": small,
                        "n_nuclei_volumes": 1,
                        "val_nuclei_volumes": 1,
                    }
                },
                "cell_segmentation_model_check_cell_segmentation_model_beats_champion": {
                    "config": {
                        "volumes": 1,
                        "shape_zyx": small,
                        "nuclei_volumes": 1,
                        "nuclei_max_shape_zyx": small,
                    }
                },
            }
        },
        raise_on_error=False,
    )
    meta = result.asset_materializations_for_node("cell_segmentation_model")[0].metadata
    assert meta["alias"].value == "challenger"
    challenger = meta["model_version"].value
    check = next(e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")
    data = check.event_specific_data
    registry = MlflowRegistry.for_data_root(data_root)
    champion = registry.get_version(CELL_MODEL)
    # the shipped model was imported as champion by the check; the challenger replaced it
    # exactly when it scored higher on the validation volumes
    won = data.metadata["challenger_score"].value > data.metadata["champion_score"].value
    assert data.passed == won and data.metadata["promoted"].value == won
    assert (champion.version == challenger) == won
    assert data.metadata["champion_version"].value != challenger
