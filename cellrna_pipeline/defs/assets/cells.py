"""``cell_masks`` (per volume) and ``cell_segmentation_model`` (training), with their checks.

``cell_masks`` reads ``processed/<experiment>.ome.zarr`` (channels ``nucleus`` and, if
present, ``cytoplasm``), segments with the registry's champion
(``models:/cellrna-cell-maskrcnn@champion``, imported from ``model_registry/`` on first
use) or the classical baseline, and writes the labels ``cells``, ``nuclei`` and
``semantic`` (0 background, 1 nucleus, 2 cytoplasm) into that container.

``cell_segmentation_model`` trains a new model, registers it as ``challenger``; the
blocking check ``check_cell_segmentation_model_beats_champion`` scores challenger and
champion on the same unseen synthetic validation volumes and promotes the challenger to
``champion`` only if it scores higher.
"""

import functools
import time
from typing import Any

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import (
    create_labels,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
    write_label_timepoint,
)
from cellrna_pipeline.core.preview import markdown_image
from cellrna_pipeline.core.segmentation.evaluate import (
    VALIDATION_NUCLEI_VOLUMES,
    VALIDATION_VOLUMES,
)
from cellrna_pipeline.defs.partitions import parse_volume_key, volumes_partitions
from cellrna_pipeline.defs.resources import DataRootResource

LABELS = ("cells", "nuclei", "semantic")
_SEMANTIC_COLOURS = np.array([[0, 0, 0], [60, 110, 255], [40, 220, 80]], dtype=np.uint8)


class CellMasksConfig(Config):
    """Run config of ``cell_masks``.

    ``method``: ``maskrcnn`` (the registry's champion) or ``classical`` (threshold +
    watershed, no model). ``diameter_px`` / ``nucleus_diameter_um``: object-size hints
    (default: estimated from the image). ``max_cells``: the count check fails above it.
    """

    method: str = "maskrcnn"
    diameter_px: float | None = None
    nucleus_diameter_um: float | None = None
    max_cells: int = 2000


@functools.lru_cache(maxsize=2)
def _load_model(folder: str) -> Any:
    from cellrna_pipeline.core.segmentation.model import load_model_folder

    return load_model_folder(folder)


def _semantic_preview(semantic_zyx: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil(max(semantic_zyx.shape[1:]) / 256)))
    return _SEMANTIC_COLOURS[semantic_zyx[:, ::step, ::step].max(axis=0)]


@asset(
    partitions_def=volumes_partitions,
    group_name="segmentation",
    kinds={"pytorch", "ome-zarr"},
    deps=[AssetKey("preprocessed_volume"), AssetKey("cell_segmentation_model")],
    description="Cell and nucleus instance labels and the semantic map (0 background, "
    "1 nucleus, 2 cytoplasm) of one timepoint, as OME-Zarr labels 'cells', 'nuclei', "
    "'semantic' of processed/<experiment>.ome.zarr.",
)
def cell_masks(
    context: AssetExecutionContext, config: CellMasksConfig, data_root: DataRootResource
) -> MaterializeResult:
    from cellrna_pipeline.core.segmentation import CellSegmentationConfig, segment_cells

    experiment, t = parse_volume_key(context.partition_key)
    root = data_root.root
    path = root.processed(experiment)
    start = time.perf_counter()
    meta = read_image_meta(path)
    nucleus_c = meta.channel_index("nucleus")
    cyto_c = meta.channel_names.index("cytoplasm") if "cytoplasm" in meta.channel_names else None
    volume = read_timepoint(path, t)
    seg_config = CellSegmentationConfig(
        method=config.method,  # type: ignore[arg-type]
        diameter_px=config.diameter_px,
        nucleus_diameter_um=config.nucleus_diameter_um,
    )
    model, model_meta = None, {"model": "none (classical baseline)"}
    if config.method == "maskrcnn":
        from cellrna_pipeline.integrations.mlflow_registry import CELL_MODEL, MlflowRegistry

        loaded = MlflowRegistry.for_data_root(root).load_model_folder(CELL_MODEL)
        model = _load_model(str(loaded.path))
        model_meta = {
            "model": CELL_MODEL,
            "model_version": loaded.version.version,
            "model_uri": f"models:/{CELL_MODEL}@champion",
            "model_run_id": loaded.version.run_id or "",
        }
    elif config.method != "classical":
        raise InputError(f"unknown method {config.method!r}; use maskrcnn or classical")
    seg = segment_cells(
        volume[nucleus_c],
        volume[cyto_c] if cyto_c is not None else None,
        voxel_size=meta.voxel_size,
        config=seg_config,
        model=model,
    )
    for name in LABELS:
        create_labels(path, name, dtype="uint8" if name == "semantic" else "uint32")
    write_label_timepoint(path, "cells", t, seg.cells)
    write_label_timepoint(path, "nuclei", t, seg.nuclei)
    write_label_timepoint(path, "semantic", t, seg.semantic)
    n_nuclei = int(len(np.unique(seg.nuclei)) - 1)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "timepoint": t,
            "method": config.method,
            **model_meta,
            "n_cells": seg.n_cells,
            "n_nuclei": n_nuclei,
            "diameter_px": float(seg.info.get("diameter_px", 0.0)),
            "diameter_source": str(seg.info.get("diameter_source", "")),
            "slices_predicted": int(seg.info.get("slices_predicted") or volume.shape[1]),
            "nucleus_fraction": float((seg.semantic == 1).mean()),
            "cytoplasm_fraction": float((seg.semantic == 2).mean()),
            "seconds": round(time.perf_counter() - start, 3),
            "preview": MetadataValue.md(
                markdown_image(_semantic_preview(seg.semantic), "semantic MIP")
            ),
        }
    )


def _labels(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> tuple[np.ndarray, np.ndarray]:
    _, t, path = data_root.processed_volume(context.partition_key)
    return read_label_timepoint(path, "cells", t)[0], read_label_timepoint(path, "nuclei", t)[0]


@asset_check(
    asset=cell_masks,
    description="At least one cell, and at least one nucleus where a nucleus stain exists.",
)
def check_cell_masks_not_empty(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    cells, nuclei = _labels(context, data_root)
    n_cells = int(len(np.unique(cells)) - 1)
    n_nuclei = int(len(np.unique(nuclei)) - 1)
    return AssetCheckResult(
        passed=n_cells > 0 and n_nuclei > 0,
        severity=AssetCheckSeverity.WARN,
        metadata={"n_cells": n_cells, "n_nuclei": n_nuclei},
    )


@asset_check(
    asset=cell_masks,
    description="Cell count between 1 and the most cells of at least a nucleus' size that fit the field; "
    "no more nuclei than cells.",
)
def check_cell_masks_count_in_range(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    from cellrna_pipeline.core.segmentation import estimate_diameter_px

    _, t, path = data_root.processed_volume(context.partition_key)
    cells, nuclei = _labels(context, data_root)
    n_cells = int(len(np.unique(cells)) - 1)
    n_nuclei = int(len(np.unique(nuclei)) - 1)
    meta = read_image_meta(path)
    try:
        d = estimate_diameter_px(read_timepoint(path, t)[meta.channel_index("nucleus")])
    except InputError:
        d = 4.0
    z, y, x = cells.shape
    # every cell holds at least a nucleus-sized disk in some slice; allow a 4x margin
    upper = int(4 * z * y * x / max(1.0, np.pi * (d / 2) ** 2))
    return AssetCheckResult(
        passed=1 <= n_cells <= upper and n_nuclei <= n_cells,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "n_cells": n_cells,
            "n_nuclei": n_nuclei,
            "upper_bound": upper,
            "diameter_px": round(d, 2),
        },
    )


@asset_check(asset=cell_masks, description="Every nucleus voxel lies in the cell with the same id.")
def check_cell_masks_nuclei_inside_cells(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    cells, nuclei = _labels(context, data_root)
    inside = nuclei > 0
    n = int(inside.sum())
    wrong = int((cells[inside] != nuclei[inside]).sum())
    return AssetCheckResult(
        passed=wrong == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"nucleus_voxels": n, "outside_own_cell": wrong},
    )


# --- training ------------------------------------------------------------------------------


class CellModelTrainingConfig(Config):
    """Run config of ``cell_segmentation_model`` (defaults: the shipped champion's recipe,
    whose data seed is 2; ``seed`` seeds both the data and the weight initialization)."""

    steps: int = Field(default=6500, ge=1)
    seed: int = 2
    n_volumes: int = Field(default=64, ge=1)
    val_volumes: int = Field(default=4, ge=1)
    shape_zyx: list[int] = Field(default_factory=lambda: [32, 256, 256])
    n_nuclei_volumes: int = Field(default=112, ge=0)
    val_nuclei_volumes: int = Field(default=4, ge=0)
    init_from: str | None = None


def _shape3(values: list[int]) -> tuple[int, int, int]:
    if len(values) != 3 or min(values) < 1:
        raise InputError(f"shape_zyx needs 3 positive values Z Y X, got {values}")
    return (int(values[0]), int(values[1]), int(values[2]))


class PromotionCheckConfig(Config):
    """Run config of the promotion check: validation volumes (unseen generator seeds);
    the defaults are ``cellrna train cells --promote``'s (``evaluate.promotion_volumes``)."""

    volumes: int = Field(default=VALIDATION_VOLUMES, ge=1)
    shape_zyx: list[int] = Field(default_factory=lambda: [32, 256, 256])
    nuclei_volumes: int = Field(default=VALIDATION_NUCLEI_VOLUMES, ge=0)
    nuclei_max_shape_zyx: list[int] | None = None


@asset(
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="Trains the cell Mask R-CNN on synthetic data and registers it in MLflow as "
    "'challenger' of cellrna-cell-maskrcnn; the blocking check promotes it to 'champion' "
    "if it beats the champion on the validation volumes.",
)
def cell_segmentation_model(
    context: AssetExecutionContext, config: CellModelTrainingConfig, data_root: DataRootResource
) -> MaterializeResult:
    from cellrna_pipeline.core.segmentation.train import TrainConfig, run_training
    from cellrna_pipeline.integrations.mlflow_registry import (
        CELL_MODEL,
        CHALLENGER,
        MlflowRegistry,
        MlflowTrainingLogger,
    )

    root = data_root.root
    registry = MlflowRegistry.for_data_root(root)
    shape = _shape3(config.shape_zyx)
    default = TrainConfig()
    train_config = TrainConfig(
        steps=config.steps,
        seed=config.seed,
        data=default.data.model_copy(
            update={
                "n_volumes": config.n_volumes,
                "seed": config.seed,
                "shape_zyx": shape,
                "n_nuclei_volumes": config.n_nuclei_volumes,
            }
        ),
        val_data=default.val_data.model_copy(
            update={
                "n_volumes": config.val_volumes,
                "shape_zyx": shape,
                "n_nuclei_volumes": config.val_nuclei_volumes,
            }
        ),
        init_from=config.init_from,
    )
    run_id = registry.start_run(
        "cellrna-cell-training",
        run_name=f"dagster {context.run_id[:8]}",
        params=train_config.model_dump(mode="json"),
        tags={"dagster_run_id": context.run_id},
    )
    out = root.home / "models" / f"cell-maskrcnn-{context.run_id[:8]}"
    result, folder = run_training(
        train_config,
        out,
        cache_dir=root.home / "training_data",
        callbacks=[MlflowTrainingLogger(registry, run_id)],
        progress=context.log.info,
        command=f"dagster asset materialize cell_segmentation_model (steps={config.steps}, seed={config.seed})",
    )
    assert folder is not None
    version = registry.log_model_folder(folder, CELL_MODEL, run_id=run_id, aliases=(CHALLENGER,))
    registry.client.set_terminated(run_id)
    return MaterializeResult(
        metadata={
            "model": CELL_MODEL,
            "model_version": version.version,
            "alias": CHALLENGER,
            "mlflow_run_id": run_id,
            "steps": result.steps,
            "steps_per_s": round(result.steps_per_s, 3),
            **{k: round(v, 4) for k, v in result.metrics.items()},
        }
    )


@asset_check(
    asset=cell_segmentation_model,
    blocking=True,
    description="Promotes the challenger to champion only if it scores higher than the champion "
    "(mean of cell/nucleus AP@0.5, nucleus/cytoplasm IoU and dense-nuclei AP@0.5) on unseen "
    "synthetic volumes.",
)
def check_cell_segmentation_model_beats_champion(
    context: AssetCheckExecutionContext, config: PromotionCheckConfig, data_root: DataRootResource
) -> AssetCheckResult:
    from cellrna_pipeline.core.segmentation.evaluate import compare_models, promotion_volumes
    from cellrna_pipeline.core.segmentation.model import load_model_folder
    from cellrna_pipeline.integrations.mlflow_registry import CELL_MODEL, CHALLENGER, MlflowRegistry

    registry = MlflowRegistry.for_data_root(data_root.root)
    challenger = registry.get_version(CELL_MODEL, CHALLENGER)
    if challenger is None:
        return AssetCheckResult(passed=False, metadata={"reason": "no challenger registered"})
    champion = registry.ensure_champion(CELL_MODEL)
    if champion.version == challenger.version:
        return AssetCheckResult(passed=True, metadata={"reason": "challenger is already champion"})
    chal_model = load_model_folder(registry.load_model_folder(CELL_MODEL, CHALLENGER).path)
    champ_model = load_model_folder(registry.load_model_folder(CELL_MODEL).path)
    crop = config.nuclei_max_shape_zyx
    volumes, nuclei = promotion_volumes(
        config.volumes,
        config.nuclei_volumes,
        shape_zyx=_shape3(config.shape_zyx),
        nuclei_max_shape_zyx=None if crop is None else _shape3(crop),
    )
    comparison = compare_models(chal_model, champ_model, volumes, nuclei_volumes=nuclei)
    if comparison.challenger_wins:
        registry.promote(CELL_MODEL, challenger.version)
    return AssetCheckResult(
        passed=comparison.challenger_wins,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "challenger_version": challenger.version,
            "champion_version": champion.version,
            "challenger_score": round(comparison.challenger_score, 4),
            "champion_score": round(comparison.champion_score, 4),
            "promoted": comparison.challenger_wins,
            **{f"challenger_{k}": round(v, 4) for k, v in comparison.challenger.items()},
            **{f"champion_{k}": round(v, 4) for k, v in comparison.champion.items()},
        },
    )


CELL_ASSETS = [cell_masks]
TRAINING_ASSETS = [cell_segmentation_model]
CELL_CHECKS = [
    check_cell_masks_not_empty,
    check_cell_masks_count_in_range,
    check_cell_masks_nuclei_inside_cells,
    check_cell_segmentation_model_beats_champion,
]
