"""Spot detection benchmark: our classical detector (and Mask R-CNN) against Big-FISH.

Same process, same images, same scoring for every method:

* a grid of the synthetic generator's settings modelled on RS-FISH's benchmark
  (32 x 256 x 256 stacks; 30 to 3,000 spots; PSF sigma 1-2 px lateral; SNR 1.5 to 15;
  dense clusters), seeds other than the one the detector's constants were set on (0);
* ``<data>/insta_smfish_2d/synthetic_cells`` (2-D, Gaussian spots of sigma 1.75 px on a
  real cell background) when present.

Scoring: one-to-one Hungarian matching within 3 px (voxel units) -> precision, recall,
F1, mean localization error of matched pairs (px); for 3-D also F1 within 300 nm in
physical space. Speed: megavoxels per second of each method's detection call, and the
ratio to Big-FISH's ``detect_spots`` (automatic threshold) on the same image.

Run (from the repository root)::

    OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python benchmarks/spots.py --seeds 1 2

Timing: the fastest of ``--repeats`` (3) runs per method and image (Mask R-CNN: one run,
on the first seed only unless ``--maskrcnn-seeds`` says otherwise).

Needs the ``bench`` extra (big-fish). ``--methods`` picks a subset.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellrna_pipeline.core.spots import SpotDetectionConfig, detect_spots, match_spots  # noqa: E402
from cellrna_pipeline.core.synth import SynthConfig, synthesize  # noqa: E402
from cellrna_pipeline.core.types import VoxelSize  # noqa: E402

# name -> generator overrides (32 x 256 x 256, voxel 600 x 150 x 150 nm, 12 cells)
GRID: dict[str, dict] = {
    "sparse ~40, SNR 8": {"spots_per_cell": 3.0, "transcription_sites": 1},
    "~300, SNR 1.5": {"snr": 1.5},
    "~300, SNR 3": {"snr": 3.0},
    "~300, SNR 5": {"snr": 5.0},
    "~300, SNR 8": {"snr": 8.0},
    "~300, SNR 15": {"snr": 15.0},
    "dense ~3000, SNR 8": {"spots_per_cell": 380.0},
    "dense ~3000, SNR 3": {"spots_per_cell": 380.0, "snr": 3.0},
    "clusters, SNR 8": {"cluster_probability": 1.0},
    "clusters, SNR 3": {"cluster_probability": 1.0, "snr": 3.0},
    "PSF 2 px, SNR 8": {"psf_sigma_nm": (700.0, 300.0, 300.0)},
    "PSF 2 px, SNR 3": {"psf_sigma_nm": (700.0, 300.0, 300.0), "snr": 3.0},
}
DENSE_OR_LOW = {
    k for k in GRID if "dense" in k or "clusters" in k or "SNR 1.5" in k or "SNR 3" in k
}


@dataclass
class Case:
    name: str
    image: np.ndarray  # (z, y, x) or (y, x)
    true_zyx: np.ndarray  # (n, 3) voxels (z = 0 for 2-D)
    voxel_nm: tuple[float, float, float]
    radius_nm: tuple[float, float, float]


def grid_cases(seeds: list[int], names: list[str] | None) -> list[Case]:
    cases = []
    for name, overrides in GRID.items():
        if names and name not in names:
            continue
        for seed in seeds:
            cfg = SynthConfig(seed=seed, timepoints=1, **overrides)
            acq = synthesize(cfg)
            assert acq.image is not None
            img = acq.image[0, cfg.channel_names.index("rna0")]
            tab = acq.spot_table.filter(acq.spot_table["channel"] == "rna0")
            cases.append(
                Case(
                    f"{name} (seed {seed})",
                    img,
                    tab.select(["z", "y", "x"]).to_numpy(),
                    tuple(v * 1000 for v in cfg.voxel_size_um),  # type: ignore[arg-type]
                    cfg.psf_sigma_nm,
                )
            )
    return cases


def insta_cases(data: Path) -> list[Case]:
    folder = data / "insta_smfish_2d" / "synthetic_cells"
    if not folder.is_dir():
        return []
    from skimage.io import imread

    cases = []
    for csv_path in sorted(folder.glob("*_coord_snr_list.csv")):
        png = folder / csv_path.name.replace("_coord_snr_list.csv", "spot_img.png")
        if not png.exists():
            continue
        img = imread(png)
        img = img[..., 0] if img.ndim == 3 else img  # grey RGBA: channels are equal
        with open(csv_path) as fh:
            rows = list(csv.DictReader(fh))
        true = np.array([[0.0, float(r["row"]), float(r["col"])] for r in rows])
        tag = csv_path.name.split("_spot_sig")[0].replace("MAX_C3-ISP_300_1_", "")
        snr = csv_path.name.split("_snr")[1].split("_")[0]
        # sigma 1.75 px: 100 nm pixels, 175 nm spot sigma (z unused in 2-D)
        cases.append(
            Case(f"INSTA {tag} SNR {snr}", img, true, (100.0, 100.0, 100.0), (175.0, 175.0, 175.0))
        )
    return cases


def run_ours(case: Case) -> np.ndarray:
    vs = VoxelSize.from_nm(case.voxel_nm)
    res = detect_spots(
        case.image, voxel_size=vs, config=SpotDetectionConfig(spot_radius_nm=case.radius_nm)
    )
    return res.table.select(["z", "y", "x"]).to_numpy()


def _bf_args(case: Case) -> tuple[tuple, tuple]:
    if case.image.ndim == 2:
        return case.voxel_nm[1:], case.radius_nm[1:]
    return case.voxel_nm, case.radius_nm


def _to_zyx(spots: np.ndarray, ndim: int) -> np.ndarray:
    spots = np.asarray(spots, dtype=np.float64).reshape(-1, ndim)[:, :ndim]
    if ndim == 2:
        spots = np.concatenate([np.zeros((len(spots), 1)), spots], axis=1)
    return spots


def run_bigfish(case: Case) -> np.ndarray:
    import bigfish.detection as bd

    vox, rad = _bf_args(case)
    spots = bd.detect_spots(case.image, voxel_size=vox, spot_radius=rad)
    return _to_zyx(spots, case.image.ndim)


def run_bigfish_dense(case: Case) -> np.ndarray:
    import bigfish.detection as bd

    vox, rad = _bf_args(case)
    spots = bd.detect_spots(case.image, voxel_size=vox, spot_radius=rad)
    try:
        spots, _, _ = bd.decompose_dense(case.image, spots, voxel_size=vox, spot_radius=rad)
    except Exception as exc:  # big-fish raises when it cannot build a reference spot
        print(f"  big-fish decompose_dense failed on {case.name}: {exc}", file=sys.stderr)
    return _to_zyx(spots, case.image.ndim)


def make_maskrcnn(model_dir: Path) -> Callable[[Case], np.ndarray] | None:
    if not (model_dir / "weights.pt").exists():
        return None
    from cellrna_pipeline.core.spots.maskrcnn import detect_spots_maskrcnn, load_spot_model

    model = load_spot_model(model_dir)

    def run(case: Case) -> np.ndarray:
        vs = VoxelSize.from_nm(case.voxel_nm)
        res = detect_spots_maskrcnn(
            case.image, model=model, voxel_size=vs, spot_radius_nm=case.radius_nm
        )
        return res.table.select(["z", "y", "x"]).to_numpy()

    return run


def score(case: Case, pred: np.ndarray) -> dict[str, float]:
    m = match_spots(pred, case.true_zyx, max_distance=3.0)
    out = m.as_dict()
    if case.image.ndim == 3:
        um = np.asarray(case.voxel_nm) / 1000.0
        out["f1_300nm"] = match_spots(pred, case.true_zyx, max_distance=0.3, scale=um).f1
    else:
        out["f1_300nm"] = float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--settings", nargs="*", help="grid setting names (default: all)")
    p.add_argument("--methods", default="ours,bigfish,bigfish-dense,maskrcnn")
    p.add_argument("--model-dir", type=Path, default=REPO / "model_registry" / "rna-maskrcnn")
    p.add_argument(
        "--maskrcnn-seeds",
        type=int,
        nargs="*",
        help="grid seeds on which the (slow, CPU) Mask R-CNN runs (default: the first seed)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timing: fastest of N runs (Mask R-CNN: 1)"
    )
    p.add_argument("--no-insta", action="store_true")
    p.add_argument("--out", type=Path, help="also write the markdown tables here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    methods: dict[str, Callable[[Case], np.ndarray]] = {}
    wanted = args.methods.split(",")
    if "ours" in wanted:
        methods["ours (LoG)"] = run_ours
    if "maskrcnn" in wanted:
        run = make_maskrcnn(args.model_dir)
        if run is not None:
            methods["ours (Mask R-CNN)"] = run
        else:
            print(f"no Mask R-CNN weights in {args.model_dir}: skipped", file=sys.stderr)
    if "bigfish" in wanted or "bigfish-dense" in wanted:
        try:
            import bigfish.detection  # noqa: F401
        except ImportError:
            print("big-fish is not installed (pip install -e '.[bench]')", file=sys.stderr)
            return 2
        if "bigfish" in wanted:
            methods["Big-FISH"] = run_bigfish
        if "bigfish-dense" in wanted:
            methods["Big-FISH + decompose_dense"] = run_bigfish_dense

    cases = grid_cases(args.seeds, args.settings)
    if not args.no_insta:
        cases += insta_cases(args.data)
    # warm-up (imports, caches) so the first case's timings are not skewed
    for run in methods.values():
        run(cases[0])

    mr_seeds = args.maskrcnn_seeds if args.maskrcnn_seeds is not None else args.seeds[:1]
    rows = []
    for case in cases:
        for method, run in methods.items():
            skip_seed = "(seed" in case.name and (
                int(case.name.split("(seed ")[1].rstrip(")")) not in mr_seeds
            )
            if "Mask R-CNN" in method and skip_seed:
                continue
            # Every method is deterministic; time = the fastest of --repeats runs (the machine
            # is shared: the minimum is the least disturbed measurement, for all methods).
            repeats = 1 if "Mask R-CNN" in method else max(1, args.repeats)
            dt = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                pred = run(case)
                dt = min(dt, time.perf_counter() - t0)
            r = score(case, pred)
            r.update(case=case.name, method=method, seconds=dt, mvox_s=case.image.size / dt / 1e6)
            rows.append(r)
            print(
                f"{case.name:34s} {method:28s} P={r['precision']:.3f} R={r['recall']:.3f} "
                f"F1={r['f1']:.3f} err={r['localization_error']:.2f}px {r['mvox_s']:.1f} Mvox/s",
                flush=True,
            )
    text = report(rows, list(methods))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def _setting(case_name: str) -> str:
    return case_name.split(" (seed")[0]


def _speed_ratios(subset: list[dict], rows: list[dict], method: str) -> list[float]:
    """Big-FISH detect_spots seconds / ``method`` seconds, per image of ``subset``."""
    out = []
    for r in subset:
        if r["method"] != method:
            continue
        ref = [q for q in rows if q["case"] == r["case"] and q["method"] == "Big-FISH"]
        if ref:
            out.append(ref[0]["seconds"] / r["seconds"])
    return out


def report(rows: list[dict], methods: list[str]) -> str:
    settings = list(dict.fromkeys(_setting(r["case"]) for r in rows))
    lines = [
        "| setting | "
        + " | ".join(f"F1 {m}" for m in methods)
        + " | F1 ours - best Big-FISH | speed ours (LoG) / Big-FISH |"
    ]
    lines.append("|---" * (len(methods) + 3) + "|")
    for s in settings:
        f1 = {}
        for m in methods:
            vals = [r["f1"] for r in rows if _setting(r["case"]) == s and r["method"] == m]
            f1[m] = statistics.mean(vals) if vals else float("nan")
        bf = [f1[m] for m in methods if m.startswith("Big-FISH")]
        delta = f1.get("ours (LoG)", float("nan")) - max(bf) if bf else float("nan")
        cells = " | ".join("-" if np.isnan(f1[m]) else f"{f1[m]:.3f}" for m in methods)
        speed = _speed_ratios([r for r in rows if _setting(r["case"]) == s], rows, "ours (LoG)")
        ratio = f"{statistics.median(speed):.2f}x" if speed else "-"
        lines.append(f"| {s} | {cells} | {delta:+.3f} | {ratio} |")
    lines.append("")
    lines.append(
        "| method | mean precision | mean recall | mean F1 | mean loc. error (px) | mean F1 300 nm (3-D) | median Mvox/s | median speed / Big-FISH detect_spots |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        ratios = _speed_ratios(mr, rows, m)
        err = [r["localization_error"] for r in mr if np.isfinite(r["localization_error"])]
        f3 = [r["f1_300nm"] for r in mr if np.isfinite(r["f1_300nm"])]
        lines.append(
            f"| {m} | {statistics.mean(r['precision'] for r in mr):.3f} | {statistics.mean(r['recall'] for r in mr):.3f} | "
            f"{statistics.mean(r['f1'] for r in mr):.3f} | {statistics.mean(err) if err else float('nan'):.2f} | "
            f"{statistics.mean(f3) if f3 else float('nan'):.3f} | {statistics.median(r['mvox_s'] for r in mr):.1f} | "
            f"{statistics.median(ratios) if ratios else float('nan'):.2f}x |"
        )
    grid = [r for r in rows if "(seed" in r["case"]]
    speed3d = _speed_ratios(grid, rows, "ours (LoG)")
    if speed3d:
        lines.append("")
        lines.append(
            f"3-D grid only: median speed ours (LoG) / Big-FISH detect_spots = "
            f"{statistics.median(speed3d):.2f}x over {len(speed3d)} stacks "
            f"(min {min(speed3d):.2f}x, max {max(speed3d):.2f}x)."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
