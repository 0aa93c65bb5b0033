"""Preprocessing: chunked vs in-memory throughput and memory, registration accuracy against
scikit-image's phase cross-correlation, calibration accuracy, a volume larger than the
memory budget, and ingestion of a 2 GiB TIFF.

    OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python benchmarks/preprocess.py \\
        --scratch /tmp/bench_pre --out docs/benchmarks/preprocess.md

Sections (``--sections``, default all):

- ``throughput``: calibrate + normalize + denoise (Gaussian) + register (apply a
  sub-voxel shift) of a 2-channel 64x1024x1024 uint16 volume read from OME-Zarr and
  written back as float32 OME-Zarr, in memory (numpy, whole volume) and chunked (dask,
  2 threads). Each mode runs in its own child process so that its peak RSS is its own;
  the two outputs must be identical.
- ``accuracy``: drift recovery on generator output with known drift (ours vs
  ``skimage.registration.phase_cross_correlation(upsample_factor=20)`` on the same
  calibrated volumes), known shifts of the StarDist 3-D nuclei volumes from ``--data``,
  chromatic shift from bead images, flat-field from images and from the data alone.
- ``large``: a 2-channel volume whose float32 working size is 4x ``--rss-budget-gib``,
  preprocessed chunked in a child process; its peak RSS is reported and a crop of the
  result is compared with the in-memory pipeline run on that crop (plus margin).
- ``ingest``: a 256x2048x2048 uint16 (2 GiB) plain uncompressed TIFF with
  ``--ingest-spots`` spots: raw_volume's block-wise copy on its own, the full
  ``cellrna ingest`` command (Dagster run and checks included) and ``cellrna spots
  detect``, each in a child process with its peak RSS (budget 1.5 GiB). Runnable alone:
  ``--sections ingest`` (needs ~5 GB of scratch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DRIFT = (0.4, 3.3, -2.7)
OFFSET = 100.0
GIB = 2**30


# --------------------------------------------------------------------------- synthetic data


def _block(block_info: Any, seed: int, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """One chunk of a smooth structured volume with noise, reproducible per chunk."""
    info = block_info[None]
    (c0, c1), (z0, z1), (y0, y1), (x0, x1) = info["array-location"]
    rng = np.random.default_rng([seed, c0, z0, y0, x0])
    nz, ny, nx = shape_zyx
    z = np.arange(z0, z1)[:, None, None] / nz
    y = np.arange(y0, y1)[None, :, None] / ny
    x = np.arange(x0, x1)[None, None, :] / nx
    out = np.empty((c1 - c0, z1 - z0, y1 - y0, x1 - x0), np.uint16)
    vignette = 1.0 - 0.3 * ((y - 0.5) ** 2 + (x - 0.5) ** 2) / 0.5
    for i, c in enumerate(range(c0, c1)):
        # blobs of ~10 px: products of cosines, positive, channel-dependent phase
        s = np.cos(2 * np.pi * (13 * y + 1.1 * c)) * np.cos(
            2 * np.pi * (11 * x + 0.7 * c)
        ) + np.cos(2 * np.pi * (3 * z + 0.3 * c)) * np.cos(2 * np.pi * (7 * (x + y)))
        signal = 300.0 * np.maximum(s, 0.0) ** 2 + 100.0
        expected = OFFSET + signal * vignette
        noisy = expected + rng.standard_normal(expected.shape, dtype=np.float32) * np.sqrt(signal)
        out[i] = np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)
    return out


def make_raw(path: Path, shape_czyx: tuple[int, int, int, int], *, seed: int = 0) -> None:
    """Write a (1, c, z, y, x) uint16 OME-Zarr chunk by chunk (bounded memory)."""
    import dask
    import dask.array as da

    from cellrna_pipeline.core.io import auto_chunks_zyx, create_image, write_timepoint
    from cellrna_pipeline.core.types import ImageMeta, VoxelSize

    c, z, y, x = shape_czyx
    chunks = auto_chunks_zyx((z, y, x), 2)
    meta = ImageMeta(
        (1, c, z, y, x), "uint16", VoxelSize(0.6, 0.15, 0.15), tuple(f"c{i}" for i in range(c))
    )
    if path.exists():
        shutil.rmtree(path)
    create_image(path, meta, chunks_zyx=chunks)
    lazy = da.map_blocks(
        _block,
        seed=seed,
        shape_zyx=(z, y, x),
        chunks=(
            (1,) * c,
            *(
                (s,) * (n // s) + ((n % s,) if n % s else ())
                for n, s in zip((z, y, x), chunks, strict=True)
            ),
        ),
        dtype=np.uint16,
        meta=np.empty((0, 0, 0, 0), np.uint16),
    )
    with dask.config.set(scheduler="threads", num_workers=2):
        write_timepoint(path, 0, lazy)


# --------------------------------------------------------------------------- child processes


def _rss_mib() -> float:
    """Peak RSS of this process since its exec (VmHWM). Not ``ru_maxrss``: Linux carries
    the parent's RSS at fork over exec into it, which would count the benchmark's own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> None:
    """One measured run in this (child) process; prints a JSON line."""
    import dask

    from cellrna_pipeline.core.io import (
        auto_chunks_zyx,
        create_image,
        open_image,
        read_image_meta,
        read_timepoint,
        write_timepoint,
    )
    from cellrna_pipeline.core.preprocess import CameraCalibration, preprocess_volume
    from cellrna_pipeline.core.types import ImageMeta

    base_rss = _rss_mib()
    out: dict[str, Any] = {"mode": args.worker}
    start = time.perf_counter()
    if args.worker == "ingest-core":
        from cellrna_pipeline.core.io import open_source
        from cellrna_pipeline.core.types import VoxelSize

        dest = Path(args.output)
        with open_source(args.input, voxel_size=VoxelSize(0.6, 0.15, 0.15)) as src:
            chunks = auto_chunks_zyx(src.meta.shape_zyx, 2)
            create_image(dest, src.meta, chunks_zyx=chunks)
            with dask.config.set(scheduler="threads", num_workers=2):
                write_timepoint(dest, 0, src.timepoint_dask(0, chunk_z=chunks[0]))
        out.update(seconds=time.perf_counter() - start, voxels=int(np.prod(src.meta.shape_tczyx)))
    else:
        raw = Path(args.input)
        meta = read_image_meta(raw)
        _, n_c, n_z, n_y, n_x = meta.shape_tczyx
        calibration = CameraCalibration.identity(meta.channel_names, (n_y, n_x), offset_adu=OFFSET)
        out_meta = ImageMeta(meta.shape_tczyx, "float32", meta.voxel_size, meta.channel_names)
        chunks = auto_chunks_zyx((n_z, n_y, n_x), 4)
        create_image(args.output, out_meta, chunks_zyx=chunks)
        if args.worker == "inmemory":
            volume = read_timepoint(raw, 0)
            t_read = time.perf_counter()
            result = preprocess_volume(
                volume, voxel_size=meta.voxel_size, calibration=calibration, drift_zyx_px=DRIFT
            )
            t_proc = time.perf_counter()
            write_timepoint(args.output, 0, result.data)
            out.update(read_s=t_read - start, process_s=t_proc - t_read)
        else:
            with dask.config.set(scheduler="threads", num_workers=args.threads):
                result = preprocess_volume(
                    open_image(raw)[0],
                    voxel_size=meta.voxel_size,
                    calibration=calibration,
                    drift_zyx_px=DRIFT,
                    chunked=True,
                    chunks_zyx=chunks,
                )
                write_timepoint(args.output, 0, result.data)
        out.update(
            seconds=time.perf_counter() - start,
            voxels=n_c * n_z * n_y * n_x,
            percentile_values=np.asarray(result.percentile_values).tolist(),
            chunks_zyx=list(chunks),
        )
    out.update(peak_rss_mib=_rss_mib(), import_rss_mib=base_rss)
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(mode: str, src: Path, dst: Path, threads: int = 2) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--input",
        str(src),
        "--output",
        str(dst),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


_LAUNCH = """
import atexit, runpy, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KIB " + line.split()[1] + "\\n")
atexit.register(_peak)
sys.argv = ["cellrna", *sys.argv[1:]]
runpy.run_module("cellrna_pipeline.cli", run_name="__main__")
"""


def _vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run_cli(args: list[str], *, rss_limit_mib: float | None = None) -> dict[str, Any]:
    """``cellrna ARGS`` in a child process: seconds, peak RSS (VmHWM), exit code.

    With ``rss_limit_mib`` the child is polled every second and killed once its peak RSS
    passes the limit (``stopped_at_mib`` then holds the peak seen), so that a command that
    does not fit does not take the machine's memory.
    """
    start = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        stopped = None
        while rss_limit_mib is not None and proc.poll() is None:
            peak = _vm_hwm_mib(proc.pid)
            if peak > rss_limit_mib:
                stopped = peak
                proc.kill()
                break
            time.sleep(1.0)
        _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    peaks = [int(ln.split()[1]) for ln in stderr.splitlines() if ln.startswith("PEAK_RSS_KIB")]
    tail = [ln for ln in stderr.splitlines() if not ln.startswith("PEAK_RSS_KIB")][-3:]
    return {
        "seconds": seconds,
        "peak_rss_mib": peaks[-1] / 1024.0 if peaks else (stopped or float("nan")),
        "stopped_at_mib": stopped,
        "rc": proc.returncode,
        "stderr_tail": tail if proc.returncode else [],
    }


def _compare_zarr(a: Path, b: Path) -> float:
    """Largest absolute difference of two images, read one channel and z-slab at a time."""
    from cellrna_pipeline.core.io import open_image

    la, lb = open_image(a)[0], open_image(b)[0]
    worst = 0.0
    step = max(1, la.chunks[1][0])
    for c in range(la.shape[0]):
        for z in range(0, la.shape[1], step):
            da_, db_ = np.asarray(la[c, z : z + step]), np.asarray(lb[c, z : z + step])
            worst = max(worst, float(np.abs(da_ - db_).max()))
    return worst


# --------------------------------------------------------------------------- sections


def section_throughput(scratch: Path, shape: tuple[int, int, int], lines: list[str]) -> None:
    raw = scratch / "throughput_raw.ome.zarr"
    t0 = time.perf_counter()
    make_raw(raw, (2, *shape))
    print(f"made {raw} in {time.perf_counter() - t0:.1f} s", flush=True)
    mem = run_worker("inmemory", raw, scratch / "throughput_inmemory.ome.zarr")
    print("in memory", mem, flush=True)
    chk = run_worker("chunked", raw, scratch / "throughput_chunked.ome.zarr")
    print("chunked", chk, flush=True)
    diff = _compare_zarr(
        scratch / "throughput_inmemory.ome.zarr", scratch / "throughput_chunked.ome.zarr"
    )
    mvox = 1e-6 * mem["voxels"]
    size_gib = mem["voxels"] * 4 / GIB
    lines += [
        f"### Throughput: 2 x {shape[0]} x {shape[1]} x {shape[2]} uint16 -> float32 "
        f"({mvox:.0f} Mvoxels, {size_gib:.2f} GiB as float32)",
        "",
        "calibrate + normalize + Gaussian denoise + sub-voxel shift, read from and written to "
        "OME-Zarr (with pyramid); each mode in its own process.",
        "",
        "| mode | seconds | Mvoxel/s | peak RSS (MiB) | RSS after imports (MiB) |",
        "|---|---|---|---|---|",
        f"| in memory (numpy, whole volume) | {mem['seconds']:.1f} | {mvox / mem['seconds']:.1f} | "
        f"{mem['peak_rss_mib']:.0f} | {mem['import_rss_mib']:.0f} |",
        f"| chunked (dask, 2 threads, chunks {tuple(chk['chunks_zyx'])}) | {chk['seconds']:.1f} | "
        f"{mvox / chk['seconds']:.1f} | {chk['peak_rss_mib']:.0f} | {chk['import_rss_mib']:.0f} |",
        "",
        f"Ratios chunked / in memory: time {chk['seconds'] / mem['seconds']:.2f}x, peak RSS "
        f"{chk['peak_rss_mib'] / mem['peak_rss_mib']:.2f}x. Largest difference between the two "
        f"outputs: {diff:g} (identical).",
        "",
    ]


def _registration_errors(
    config_kw: dict, seeds: list[int], timepoints: int
) -> dict[str, np.ndarray]:
    from skimage.registration import phase_cross_correlation

    from cellrna_pipeline.core.preprocess import register_translation
    from cellrna_pipeline.core.synth import SynthConfig, synthesize

    ours, peer, t_ours, t_peer = [], [], 0.0, 0.0
    for seed in seeds:
        acq = synthesize(
            SynthConfig(seed=seed, timepoints=timepoints, calibration_images=False, **config_kw)
        )
        assert acq.image is not None and acq.flat_field_yx is not None
        flat = acq.flat_field_yx.astype(np.float32)
        vols = [
            (acq.image[t, 0].astype(np.float32) - acq.config.camera_offset_adu) / flat
            for t in range(timepoints)
        ]
        truth = acq.drift_zyx_px - acq.drift_zyx_px[0]
        for t in range(1, timepoints):
            s = time.perf_counter()
            reg = register_translation(vols[0], vols[t], voxel_size=acq.voxel_size)
            t_ours += time.perf_counter() - s
            s = time.perf_counter()
            shift, _, _ = phase_cross_correlation(vols[0], vols[t], upsample_factor=20)
            t_peer += time.perf_counter() - s
            ours.append(np.asarray(reg.shift_zyx_px) - truth[t])
            peer.append(-np.asarray(shift) - truth[t])
    n = len(ours)
    return {"ours": np.abs(ours), "peer": np.abs(peer), "t_ours": t_ours / n, "t_peer": t_peer / n}


def _moving_cells_rows(seeds: list[int]) -> list[str]:
    """Default generator (cells moving ~1 um/frame on their own, divisions): whole-series
    drift, ours (chained, re-anchored) vs registering every frame to frame 0."""
    from skimage.registration import phase_cross_correlation

    from cellrna_pipeline.core.preprocess import RegistrationConfig, estimate_drift
    from cellrna_pipeline.core.synth import SynthConfig, synthesize

    errs: dict[str, list[float]] = {"chain": [], "reference": [], "peer": []}
    for seed in seeds:
        acq = synthesize(SynthConfig(seed=seed, calibration_images=False))
        assert acq.image is not None and acq.flat_field_yx is not None
        flat = acq.flat_field_yx.astype(np.float32)
        vols = [(acq.image[t, 0].astype(np.float32) - 100.0) / flat for t in range(8)]
        truth = acq.drift_zyx_px - acq.drift_zyx_px[0]
        for strategy in ("chain", "reference"):
            table = estimate_drift(
                vols.__getitem__,
                range(8),
                voxel_size=acq.voxel_size,
                config=RegistrationConfig(strategy=strategy),  # type: ignore[arg-type]
            )
            est = table.select("dz_px", "dy_px", "dx_px").to_numpy()
            errs[strategy].append(float(np.abs(est - truth)[:, 1:].max()))
        peer = [np.zeros(3)] + [
            -np.asarray(phase_cross_correlation(vols[0], vols[t], upsample_factor=20)[0])
            for t in range(1, 8)
        ]
        errs["peer"].append(float(np.abs(np.array(peer) - truth)[:, 1:].max()))
    fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    return [
        "With cells that move on their own (generator defaults: 1 um/frame random walk per "
        "cell, divisions; 8 frames of 32x256x256), the field's translation is not the stage "
        "drift alone (the cells' mean motion adds to it), so no estimate can match the "
        "drift closely; what matters is that none goes wild. Largest lateral error over the "
        f"series (px), seeds {seeds}:",
        "",
        "| method | largest error per seed |",
        "|---|---|",
        f"| ours, `estimate_drift` (chain + re-anchoring, default) | {fmt(errs['chain'])} |",
        f'| ours, every frame straight to frame 0 (`strategy="reference"`) | {fmt(errs["reference"])} |',
        f"| peer, phase correlation of every frame to frame 0 | {fmt(errs['peer'])} |",
        "",
    ]


def _err_row(name: str, r: dict) -> str:
    o, p = r["ours"], r["peer"]
    fmt = lambda a: ", ".join(f"{v:.3f}" for v in a)  # noqa: E731
    return (
        f"| {name} | {len(o)} | {fmt(o.mean(0))} | {fmt(o.max(0))} | {fmt(p.mean(0))} | "
        f"{fmt(p.max(0))} | {p.mean() / max(o.mean(), 1e-9):.1f}x | {r['t_ours']:.2f} / {r['t_peer']:.2f} |"
    )


def section_accuracy(data: Path, lines: list[str]) -> None:
    from scipy import ndimage as ndi
    from skimage.registration import phase_cross_correlation

    from cellrna_pipeline.core.preprocess import estimate_camera_calibration, register_translation
    from cellrna_pipeline.core.synth import SynthConfig, synthesize
    from cellrna_pipeline.core.types import VoxelSize

    static = {"motion_um_per_frame": 0.0, "division_probability": 0.0}
    rows = [
        (
            "generator, static cells, texture_contrast=0",
            _registration_errors({**static, "texture_contrast": 0.0}, [0, 1, 2, 3], 6),
        ),
        (
            "generator, static cells, default texture (redrawn every frame)",
            _registration_errors(static, [0, 1, 2, 3], 6),
        ),
    ]
    # StarDist's synthetic 3-D nuclei with known sub-voxel shifts (content enters at the border)
    images = sorted((data / "stardist_demo3D_synthetic" / "images").glob("*.tif"))
    if images:
        import tifffile

        rng = np.random.default_rng(0)
        ours, peer, t_o, t_p = [], [], 0.0, 0.0
        for path in images:
            vol = tifffile.imread(path).astype(np.float32)
            for _ in range(4):
                shift = rng.uniform([-2, -6, -6], [2, 6, 6])
                moved = np.fft.ifftn(ndi.fourier_shift(np.fft.fftn(vol), shift)).real
                crop = (slice(6, -6), slice(12, -12), slice(12, -12))
                ref = rng.poisson(np.maximum(vol[crop], 0) + 5).astype(np.float32)
                mov = rng.poisson(np.maximum(moved[crop], 0) + 5).astype(np.float32)
                s = time.perf_counter()
                reg = register_translation(ref, mov, voxel_size=VoxelSize(0.5, 0.5, 0.5))
                t_o += time.perf_counter() - s
                s = time.perf_counter()
                sh, _, _ = phase_cross_correlation(ref, mov, upsample_factor=20)
                t_p += time.perf_counter() - s
                ours.append(np.asarray(reg.shift_zyx_px) - shift)
                peer.append(-np.asarray(sh) - shift)
        n = len(ours)
        rows.append(
            (
                f"StarDist 3-D nuclei ({len(images)} volumes x 4 shifts, Poisson noise)",
                {"ours": np.abs(ours), "peer": np.abs(peer), "t_ours": t_o / n, "t_peer": t_p / n},
            )
        )
    lines += [
        "### Registration accuracy (drift)",
        "",
        "Error = |estimated - true shift| in voxels (z, y, x). Peer: "
        "`skimage.registration.phase_cross_correlation(ref, mov, upsample_factor=20)` on the "
        "same calibrated volumes. Ours: `register_translation` (cross-correlation of smoothed volumes, then "
        "Gauss-Newton refinement on the overlap).",
        "",
        "| data | pairs | ours mean | ours max | peer mean | peer max | peer/ours mean error | s per pair (ours / peer) |",
        "|---|---|---|---|---|---|---|---|",
        *(_err_row(name, r) for name, r in rows),
        "",
        *_moving_cells_rows([0, 1, 2]),
    ]
    # calibration
    shifts_nm = ((0.0, 0.0, 0.0), (150.0, 60.0, -45.0), (-200.0, 90.0, 30.0))
    cal_rows = []
    for seed in (0, 1, 2):
        acq = synthesize(SynthConfig(seed=seed, timepoints=3, channel_shift_zyx_nm=shifts_nm))
        assert acq.image is not None and acq.flat_field_yx is not None
        from_images = estimate_camera_calibration(
            channel_names=acq.channel_names,
            shape_yx=(256, 256),
            voxel_size=acq.voxel_size,
            dark_frames=acq.calibration_dark,
            flat_images=acq.calibration_flat,
            beads_czyx=acq.calibration_beads,
        )
        planes = [acq.image[:, c].reshape(-1, 256, 256) for c in range(3)]
        from_data = estimate_camera_calibration(
            channel_names=acq.channel_names,
            shape_yx=(256, 256),
            voxel_size=acq.voxel_size,
            sample_planes=planes,
            data_czyx=acq.image[0],
        )
        truth = acq.flat_field_yx
        cal_rows.append(
            (
                float(np.abs(from_images.flat_cyx / truth - 1).max()),
                float(np.abs(from_data.flat_cyx / truth - 1).max()),
                float(np.abs(from_images.channel_shifts_zyx_px - acq.channel_shifts_zyx_px).max()),
                float(from_data.details["estimated_offset_adu"]),
            )
        )
    arr = np.array(cal_rows)
    lines += [
        "### Camera calibration (generator: vignetting depth 0.3, offset 100 counts, chromatic shifts up to 0.6 px)",
        "",
        "| quantity | 3 seeds |",
        "|---|---|",
        f"| flat-field from flat images: max relative error | {', '.join(f'{v:.4f}' for v in arr[:, 0])} |",
        f"| flat-field from the data alone (BaSiC-style): max relative error | {', '.join(f'{v:.4f}' for v in arr[:, 1])} |",
        f"| chromatic shift from beads: max residual (px) | {', '.join(f'{v:.3f}' for v in arr[:, 2])} |",
        f"| camera offset from the data (truth 100) | {', '.join(f'{v:.1f}' for v in arr[:, 3])} |",
        "",
    ]


def section_large(
    scratch: Path, shape: tuple[int, int, int], budget_gib: float, lines: list[str]
) -> None:
    from cellrna_pipeline.core.io import open_image, read_image_meta
    from cellrna_pipeline.core.preprocess import (
        CameraCalibration,
        gaussian_depth,
        gaussian_sigma_vox,
        preprocess_volume,
    )
    from cellrna_pipeline.core.preprocess.config import PreprocessConfig

    raw = scratch / "large_raw.ome.zarr"
    out = scratch / "large_out.ome.zarr"
    t0 = time.perf_counter()
    make_raw(raw, (2, *shape), seed=1)
    print(f"made {raw} in {time.perf_counter() - t0:.1f} s", flush=True)
    res = run_worker("chunked", raw, out)
    print("large chunked", res, flush=True)
    working_gib = res["voxels"] * 4 / GIB
    # the same pipeline in memory on a crop with a margin, with the run's percentiles
    meta = read_image_meta(raw)
    sigma = gaussian_sigma_vox(PreprocessConfig().gaussian_sigma_nm, meta.voxel_size)
    margin = [
        int(np.ceil(abs(d))) + g + 2 for d, g in zip(DRIFT, gaussian_depth(sigma), strict=True)
    ]
    y0, x0, size = shape[1] // 2 - 128, shape[2] // 2 - 128, 256
    region = (
        slice(None),
        slice(None),
        slice(y0 - margin[1], y0 + size + margin[1]),
        slice(x0 - margin[2], x0 + size + margin[2]),
    )
    crop_raw = np.asarray(open_image(raw)[0][region])
    calibration = CameraCalibration.identity(
        meta.channel_names, crop_raw.shape[2:], offset_adu=OFFSET
    )
    local = preprocess_volume(
        crop_raw,
        voxel_size=meta.voxel_size,
        calibration=calibration,
        drift_zyx_px=DRIFT,
        percentile_values=np.asarray(res["percentile_values"]),
    ).data
    # z: the whole depth is in the crop, so the volume's own z edges apply to both
    inner = local[:, :, margin[1] : margin[1] + size, margin[2] : margin[2] + size]
    stored = np.asarray(open_image(out)[0][:, :, y0 : y0 + size, x0 : x0 + size])
    diff = float(np.abs(inner - stored).max())
    lines += [
        f"### A volume 4x the memory budget: 2 x {shape[0]} x {shape[1]} x {shape[2]}",
        "",
        f"Raw uint16 {res['voxels'] * 2 / GIB:.2f} GiB; float32 working size {working_gib:.2f} GiB "
        f"= {working_gib / budget_gib:.1f}x the {budget_gib:g} GiB budget. Chunked run (2 threads, "
        f"chunks {tuple(res['chunks_zyx'])}) in a child process:",
        "",
        "| seconds | Mvoxel/s | peak RSS (MiB) | RSS after imports (MiB) | within budget |",
        "|---|---|---|---|---|",
        f"| {res['seconds']:.1f} | {1e-6 * res['voxels'] / res['seconds']:.1f} | {res['peak_rss_mib']:.0f} | "
        f"{res['import_rss_mib']:.0f} | {'yes' if res['peak_rss_mib'] <= budget_gib * 1024 else 'NO'} |",
        "",
        f"Crop check: the in-memory pipeline on a {size}x{size} crop (full depth, margin "
        f"{margin[1:]} px, same percentiles) vs the same region of the chunked result: largest "
        f"difference {diff:g}.",
        "",
    ]


def _write_big_tiff(path: Path, shape: tuple[int, int, int], n_spots: int, seed: int = 0) -> None:
    """A plain uncompressed uint16 TIFF, written plane by plane: Poisson background of
    100 counts, a smooth cell-like modulation and ``n_spots`` diffraction-limited spots
    (Gaussian, sigma 0.6 x 1.0 x 1.0 voxels at 600 x 150 x 150 nm, peak ~300 counts)."""
    import tifffile

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    centres = rng.uniform((0, 0, 0), (nz, ny, nx), size=(n_spots, 3))
    peaks = rng.uniform(200, 400, n_spots)
    order = np.argsort(centres[:, 0])
    centres, peaks = centres[order], peaks[order]
    yy, xx = np.mgrid[-3:4, -3:4]
    yy_g, xx_g = np.ogrid[:ny, :nx]
    cells = 60.0 * (np.cos(2 * np.pi * yy_g / 97.0) * np.cos(2 * np.pi * xx_g / 89.0)) ** 2

    def pages():
        for z in range(nz):
            lo = np.searchsorted(centres[:, 0], z - 2.5)
            hi = np.searchsorted(centres[:, 0], z + 2.5)
            plane = (100.0 + cells).astype(np.float32)
            if hi > lo:
                c, a = centres[lo:hi], peaks[lo:hi]
                iy, ix = np.rint(c[:, 1]).astype(int), np.rint(c[:, 2]).astype(int)
                w = a * np.exp(-0.5 * ((z - c[:, 0]) / 0.6) ** 2)
                gy = yy[None] + iy[:, None, None]
                gx = xx[None] + ix[:, None, None]
                val = w[:, None, None] * np.exp(
                    -0.5 * ((gy - c[:, 1, None, None]) ** 2 + (gx - c[:, 2, None, None]) ** 2)
                )
                ok = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
                np.add.at(plane, (gy[ok], gx[ok]), val[ok].astype(np.float32))
            yield np.clip(rng.poisson(plane), 0, 65535).astype(np.uint16)

    tifffile.imwrite(path, pages(), shape=shape, dtype=np.uint16)


def section_ingest(
    scratch: Path,
    shape: tuple[int, int, int],
    n_spots: int,
    lines: list[str],
    rss_stop_mib: float = 4096.0,
) -> None:
    tif = scratch / "big_stack.tif"
    if not tif.exists() or tif.stat().st_size < np.prod(shape) * 2:
        t0 = time.perf_counter()
        _write_big_tiff(tif, shape, n_spots)
        print(
            f"wrote {tif} ({tif.stat().st_size / GIB:.2f} GiB) in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    core = run_worker("ingest-core", tif, scratch / "ingest_core.ome.zarr")
    print("ingest core", core, flush=True)
    shutil.rmtree(scratch / "ingest_core.ome.zarr", ignore_errors=True)
    home = scratch / "ingest_home"
    shutil.rmtree(home, ignore_errors=True)
    voxel = ["--voxel-size-nm", "600", "150", "150"]
    cli = run_cli(["ingest", str(tif), "--experiment", "big", *voxel, "--home", str(home)])
    print("cellrna ingest", cli, flush=True)
    shutil.rmtree(home, ignore_errors=True)
    spots_csv = scratch / "big_spots.csv"
    det = run_cli(
        ["spots", "detect", str(tif), *voxel, "--out", str(spots_csv)], rss_limit_mib=rss_stop_mib
    )
    n_found = sum(1 for _ in spots_csv.open()) - 1 if spots_csv.exists() else 0
    print("cellrna spots detect", det, n_found, flush=True)
    size = tif.stat().st_size / GIB
    budget = 1536

    def row(what: str, r: dict) -> str:
        ok = "yes" if r["peak_rss_mib"] <= budget else "NO"
        if r.get("stopped_at_mib"):
            return (
                f"| {what} | stopped after {r['seconds']:.0f} | > {r['stopped_at_mib']:.0f} | NO |"
            )
        return f"| {what} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {ok} |"

    lines += [
        f"### Ingesting and detecting spots in a {shape[0]}x{shape[1]}x{shape[2]} uint16 plain "
        f"TIFF ({size:.2f} GiB, uncompressed, {n_spots} spots)",
        "",
        "Each command in its own child process; peak RSS = its `VmHWM`.",
        "",
        "| what | seconds | peak RSS (MiB) | <= 1.5 GiB |",
        "|---|---|---|---|",
        row(
            "raw_volume's block-wise copy alone (`open_source(...).timepoint_dask` -> "
            "`write_timepoint`)",
            core,
        ),
        row(
            f"`cellrna ingest STACK.tif --experiment big --voxel-size-nm 600 150 150` "
            f"(exit {cli['rc']}; run + checks)",
            cli,
        ),
        row(
            f"`cellrna spots detect STACK.tif --voxel-size-nm 600 150 150 --out spots.csv` "
            f"(exit {det['rc']}; {n_found} spots found)",
            det,
        ),
        "",
    ]
    if det.get("stopped_at_mib"):
        lines += [
            f"`cellrna spots detect` was stopped once its peak RSS passed {rss_stop_mib:.0f} MiB "
            "(last progress: " + " / ".join(det["stderr_tail"]) + ").",
            "",
        ]
    for name, r in (("ingest", cli), ("spots detect", det)):
        if r["rc"] != 0 and not r.get("stopped_at_mib"):
            lines += [f"`cellrna {name}` failed: " + " / ".join(r["stderr_tail"]), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared reference data")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/cellrna_bench_preprocess"))
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--sections", default="throughput,accuracy,large,ingest")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 1024, 1024))
    parser.add_argument("--large-shape", type=int, nargs=3, default=(192, 2048, 2048))
    parser.add_argument("--rss-budget-gib", type=float, default=1.5)
    parser.add_argument("--ingest-shape", type=int, nargs=3, default=(256, 2048, 2048))
    parser.add_argument(
        "--ingest-spots", type=int, default=100_000, help="spots drawn into the ingest TIFF"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.scratch.mkdir(parents=True, exist_ok=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    lines = [
        "## Preprocessing",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python benchmarks/preprocess.py {' '.join(sys.argv[1:])}`",
        f"Machine: {os.cpu_count()} cores, shared with other jobs; timings are wall-clock.",
        "",
    ]
    try:
        if "throughput" in sections:
            section_throughput(args.scratch, tuple(args.shape), lines)
        if "accuracy" in sections:
            section_accuracy(args.data, lines)
        if "large" in sections:
            section_large(args.scratch, tuple(args.large_shape), args.rss_budget_gib, lines)
        if "ingest" in sections:
            section_ingest(args.scratch, tuple(args.ingest_shape), args.ingest_spots, lines)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
