"""Calibration of the cell segmenter's contrast filter (``InferenceConfig.min_contrast``).

A 2D model sees out-of-focus light and background texture as dim nuclei; the filter drops
3D objects whose mean normalized stain is less than ``min_contrast`` above the background
around them (``inference.object_contrast``). The threshold is chosen here on the
generator's **development** volumes only (seeds never used in training nor in the
benchmark: dense nuclei 7 700 000+, default and randomized cell volumes 7000+):

* the AP@0.5 of each development set for a range of thresholds (segmentation once with
  the filter off, the thresholds applied afterwards: the same objects as a run with
  the filter on);
* the 1st and 5th percentiles of the contrast of the true objects found (IoU >= 0.5).

``--diagnostic-data DIR`` adds the same sweep on StarDist demo3D, printed as a diagnostic
only: it is an evaluation set and must not be used to pick the threshold.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cells_contrast.py
        [--model model_registry/cell-maskrcnn] [--diagnostic-data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellrna_pipeline.core.segmentation import (  # noqa: E402
    CellSegmentationConfig,
    instance_scores,
    segment_cells,
)
from cellrna_pipeline.core.segmentation.base import normalize_percentile  # noqa: E402
from cellrna_pipeline.core.segmentation.evaluate import (  # noqa: E402
    EvalVolume,
    dense_nuclei_volumes,
    synthetic_volumes,
)
from cellrna_pipeline.core.segmentation.inference import (  # noqa: E402
    InferenceConfig,
    object_contrast,
)
from cellrna_pipeline.core.segmentation.metrics import iou_matrix  # noqa: E402

THRESHOLDS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15)


def contrasts(volumes: list[EvalVolume], model) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per volume: true ids, predicted ids (filter off) and each prediction's contrast."""
    config = CellSegmentationConfig(inference=InferenceConfig(min_contrast=0.0))
    radius = InferenceConfig().contrast_radius_fraction
    out = []
    for v in volumes:
        seg = segment_cells(
            v.nucleus, v.cytoplasm, voxel_size=v.voxel_size, config=config, model=model
        )
        stain = v.cytoplasm if v.cytoplasm is not None else v.nucleus
        c = object_contrast(
            seg.cells,
            normalize_percentile(stain),
            radius_px=radius * float(seg.info["diameter_px"]),
            anisotropy=float(seg.info["anisotropy"]),
        )
        out.append((v.cells, seg.cells, c))
        print(f"  {v.name}: {int(seg.cells.max())} objects", file=sys.stderr, flush=True)
    return out


def sweep(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[float, float]:
    """AP@0.5 (pooled) with the objects under each threshold removed."""
    ap = {}
    for t in THRESHOLDS:
        preds = [np.where(np.isin(p, np.flatnonzero(c < t)), 0, p) for _, p, c in rows]
        ap[t] = instance_scores([g for g, _, _ in rows], preds).ap50
    return ap


def true_object_contrast(rows) -> np.ndarray:
    """Contrast of the predictions that match a true object at IoU >= 0.5."""
    out = []
    for g, p, c in rows:
        iou, _, pid = iou_matrix(g, p)
        if iou.size:
            out.append(c[pid[(iou >= 0.5).any(axis=0)]])
    return np.concatenate(out) if out else np.zeros(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=REPO / "model_registry" / "cell-maskrcnn")
    p.add_argument("--diagnostic-data", type=Path, help="../shared/data: StarDist, diagnostic")
    args = p.parse_args(argv)
    from cellrna_pipeline.core.segmentation.model import load_model_folder

    model = load_model_folder(args.model)
    sets = {
        "dev dense nuclei (6)": dense_nuclei_volumes(6, seed=7700),
        "dev synth (3)": synthetic_volumes(3, seed=7000),
        "dev synth-random (3)": synthetic_volumes(3, seed=7000, randomized=True),
    }
    if args.diagnostic_data is not None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from cells import stardist_volumes

        sets["StarDist demo3D (diagnostic only)"] = stardist_volumes(args.diagnostic_data)
    lines = [
        "| data | "
        + " | ".join(f"AP@0.5 at {t:g}" for t in THRESHOLDS)
        + " | true objects q01 / q05 |",
        "|---" * (len(THRESHOLDS) + 2) + "|",
    ]
    for name, volumes in sets.items():
        print(name, file=sys.stderr)
        rows = contrasts(volumes, model)
        ap = sweep(rows)
        q = np.percentile(true_object_contrast(rows), [1, 5])
        lines.append(
            f"| {name} | " + " | ".join(f"{ap[t]:.3f}" for t in THRESHOLDS)
            + f" | {q[0]:.3f} / {q[1]:.3f} |"
        )  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
