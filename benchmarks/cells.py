"""Cell segmentation benchmark: Mask R-CNN (+ semantic head) vs the classical baseline.

Both methods run in the same process on the same inputs. Scores (see
``cellrna_pipeline.core.segmentation.metrics``): instance AP at IoU 0.5 and mean AP over IoU
0.5:0.95 (TP / (TP + FP + FN) after one-to-one matching, as in the DSB 2018 / StarDist /
Cellpose papers; 3D objects for volumes), semantic IoU per class and global accuracy,
seconds per volume.

Datasets:
- ``synth``: the generator's default settings (the demo's data), unseen seeds, both stains,
  voxel size given.
- ``synth-random``: the randomized generator settings used for training, unseen seeds.
- ``synth-nuclei``: the dense-nuclei generator (nucleus stain only, touching nuclei packed
  in 3D) with the randomized settings used for training, unseen seeds, no voxel size.
- ``stardist3d``: ``<data>/stardist_demo3D_synthetic`` (3 volumes 64x128x128, nuclei only,
  no voxel size: the object size is estimated, as by ``cellrna cells segment``).
- ``ctc-msc``: ``<data>/ctc_Fluo-C2DL-MSC_segframes`` (5 real 2D frames, whole-cell GFP
  only, cells of ~100-300 px).

Usage::

    OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python benchmarks/cells.py [--data ../shared/data]
        [--model model_registry/cell-maskrcnn] [--synthetic 3] [--datasets synth,stardist3d]
        [--json out.json] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellrna_pipeline.core.segmentation import CellSegmentationConfig, segment_cells  # noqa: E402
from cellrna_pipeline.core.segmentation.evaluate import (  # noqa: E402
    EvalVolume,
    dense_nuclei_volumes,
    score_volumes,
    synthetic_volumes,
)
from cellrna_pipeline.core.segmentation.train import write_model_card  # noqa: E402

ALL = ("synth", "synth-random", "synth-nuclei", "stardist3d", "ctc-msc")
DEFAULT = ("synth", "synth-random", "synth-nuclei", "stardist3d")
UNSEEN_SEED = (
    8000  # never used in training (seeds 0-47, 500 000+) nor while developing (7000-7001, 9100)
)


def stardist_volumes(data: Path) -> list[EvalVolume]:
    import tifffile

    root = data / "stardist_demo3D_synthetic"
    out = []
    for img in sorted((root / "images").glob("*.tif")):
        masks = tifffile.imread(root / "masks" / img.name).astype(np.uint32)
        out.append(EvalVolume(f"stardist {img.stem}", tifffile.imread(img), None, masks, masks))
    return out


def ctc_msc_frames(data: Path) -> list[EvalVolume]:
    import tifffile

    root = data / "ctc_Fluo-C2DL-MSC_segframes"
    out = []
    for seg in sorted((root / "01_GT" / "SEG").glob("man_seg*.tif")):
        frame = seg.stem.replace("man_seg", "")
        image = tifffile.imread(root / "01" / f"t{frame}.tif")
        masks = tifffile.imread(seg).astype(np.uint32)[None]
        out.append(EvalVolume(f"ctc-msc t{frame}", None, image[None], masks, np.zeros_like(masks)))
    return out


def run_method(
    volumes, method, model, *, semantic: bool, diameter_px: float | None = None
) -> tuple[dict[str, float], list[float]]:
    config = CellSegmentationConfig(method=method, diameter_px=diameter_px)
    segs, seconds = [], []
    for v in volumes:
        t0 = time.perf_counter()
        segs.append(
            segment_cells(
                v.nucleus, v.cytoplasm, voxel_size=v.voxel_size, config=config, model=model
            )
        )
        seconds.append(time.perf_counter() - t0)
    scores = score_volumes(volumes, segs)
    if not semantic:
        scores = {
            k: v for k, v in scores.items() if not k.startswith(("iou", "accuracy", "nuclei"))
        }
    return scores, seconds


def record_in_model_folder(folder: Path, results: dict[str, dict[str, object]], command: str):
    """Write the Mask R-CNN scores of ``results`` into ``folder/metrics.json``: one
    ``benchmark_<dataset>`` entry per dataset run (replacing an earlier one) and its command
    in ``benchmark_commands``; other entries are kept. The model card is written again
    from the folder's records."""
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.pop("benchmark_command", None)  # the single command of earlier records
    commands = metrics.pop("benchmark_commands", {})
    for name, row in results.items():
        metrics[f"benchmark_{name.replace('-', '_')}"] = row["maskrcnn"]
        commands[name] = command
    metrics["benchmark_commands"] = commands
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"), help="reference data folder"
    )
    parser.add_argument(
        "--model", default=str(REPO / "model_registry" / "cell-maskrcnn"), help="model folder"
    )
    parser.add_argument("--synthetic", type=int, default=3, help="volumes per synthetic dataset")
    parser.add_argument(
        "--nuclei-volumes", type=int, default=6, help="volumes of the synth-nuclei dataset"
    )
    parser.add_argument(
        "--datasets", default=",".join(DEFAULT), help=f"comma-separated subset of {ALL}"
    )
    parser.add_argument(
        "--ctc-diameter-px",
        type=float,
        default=None,
        help="cell diameter hint for ctc-msc (its whole-cell stain defeats the size estimate); "
        "default: the median equivalent diameter of the ground-truth cells (an oracle scale, "
        "given to both methods)",
    )
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument(
        "--record",
        action="store_true",
        help="also record the Mask R-CNN scores in the model folder's metrics.json "
        "(benchmark_<dataset> entries and their command; other entries kept)",
    )
    args = parser.parse_args(argv)

    from cellrna_pipeline.core.device import select_device
    from cellrna_pipeline.core.segmentation.model import load_model_folder

    model = load_model_folder(args.model)
    data = Path(args.data)
    wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
    results: dict[str, dict[str, object]] = {}
    for name in wanted:
        if name == "synth":
            volumes, semantic = synthetic_volumes(args.synthetic, seed=UNSEEN_SEED), True
        elif name == "synth-random":
            volumes, semantic = (
                synthetic_volumes(args.synthetic, seed=UNSEEN_SEED, randomized=True),
                True,
            )
        elif name == "synth-nuclei":
            volumes, semantic = dense_nuclei_volumes(args.nuclei_volumes, seed=UNSEEN_SEED), False
        elif name == "stardist3d":
            if not (data / "stardist_demo3D_synthetic").exists():
                print(f"skip {name}: {data} has no stardist_demo3D_synthetic", file=sys.stderr)
                continue
            volumes, semantic = stardist_volumes(data), False
        elif name == "ctc-msc":
            if not (data / "ctc_Fluo-C2DL-MSC_segframes").exists():
                print(f"skip {name}: {data} has no ctc_Fluo-C2DL-MSC_segframes", file=sys.stderr)
                continue
            volumes, semantic = ctc_msc_frames(data), False
            if args.ctc_diameter_px is None:
                from skimage.measure import regionprops

                sizes = [
                    r.equivalent_diameter_area for v in volumes for r in regionprops(v.cells[0])
                ]
                args.ctc_diameter_px = float(round(np.median(sizes)))
        else:
            parser.error(f"unknown dataset {name!r}")
        row: dict[str, object] = {"volumes": len(volumes), "shape": list(volumes[0].cells.shape)}
        if name == "ctc-msc":
            row["diameter_hint_px"] = args.ctc_diameter_px
        for method in ("maskrcnn", "classical"):
            hint = args.ctc_diameter_px if name == "ctc-msc" else None
            scores, seconds = run_method(
                volumes,
                method,
                model if method == "maskrcnn" else None,
                semantic=semantic,
                diameter_px=hint,
            )
            row[method] = {
                **{k: round(v, 4) for k, v in scores.items()},
                "seconds_per_volume": round(float(np.mean(seconds)), 2),
            }
            print(
                f"{name:13s} {method:9s} "
                + " ".join(f"{k}={v:.3f}" for k, v in scores.items())
                + f" s/vol={np.mean(seconds):.2f}",
                flush=True,
            )
        m, c = row["maskrcnn"], row["classical"]
        assert isinstance(m, dict) and isinstance(c, dict)
        row["ratio_ap50_maskrcnn_over_classical"] = round(
            m["cells_ap50"] / max(c["cells_ap50"], 1e-9), 3
        )
        row["ratio_seconds_maskrcnn_over_classical"] = round(
            m["seconds_per_volume"] / max(c["seconds_per_volume"], 1e-9), 3
        )
        results[name] = row
    summary = {
        "model": str(args.model),
        "device": str(select_device()),
        "datasets": results,
        "command": "python benchmarks/cells.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.record:
        record_in_model_folder(Path(args.model), results, str(summary["command"]))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
