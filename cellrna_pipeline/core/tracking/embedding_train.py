"""Training of the spot appearance embedding on the generator's live-RNA mode.

Data: live-RNA sequences of the generator (:class:`~cellrna_pipeline.core.synth.LiveRnaConfig`)
with spot density, SNR and spot motion drawn per sequence (seeds ``TRAIN_SEED_BASE + i``;
validation ``VALIDATION_SEED_BASE + i``, apart from the benchmark's seeds). Spots are
taken at their true positions plus localisation noise (as a detector would report them),
and with probability 1/2 a frame is smoothed first (like the preprocessing's denoising).

Loss, per step, on the spots of one frame ``t`` (anchors) and their candidates at
``t + 1`` (every spot within ``gate_um``; the anchor's own spot is the positive, the
others negatives):

- **appearance term**: InfoNCE (softmax cross-entropy) over the candidates with logits
  ``cos(e_a, e_c) / tau`` (contrastive between the same and different spots across
  frames);
- **position term**: the same cross-entropy with the logits the tracker effectively
  uses, ``cos(e_a, e_c) / tau - |x_c - x_a|^2 / (2 s^2)``, so the embedding learns what
  position alone cannot tell apart;

``tau`` and ``s`` are learnt (``sqrt(tau)`` is stored as the model's
``appearance_sigma``; the tracker's cost corresponds to ``-2 x`` these logits, but its
other terms differ, so the tracker uses its own tuned ``SPOT_APPEARANCE_SIGMA``). Validation: the share of anchors whose best candidate is
the right one, by position only (nearest), appearance only and both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from cellrna_pipeline.core.config import CheckedModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.tracking.embedding import (
    SpotEmbeddingConfig,
    build_embedding_net,
    extract_patches,
    save_spot_embedder,
)

__all__ = [
    "TRAIN_SEED_BASE",
    "VALIDATION_SEED_BASE",
    "EmbeddingTrainConfig",
    "EmbeddingTrainResult",
    "live_training_config",
    "train_spot_embedding",
]

TRAIN_SEED_BASE = 20000
VALIDATION_SEED_BASE = 30000


class EmbeddingTrainConfig(CheckedModel):
    """Settings of :func:`train_spot_embedding` (the defaults made the shipped model).

    Attributes
    ----------
    seed : seeds the sequence draws, the batches and the initial weights.
    steps : optimizer steps (one frame pair each).
    lr : AdamW learning rate (cosine decay to 5 % of it).
    anchors_per_step : anchors sampled from the frame.
    train_sequences, validation_sequences : generator sequences made for each.
    timepoints : frames per sequence.
    shape_zyx : volume shape of the sequences (voxels of 0.6 x 0.15 x 0.15 um).
    gate_um : candidates of an anchor: the next frame's spots within this distance.
    localization_noise_vox : std of the noise added to true positions (z, y, x voxels).
    threads : torch CPU threads.
    model : the architecture.
    """

    seed: int = 0
    steps: int = 1500
    lr: float = 2e-3
    anchors_per_step: int = 128
    train_sequences: int = 10
    validation_sequences: int = 2
    timepoints: int = 12
    shape_zyx: tuple[int, int, int] = (32, 256, 256)
    gate_um: float = 1.5
    localization_noise_vox: tuple[float, float, float] = (0.15, 0.3, 0.3)
    threads: int = 1
    model: SpotEmbeddingConfig = SpotEmbeddingConfig()

    def _check(self) -> None:
        for name in ("steps", "anchors_per_step", "train_sequences", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timepoints < 2:
            raise InputError(f"timepoints must be >= 2, got {self.timepoints}")
        if self.validation_sequences < 0:
            raise InputError(f"validation_sequences must be >= 0, got {self.validation_sequences}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be positive, got {self.lr!r}")
        if not (math.isfinite(self.gate_um) and self.gate_um > 0):
            raise InputError(f"gate_um must be positive, got {self.gate_um!r}")
        if any(not math.isfinite(v) or v < 0 for v in self.localization_noise_vox):
            raise InputError(
                f"localization_noise_vox must be >= 0, got {list(self.localization_noise_vox)}"
            )


def live_training_config(
    seed: int, timepoints: int, shape_zyx: tuple[int, int, int] = (32, 256, 256)
) -> Any:
    """The generator config of training/validation sequence ``seed``: density, SNR and
    spot motion drawn from ``seed`` (3D, frames 2 s apart)."""
    from cellrna_pipeline.core.synth import LiveRnaConfig, live_rna_config

    rng = np.random.default_rng(seed)
    d_lo = float(np.exp(rng.uniform(np.log(0.001), np.log(0.01))))
    d_hi = float(np.exp(rng.uniform(np.log(0.02), np.log(0.1))))
    s_lo = float(rng.uniform(0.05, 0.2))
    return live_rna_config(
        seed=seed,
        timepoints=timepoints,
        shape_zyx=shape_zyx,
        n_cells=int(rng.integers(6, 17)),
        spots_per_cell=float(np.exp(rng.uniform(np.log(15.0), np.log(150.0)))),
        snr=float(np.exp(rng.uniform(np.log(2.5), np.log(12.0)))),
        motion_um_per_frame=float(rng.uniform(0.0, 0.2)),
        calibration_images=False,
        live_rna=LiveRnaConfig(
            diffusion_um2_per_s=(d_lo, d_hi),
            directed_fraction=float(rng.uniform(0.0, 0.5)),
            directed_speed_um_per_s=(s_lo, s_lo + float(rng.uniform(0.1, 0.3))),
            blink_probability=float(rng.uniform(0.0, 0.1)),
            intensity_fluctuation_cv=float(rng.uniform(0.1, 0.35)),
        ),
    )


@dataclass
class _Frame:
    patches: np.ndarray  # (n, pz, py, px) float16
    pos_um: np.ndarray  # (n, 3) noisy positions
    track: np.ndarray  # (n,) ground-truth track ids


def _sequence_frames(
    seed: int, cfg: EmbeddingTrainConfig, rng: np.random.Generator
) -> list[_Frame]:
    from cellrna_pipeline.core.synth import synthesize

    acq = synthesize(live_training_config(seed, cfg.timepoints, cfg.shape_zyx))
    assert acq.image is not None
    vox = np.asarray(acq.voxel_size.as_tuple())
    noise = np.asarray(cfg.localization_noise_vox)
    frames = []
    for t in range(acq.image.shape[0]):
        rows = acq.spot_table.filter((pl.col("timepoint") == t) & (pl.col("channel") == "rna0"))
        true = rows.select("z", "y", "x").to_numpy()
        centres = true + rng.normal(0.0, 1.0, true.shape) * noise
        centres = np.clip(centres, 0, np.array(acq.image.shape[2:]) - 1)
        volume = acq.image[t, 2].astype(np.float32)
        if rng.random() < 0.5:
            volume = ndi.gaussian_filter(volume, (rng.uniform(0, 0.6), *(rng.uniform(0, 0.8),) * 2))
        patches = extract_patches(volume, centres, cfg.model.patch_zyx).astype(np.float16)
        frames.append(_Frame(patches, centres * vox, rows["track_id"].to_numpy()))
    return frames


def _pairs(a: _Frame, b: _Frame, gate_um: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Anchors of ``a`` whose spot is within the gate in ``b``, and their candidates."""
    near = cKDTree(a.pos_um).query_ball_tree(cKDTree(b.pos_um), gate_um) if len(b.pos_um) else []
    anchors, cands = [], []
    for i, js in enumerate(near):
        js = np.asarray(js, np.int64)
        if len(js) and np.any(b.track[js] == a.track[i]):
            anchors.append(i)
            cands.append(js)
    return np.asarray(anchors, np.int64), cands


def _augmented(torch: Any, patches: np.ndarray, k: int, flip: bool) -> Any:
    """``(n, 1, z, y, x)`` float32 tensor of ``patches`` rotated ``k`` x 90 degrees in y-x
    (and mirrored in x)."""
    x = np.rot90(patches.astype(np.float32), k, axes=(2, 3))
    if flip:
        x = x[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(x)[:, None])


@dataclass
class EmbeddingTrainResult:
    """What :func:`train_spot_embedding` made: the network, its config, metrics, timing."""

    net: Any
    config: SpotEmbeddingConfig
    metrics: dict[str, float]
    seconds: float
    folder: Path | None


def _logits(
    torch: Any,
    ea: Any,
    eb: Any,
    a: _Frame,
    b: _Frame,
    anchors: np.ndarray,
    cands: list,
    params: Any,
) -> tuple[Any, Any, Any]:
    """Appearance and joint logits (anchors x used candidates, -inf outside the gate),
    and the index of each anchor's positive."""
    used = np.unique(np.concatenate(cands))
    col = {int(j): k for k, j in enumerate(used)}
    mask = np.zeros((len(anchors), len(used)), bool)
    target = np.zeros(len(anchors), np.int64)
    for r, (i, js) in enumerate(zip(anchors, cands, strict=True)):
        mask[r, [col[int(j)] for j in js]] = True
        target[r] = col[int(js[b.track[js] == a.track[i]][0])]
    log_tau, log_s = params
    cos = ea @ eb[torch.as_tensor(used)].T
    d2 = torch.as_tensor(
        ((a.pos_um[anchors, None, :] - b.pos_um[None, used, :]) ** 2).sum(axis=2),
        dtype=torch.float32,
    )
    m = torch.as_tensor(mask)
    app = (cos / log_tau.exp()).masked_fill(~m, -1e9)
    joint = (cos / log_tau.exp() - d2 / (2 * (2 * log_s).exp())).masked_fill(~m, -1e9)
    return app, joint, torch.as_tensor(target)


def _validate(
    torch: Any, net: Any, frames: list[list[_Frame]], params: Any, gate_um: float
) -> dict[str, float]:
    hits = {"position": 0, "appearance": 0, "joint": 0}
    total = ambiguous = 0
    net.eval()
    with torch.no_grad():
        for seq in frames:
            emb = [net(torch.from_numpy(f.patches.astype(np.float32)[:, None])) for f in seq]
            for t in range(len(seq) - 1):
                a, b = seq[t], seq[t + 1]
                anchors, cands = _pairs(a, b, gate_um)
                if not len(anchors):
                    continue
                app, joint, target = _logits(
                    torch, emb[t][anchors], emb[t + 1], a, b, anchors, cands, params
                )
                d2 = (
                    (
                        a.pos_um[anchors, None, :]
                        - b.pos_um[None, np.unique(np.concatenate(cands)), :]
                    )
                    ** 2
                ).sum(axis=2)
                d2 = np.where(app.numpy() > -1e8, d2, np.inf)
                hits["position"] += int((d2.argmin(axis=1) == target.numpy()).sum())
                hits["appearance"] += int((app.argmax(dim=1) == target).sum())
                hits["joint"] += int((joint.argmax(dim=1) == target).sum())
                total += len(anchors)
                ambiguous += int(sum(len(c) > 1 for c in cands))
    net.train()
    out = {f"top1_{k}": v / max(total, 1) for k, v in hits.items()}
    out["anchors"] = float(total)
    out["share_with_several_candidates"] = ambiguous / max(total, 1)
    return out


def train_spot_embedding(
    config: EmbeddingTrainConfig | None = None,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] = lambda _m: None,
    command: str = "cellrna train spot-embedding",
) -> EmbeddingTrainResult:
    """Train the spot embedding; write a model folder to ``out`` if given.

    Returns
    -------
    EmbeddingTrainResult (the network in eval mode on CPU, its config with the learnt
    ``appearance_sigma``, validation metrics, seconds).
    """
    import torch

    from cellrna_pipeline.core.device import configure_cpu_threads

    cfg = config or EmbeddingTrainConfig()
    configure_cpu_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    train, val = [], []
    for i in range(cfg.train_sequences):
        progress(f"training sequence {i + 1}/{cfg.train_sequences}")
        train.append(_sequence_frames(TRAIN_SEED_BASE + cfg.seed * 1000 + i, cfg, rng))
    for i in range(cfg.validation_sequences):
        progress(f"validation sequence {i + 1}/{cfg.validation_sequences}")
        val.append(_sequence_frames(VALIDATION_SEED_BASE + i, cfg, rng))
    pairs = [
        (s, t, *_pairs(seq[t], seq[t + 1], cfg.gate_um))
        for s, seq in enumerate(train)
        for t in range(len(seq) - 1)
    ]
    pairs = [p for p in pairs if len(p[2])]
    if not pairs:
        raise InputError("the training sequences hold no spot seen in two frames")

    net = build_embedding_net(cfg.model)
    net.train()
    log_tau = torch.nn.Parameter(torch.tensor(math.log(0.1)))
    log_s = torch.nn.Parameter(torch.tensor(math.log(0.5)))
    params = (log_tau, log_s)
    opt = torch.optim.AdamW([*net.parameters(), *params], lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(k / cfg.steps, 1.0)))
    )
    ce = torch.nn.functional.cross_entropy
    data_seconds = time.perf_counter() - start
    progress(f"{len(pairs)} frame pairs in {data_seconds:.0f} s; training {cfg.steps} steps")
    running = 0.0
    for step in range(1, cfg.steps + 1):
        s, t, anchors, cands = pairs[int(rng.integers(len(pairs)))]
        a, b = train[s][t], train[s][t + 1]
        if len(anchors) > cfg.anchors_per_step:
            pick = np.sort(rng.choice(len(anchors), cfg.anchors_per_step, replace=False))
            anchors, cands = anchors[pick], [cands[k] for k in pick]
        used = np.unique(np.concatenate(cands))
        # random 90-degree rotations / flips in y-x (the same for both frames)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))

        ea = net(_augmented(torch, a.patches[anchors], k, flip))
        eb_used = net(_augmented(torch, b.patches[used], k, flip))
        eb = torch.zeros((len(b.patches), eb_used.shape[1]))
        eb = eb.index_copy(0, torch.as_tensor(used), eb_used)
        app, joint, target = _logits(torch, ea, eb, a, b, anchors, cands, params)
        loss = ce(app, target) + ce(joint, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.item())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if step % 100 == 0 or step == cfg.steps:
            progress(
                f"step {step}/{cfg.steps}: loss {running:.3f}, tau {log_tau.exp().item():.3f}, "
                f"s {log_s.exp().item():.3f} um"
            )
    net.eval()
    metrics = _validate(torch, net, val, params, cfg.gate_um) if val else {}
    sigma = log_tau.exp().sqrt().item()
    metrics.update(
        {
            "appearance_sigma": sigma,
            "position_scale_um": log_s.exp().item(),
            "final_loss": running,
        }
    )
    model_cfg = cfg.model.model_copy(update={"appearance_sigma": round(sigma, 4)})
    seconds = time.perf_counter() - start
    progress(f"done in {seconds / 60:.1f} min: {metrics}")
    folder = None
    if out is not None:
        n_params = sum(p.numel() for p in net.parameters())
        training = {
            "command": command,
            "config": cfg.model_dump(mode="json"),
            "seconds": round(seconds, 1),
            "data_seconds": round(data_seconds, 1),
            "parameters": n_params,
            "torch": torch.__version__,
        }
        folder = save_spot_embedder(
            net,
            model_cfg,
            out,
            metrics=metrics,
            training=training,
            card=_model_card(cfg, model_cfg, metrics, training),
        )
    return EmbeddingTrainResult(net, model_cfg, metrics, seconds, folder)


def _model_card(
    cfg: EmbeddingTrainConfig,
    model: SpotEmbeddingConfig,
    metrics: dict[str, float],
    training: dict[str, Any],
) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    return f"""# cellrna-spot-embedding: appearance embedding of RNA spots for tracking

A tiny 3D CNN (`cellrna_pipeline.core.tracking.embedding.build_embedding_net(config.json)`,
{training["parameters"]:,} parameters, float32 `state_dict` in `weights.pt`): a patch of
{model.patch_zyx[0]} x {model.patch_zyx[1]} x {model.patch_zyx[2]} (z, y, x) voxels around a
spot -> a unit vector of length {model.dim}. Used by the spot tracker (`spot_tracks`
asset, `TrackingConfig.appearance_sigma`); patches are normalised per frame by the median
background and the median spot peak.

## Data
- {cfg.train_sequences} live-RNA generator sequences (`core/synth`, `LiveRnaConfig`) of
  {cfg.timepoints} frames, 32 x 256 x 256 voxels of 0.6 x 0.15 x 0.15 um, frames 2 s apart;
  per sequence 6-16 cells, 15-150 spots per cell, SNR 2.5-12, diffusion and directed
  transport drawn at random (`live_training_config`); seeds {TRAIN_SEED_BASE} + 1000 x seed
  + i. Validation: {cfg.validation_sequences} sequences, seeds {VALIDATION_SEED_BASE}+.
  The benchmark's live-RNA sequences (seeds 11-15, tuning 111-115) are not used.
- True spot positions plus localisation noise (std {list(cfg.localization_noise_vox)}
  voxels z, y, x); half of the frames smoothed (sigma up to 0.6 / 0.8 voxels) as the
  preprocessing's denoising does; random 90-degree rotations and flips.

## Training
- Loss: appearance InfoNCE over each anchor's candidates in the next frame (spots within
  {cfg.gate_um} um; same spot = positive) + the same cross-entropy on appearance plus
  position logits (`cos / tau - d^2 / 2 s^2`); `tau`, `s` learnt.
- seed {cfg.seed}, {cfg.steps} steps of {cfg.anchors_per_step} anchors, AdamW lr {cfg.lr}
  (cosine), {cfg.threads} torch thread(s), {training["seconds"] / 60:.1f} min on the
  2-core CPU (shared), data generation included.
- Reproduce: `{training["command"]}`.

## Validation (held-out sequences; top-1 = the right next-frame spot ranks first among
the candidates within {cfg.gate_um} um)

| metric | value |
|---|---|
{rows}

`appearance_sigma` (`sqrt(tau)`) is the spread the training found; the spot tracker uses
`SPOT_APPEARANCE_SIGMA` (chosen on the live-RNA tuning seeds with its other costs).
Whether the embedding improves tracking is measured in `docs/benchmarks/tracking.md`
(live-RNA section), not here.
"""
