"""Preprocessing assets: ``camera_calibration`` and ``drift_shifts`` [experiment],
``preprocessed_volume`` [volume], and their checks.

Experiment-level assets depend on every ``raw_volume`` partition (``AllPartitionMapping``,
see ``docs/partitions.md``) and read exactly their own experiment's timepoints from
storage; ``preprocessed_volume`` depends on its own ``raw_volume`` partition and on the
experiment-level assets the same way.
"""

import time

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.experiment import ExperimentRecord
from cellrna_pipeline.core.io import (
    auto_chunks_zyx,
    create_image,
    open_image,
    preview_level,
    read_timepoint,
    timepoints_written,
    write_timepoint,
)
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.core.preprocess import (
    CalibrationConfig,
    PreprocessConfig,
    Registration,
    RegistrationConfig,
    central_crop,
    drift_of,
    estimate_camera_calibration,
    estimate_drift,
    preprocess_volume,
    previous_timepoint,
    register_translation,
    registration_channel,
    sample_plane_indices,
    shift_volume,
)
from cellrna_pipeline.core.preprocess.calibration import bin_planes
from cellrna_pipeline.core.preprocess.store import (
    PREPROCESSING_SCHEMA,
    acquisition_calibration_images,
    drift_table_path,
    load_calibration,
    load_drift_table,
    read_tiff,
    save_calibration,
    save_drift_table,
    save_preprocessing_table,
)
from cellrna_pipeline.core.preview import composite_mip, markdown_image, markdown_table
from cellrna_pipeline.core.types import ImageMeta
from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.partitions import (
    experiments_partitions,
    parse_volume_key,
    volumes_partitions,
)
from cellrna_pipeline.defs.resources import DaskResource, DataRootResource

GROUP = "preprocessing"
_SAMPLE_SIZE_YX = 512  # data-based calibration samples planes binned to about this size
_CHROMATIC_CROP_ZYX = (64, 512, 512)
MAX_RESIDUAL_PX = 0.5
MAX_NEIGHBOUR_RESIDUAL_PX = 2.0


class CameraCalibrationConfig(Config):
    """Run config of ``camera_calibration`` (see ``CalibrationConfig``)."""

    chromatic: str = "auto"
    camera_offset_adu: float | None = None
    max_planes: int = 96
    flat_poly_degree: int = 6


class DriftShiftsConfig(Config):
    """Run config of ``drift_shifts`` (see ``RegistrationConfig``)."""

    channel: str = ""
    reference_timepoint: int = 0
    strategy: str = "chain"
    smoothing_um: list[float] = [0.3, 0.3, 0.3]  # noqa: RUF012 - pydantic copies defaults


class PreprocessedVolumeConfig(Config):
    """Run config of ``preprocessed_volume`` (see ``PreprocessConfig``)."""

    denoise: str = "gaussian"
    gaussian_sigma_nm: list[float] = [300.0, 75.0, 75.0]  # noqa: RUF012 - pydantic copies
    percentiles: list[float] = [1.0, 99.8]  # noqa: RUF012 - pydantic copies defaults
    nl_means_h: float = 0.8


def _require_raw(root: DataRoot, record: ExperimentRecord) -> None:
    """:class:`InputError` unless every raw timepoint of the experiment is stored."""
    path = root.raw(record.name)
    done = set(timepoints_written(path)) if path.exists() else set()
    missing = sorted(set(range(record.n_timepoints)) - done)
    if missing:
        raise InputError(
            f"experiment {record.name!r}: raw_volume missing for timepoints {missing[:10]}; "
            "materialize raw_volume first"
        )


def _sample_planes(
    root: DataRoot, record: ExperimentRecord, max_planes: int
) -> tuple[list[np.ndarray], int]:
    """Per channel, up to ``max_planes`` raw planes spread over (t, z), binned to ~512 px."""
    lazy = open_image(root.raw(record.name))
    n_t, n_c, n_z, n_y, n_x = record.shape_tczyx
    factor = max(1, -(-max(n_y, n_x) // _SAMPLE_SIZE_YX))
    picks = sample_plane_indices(n_t * n_z, max_planes)
    by_t: dict[int, list[int]] = {}
    for i in picks:
        by_t.setdefault(int(i) // n_z, []).append(int(i) % n_z)
    planes: list[list[np.ndarray]] = [[] for _ in range(n_c)]
    for t, zs in sorted(by_t.items()):
        block = np.asarray(lazy[t][:, zs])  # (c, n, y, x): reads only those chunks
        for c in range(n_c):
            planes[c].append(bin_planes(block[c], factor))
    return [np.concatenate(p) for p in planes], factor


@asset(
    partitions_def=experiments_partitions,
    deps=[AssetDep(raw_volume, partition_mapping=AllPartitionMapping())],
    group_name=GROUP,
    kinds={"tiff", "json"},
    description="Dark/offset, flat-field and chromatic channel shifts of one experiment "
    "(calibration/<experiment>/): from the acquisition's calibration images where it "
    "ships them, else estimated from its raw timepoints.",
)
def camera_calibration(
    context: AssetExecutionContext, config: CameraCalibrationConfig, data_root: DataRootResource
) -> MaterializeResult:
    start = time.perf_counter()
    experiment = context.partition_key
    root = data_root.root
    record = data_root.experiment(experiment)
    _require_raw(root, record)
    cfg = CalibrationConfig(
        chromatic=config.chromatic,  # type: ignore[arg-type]
        camera_offset_adu=config.camera_offset_adu,
        max_planes=config.max_planes,
        flat_poly_degree=config.flat_poly_degree,
    )
    _, n_c, n_z, n_y, n_x = record.shape_tczyx
    crop = central_crop((n_z, n_y, n_x), _CHROMATIC_CROP_ZYX)
    images = acquisition_calibration_images(record.source)
    dark = read_tiff(images["dark"]) if "dark" in images else None
    flat = read_tiff(images["flat"]) if "flat" in images else None
    beads = read_tiff(images["beads"], crop[1:]) if "beads" in images else None
    samples, factor = None, 1
    if (dark is None and cfg.camera_offset_adu is None) or flat is None:
        samples, factor = _sample_planes(root, record, cfg.max_planes)
    data = None
    if beads is None and cfg.chromatic in ("auto", "data") and n_c > 1:
        data = np.asarray(open_image(root.raw(experiment))[0][(slice(None), *crop)])
    calibration = estimate_camera_calibration(
        channel_names=record.channel_names,
        shape_yx=(n_y, n_x),
        voxel_size=record.voxel_size,
        dark_frames=dark,
        flat_images=flat,
        beads_czyx=beads,
        sample_planes=samples,
        sample_bin_yx=factor,
        data_czyx=data,
        volume_crop_yx=(crop[1], crop[2]),
        config=cfg,
    )
    path = save_calibration(root, experiment, calibration)
    shifts = {
        name: [round(float(v), 3) for v in s]
        for name, s in zip(record.channel_names, calibration.channel_shifts_zyx_px, strict=True)
    }
    flat_range = calibration.details.get("flat_min_max", [])
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "sources": MetadataValue.json(calibration.sources),
            "calibration_images": ", ".join(sorted(images)) or "none",
            "dark_mean_adu": round(float(calibration.dark_cyx.mean()), 3),
            "flat_min_max": str(flat_range),
            "channel_shifts_zyx_px": MetadataValue.json(shifts),
            "seconds": round(time.perf_counter() - start, 3),
        }
    )


@asset(
    partitions_def=experiments_partitions,
    deps=[AssetDep(raw_volume, partition_mapping=AllPartitionMapping()), camera_calibration],
    group_name=GROUP,
    kinds={"parquet"},
    description="Sub-voxel translation of every timepoint relative to the reference "
    "timepoint (nuclear channel, calibrated), tables/drift_shifts/<experiment>/.",
)
def drift_shifts(
    context: AssetExecutionContext, config: DriftShiftsConfig, data_root: DataRootResource
) -> MaterializeResult:
    start = time.perf_counter()
    experiment = context.partition_key
    root = data_root.root
    record = data_root.experiment(experiment)
    _require_raw(root, record)
    calibration = load_calibration(root, experiment)
    cfg = RegistrationConfig(
        channel=config.channel or None,
        reference_timepoint=config.reference_timepoint,
        strategy=config.strategy,  # type: ignore[arg-type]
        smoothing_um=tuple(config.smoothing_um),  # type: ignore[arg-type]
    )
    channel = registration_channel(record.channel_names, cfg.channel)
    crop = central_crop(record.shape_tczyx[2:], cfg.max_crop_zyx)
    lazy = open_image(root.raw(experiment))

    def read(t: int) -> np.ndarray:
        raw = np.asarray(lazy[t, channel][crop])
        return calibration.calibrate_channel(raw, channel, y=crop[1], x=crop[2])

    table = estimate_drift(
        read,
        range(record.n_timepoints),
        voxel_size=record.voxel_size,
        channel_name=record.channel_names[channel],
        config=cfg,
        progress=lambda done, total: context.log.debug(f"registered {done}/{total}"),
    )
    path = save_drift_table(root, experiment, table)
    shifts = table.select("dz_px", "dy_px", "dx_px").to_numpy()
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "channel": record.channel_names[channel],
            "reference_timepoint": cfg.reference_timepoint,
            "max_abs_shift_zyx_px": str(np.round(np.abs(shifts).max(axis=0), 3).tolist()),
            "min_correlation": round(float(table.select(pl.col("correlation").min()).item()), 4),
            "all_converged": bool(table["converged"].all()),
            "table": MetadataValue.md(
                markdown_table(
                    table.select("timepoint", "dz_px", "dy_px", "dx_px", "correlation", "anchored")
                )
            ),
            "seconds": round(time.perf_counter() - start, 3),
        }
    )


@asset(
    partitions_def=volumes_partitions,
    deps=[
        raw_volume,
        AssetDep(camera_calibration, partition_mapping=AllPartitionMapping()),
        AssetDep(drift_shifts, partition_mapping=AllPartitionMapping()),
    ],
    group_name=GROUP,
    kinds={"ome-zarr", "dask"},
    description="One timepoint calibrated, percentile-normalized (0..1, float32), denoised "
    "and registered (drift + chromatic shift) in processed/<experiment>.ome.zarr; chunked "
    "with dask on local threads or a dask.distributed cluster.",
)
def preprocessed_volume(
    context: AssetExecutionContext,
    config: PreprocessedVolumeConfig,
    data_root: DataRootResource,
    dask: DaskResource,
) -> MaterializeResult:
    start = time.perf_counter()
    experiment, t = parse_volume_key(context.partition_key)
    root = data_root.root
    record = data_root.experiment(experiment)
    raw_path = root.raw(experiment)
    if not raw_path.exists() or t not in timepoints_written(raw_path):
        raise InputError(f"{experiment} t={t}: raw_volume is not materialized")
    calibration = load_calibration(root, experiment)
    drift = drift_of(load_drift_table(root, experiment), t)
    cfg = PreprocessConfig(
        denoise=config.denoise,  # type: ignore[arg-type]
        gaussian_sigma_nm=tuple(config.gaussian_sigma_nm),  # type: ignore[arg-type]
        percentiles=tuple(config.percentiles),  # type: ignore[arg-type]
        nl_means_h=config.nl_means_h,
    )
    meta = ImageMeta(
        shape_tczyx=record.shape_tczyx,
        dtype="float32",
        voxel_size=record.voxel_size,
        channel_names=record.channel_names,
        frame_interval_s=record.frame_interval_s,
    )
    out_path = root.processed(experiment)
    chunks = auto_chunks_zyx(meta.shape_zyx, 4, target_chunk_mib=cfg.chunk_mib)
    create_image(out_path, meta, chunks_zyx=chunks)
    with dask.scheduler() as target:
        result = preprocess_volume(
            open_image(raw_path)[t],
            voxel_size=record.voxel_size,
            calibration=calibration,
            drift_zyx_px=drift,
            config=cfg,
            chunked=True,
            chunks_zyx=chunks,
        )
        write_timepoint(out_path, t, result.data)
    seconds = time.perf_counter() - start
    ranges = result.percentile_values
    rows = [
        {
            "timepoint": t,
            "channel": name,
            "p_low": cfg.percentiles[0],
            "p_high": cfg.percentiles[1],
            "value_low": float(ranges[c, 0]),
            "value_high": float(ranges[c, 1]),
            "shift_z_px": float(result.shifts_applied_zyx_px[c, 0]),
            "shift_y_px": float(result.shifts_applied_zyx_px[c, 1]),
            "shift_x_px": float(result.shifts_applied_zyx_px[c, 2]),
            "denoise": cfg.denoise,
            "seconds": seconds,
        }
        for c, name in enumerate(record.channel_names)
    ]
    save_preprocessing_table(root, experiment, t, pl.DataFrame(rows, schema=PREPROCESSING_SCHEMA))
    small = read_timepoint(out_path, t, level=preview_level(out_path))
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(out_path)),
            "timepoint": t,
            "drift_applied_zyx_px": str([round(-v, 3) for v in drift]),
            "shift_applied_per_channel_zyx_px": MetadataValue.json(
                {
                    name: [round(float(v), 3) for v in result.shifts_applied_zyx_px[c]]
                    for c, name in enumerate(record.channel_names)
                }
            ),
            "normalization_percentiles": str(list(cfg.percentiles)),
            "normalization_values": MetadataValue.json(
                {
                    name: [round(float(v), 3) for v in ranges[c]]
                    for c, name in enumerate(record.channel_names)
                }
            ),
            "denoise": cfg.denoise,
            "dtype": "float32",
            "chunks_zyx": str(chunks),
            "scheduler": target.describe(),
            "seconds": round(seconds, 3),
            "preview": MetadataValue.md(markdown_image(composite_mip(small), "preprocessed MIP")),
        }
    )


# --------------------------------------------------------------------------- checks


@asset_check(
    asset=camera_calibration,
    description="Flat-field plausible (0.2..5 x the mean) and channel shifts within bounds.",
)
def check_camera_calibration_plausible(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    experiment = context.partition_key
    calibration = load_calibration(data_root.root, experiment)
    flat_min, flat_max = float(calibration.flat_cyx.min()), float(calibration.flat_cyx.max())
    bound = np.asarray(CalibrationConfig().max_chromatic_shift_px)
    shifts_ok = bool((np.abs(calibration.channel_shifts_zyx_px) <= bound).all())
    return AssetCheckResult(
        passed=flat_min >= 0.2 and flat_max <= 5.0 and shifts_ok,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "flat_min": round(flat_min, 4),
            "flat_max": round(flat_max, 4),
            "max_abs_channel_shift_zyx_px": str(
                np.round(np.abs(calibration.channel_shifts_zyx_px).max(axis=0), 3).tolist()
            ),
        },
    )


@asset_check(
    asset=drift_shifts,
    description="Every registration converged and correlates with the reference (r >= 0.5).",
)
def check_drift_shifts_converged(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    experiment = context.partition_key
    table = load_drift_table(data_root.root, experiment)
    bad = table.filter(~pl.col("converged") | (pl.col("correlation") < 0.5))["timepoint"]
    return AssetCheckResult(
        passed=bad.len() == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "path": MetadataValue.path(str(drift_table_path(data_root.root, experiment))),
            "bad_timepoints": str(bad.to_list()),
            "min_correlation": round(float(table.select(pl.col("correlation").min()).item()), 4),
        },
    )


@asset_check(
    asset=preprocessed_volume,
    description=f"Registration residual on the registration channel: re-registered to its "
    f"own raw volume, the preprocessed timepoint shows exactly the table's shift (within "
    f"{MAX_RESIDUAL_PX} voxel per axis), and re-registered to its neighbour towards the "
    f"reference (corrected the same way) it moves by at most {MAX_NEIGHBOUR_RESIDUAL_PX} "
    "voxels (cells that move on their own leave about a voxel of ambiguity).",
)
def check_preprocessed_volume_registration_residual(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    experiment, t = parse_volume_key(context.partition_key)
    root = data_root.root
    record = data_root.experiment(experiment)
    table = load_drift_table(root, experiment)
    calibration = load_calibration(root, experiment)
    ref_t = int(table["reference_timepoint"][0])
    channel = record.channel_names.index(str(table["channel"][0]))
    neighbour_t = previous_timepoint(t, ref_t)
    cfg = RegistrationConfig()
    crop = central_crop(record.shape_tczyx[2:], cfg.max_crop_zyx)
    chroma = calibration.channel_shifts_zyx_px[channel]
    applied_t = -(np.asarray(drift_of(table, t)) + chroma)
    applied_n = -(np.asarray(drift_of(table, neighbour_t)) + chroma)
    raw = open_image(root.raw(experiment))
    moving = np.asarray(open_image(root.processed(experiment))[t, channel][crop])

    def corrected(timepoint: int, applied: np.ndarray) -> np.ndarray:
        volume = np.asarray(raw[timepoint, channel][crop])
        calibrated = calibration.calibrate_channel(volume, channel, y=crop[1], x=crop[2])
        return shift_volume(calibrated, tuple(float(v) for v in applied))

    # compare only where both hold data, not the fill shifted in at the edges
    box = tuple(
        slice(
            max(0, int(np.ceil(max(a, b)))) + 1,
            s.stop - s.start + min(0, int(np.floor(min(a, b)))) - 1,
        )
        for a, b, s in zip(applied_n, applied_t, crop, strict=True)
    )
    if any(sl.stop - sl.start < 4 for sl in box):
        raise InputError(f"{experiment} t={t}: shift too large to check the registration")

    def against(reference: np.ndarray) -> Registration:
        return register_translation(
            reference[box],
            moving[box],
            voxel_size=record.voxel_size,
            config=cfg,
            initial_shift_zyx_px=(0, 0, 0),
        )

    # 1. the stored volume is this timepoint moved by the table's shift (sign, timepoint)
    own = against(corrected(t, applied_t))
    # 2. it lines up with its neighbour towards the reference, corrected the same way
    pair = against(corrected(neighbour_t, applied_n))
    applied_residual = np.asarray(own.shift_zyx_px)
    residual = np.asarray(pair.shift_zyx_px)
    return AssetCheckResult(
        passed=bool(
            np.abs(applied_residual).max() <= MAX_RESIDUAL_PX
            and np.abs(residual).max() <= MAX_NEIGHBOUR_RESIDUAL_PX
        ),
        severity=AssetCheckSeverity.WARN,
        metadata={
            "residual_zyx_px": str(np.round(residual, 3).tolist()),
            "residual_zyx_um": str(np.round(pair.shift_zyx_um(record.voxel_size), 4).tolist()),
            "compared_with_timepoint": neighbour_t,
            "correlation": round(pair.correlation, 4),
            "applied_shift_residual_zyx_px": str(np.round(applied_residual, 3).tolist()),
            "channel": record.channel_names[channel],
        },
    )


PREPROCESS_ASSETS = [camera_calibration, drift_shifts, preprocessed_volume]
PREPROCESS_CHECKS = [
    check_camera_calibration_plausible,
    check_drift_shifts_converged,
    check_preprocessed_volume_registration_residual,
]
