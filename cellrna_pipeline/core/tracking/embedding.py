"""Appearance embedding of RNA spots (DeepSORT-style), for the spot tracker's cost.

A tiny 3D CNN maps a ``(5, 11, 11)`` voxel patch around each spot (the spot, its
brightness, its sub-voxel offset, its neighbours and the local background) to a unit
vector; spots that are the same molecule in consecutive frames get close vectors. The
tracker adds ``|e - e_last|^2 / appearance_sigma^2`` to a link's cost
(:class:`~cellrna_pipeline.core.tracking.TrackingConfig`, ``appearance_sigma``). Trained on the generator's
live-RNA mode by :mod:`cellrna_pipeline.core.tracking.embedding_train`
(``cellrna train spot-embedding``); the shipped model is
``model_registry/spot-embedding/`` (a ``state_dict`` of a few hundred KB, loaded without
network).

Patches are normalised per frame and channel, ``(I - median(frame)) / median(peak -
median(frame))`` over the frame's spots, so raw counts and preprocessed (rescaled,
smoothed) volumes give comparable inputs.

>>> embedder = load_spot_embedder()                                    # doctest: +SKIP
>>> vectors = embedder.embed(volume_zyx, centres_vox)                  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellrna_pipeline.core.config import (
    StrictModel,
    read_model_folder_config,
    write_model_folder,
)
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import shipped_models_dir

__all__ = [
    "DEFAULT_EMBEDDING_DIR",
    "EMBEDDING_KIND",
    "SpotEmbedder",
    "SpotEmbeddingConfig",
    "build_embedding_net",
    "extract_patches",
    "load_spot_embedder",
    "save_spot_embedder",
]

EMBEDDING_KIND = "cellrna-spot-embedding"
DEFAULT_EMBEDDING_DIR = shipped_models_dir() / "spot-embedding"
"""The shipped model: ``$CELLRNA_MODEL_REGISTRY/spot-embedding`` or the repository's."""


class SpotEmbeddingConfig(StrictModel):
    """Architecture of the embedding network (stored as ``config.json``).

    Attributes
    ----------
    kind : always ``"cellrna-spot-embedding"``.
    patch_zyx : patch size in voxels (odd), centred on the spot's rounded position.
    channels : output channels of the three 3x3x3 convolutions (the second and third
        stride 2 laterally, the third also in z).
    hidden : width of the fully connected layer.
    dim : embedding length (unit vectors).
    appearance_sigma : the spread of same-spot embedding distances that the training
        found (``sqrt`` of its softmax temperature). The tracker, whose other cost terms
        differ from the training's, uses its own tuned value
        (:data:`~cellrna_pipeline.core.tracking.SPOT_APPEARANCE_SIGMA`).
    """

    kind: str = EMBEDDING_KIND
    patch_zyx: tuple[int, int, int] = (5, 11, 11)
    channels: tuple[int, int, int] = (8, 16, 32)
    hidden: int = 64
    dim: int = 16
    appearance_sigma: float = 0.3


def build_embedding_net(config: SpotEmbeddingConfig) -> Any:
    """The network: ``(n, 1, *patch_zyx)`` float32 patches -> ``(n, dim)`` unit vectors."""
    import torch
    from torch import nn

    c1, c2, c3 = config.channels
    pz, py, px = config.patch_zyx

    def out(n: int, stride: int) -> int:
        return (n - 1) // stride + 1

    flat = c3 * out(pz, 2) * out(out(py, 2), 2) * out(out(px, 2), 2)

    class SpotEmbeddingNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv3d(1, c1, 3, padding=1),
                nn.ReLU(),
                nn.Conv3d(c1, c2, 3, stride=(1, 2, 2), padding=1),
                nn.ReLU(),
                nn.Conv3d(c2, c3, 3, stride=(2, 2, 2), padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(flat, config.hidden),
                nn.ReLU(),
                nn.Linear(config.hidden, config.dim),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.features(x), dim=1)

    return SpotEmbeddingNet()


def extract_patches(
    volume_zyx: np.ndarray, centres_vox: np.ndarray, patch_zyx: tuple[int, int, int]
) -> np.ndarray:
    """Normalised patches around spots.

    Parameters
    ----------
    volume_zyx : ``(z, y, x)`` (or ``(y, x)``) intensities of one channel, any real dtype.
    centres_vox : ``(n, 3)`` spot centres in voxels (``zyx``), sub-voxel.
    patch_zyx : patch size (odd numbers).

    Returns
    -------
    ``(n, pz, py, px)`` float32: ``(I - median(volume)) / median(peak - median(volume))``
    with ``peak`` the value at each rounded centre; beyond the volume the edge value is
    repeated.
    """
    vol = np.asarray(volume_zyx, dtype=np.float32)
    if vol.ndim == 2:
        vol = vol[np.newaxis]
    if vol.ndim != 3:
        raise InputError(f"volume must be 2D or 3D, got shape {vol.shape}")
    centres = np.asarray(centres_vox, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(centres).all():
        raise InputError("spot centres hold NaN or infinite values")
    half = np.array(patch_zyx) // 2
    padded = np.pad(vol, [(int(h), int(h)) for h in half], mode="edge")
    idx = np.rint(centres).astype(np.int64)
    idx = np.clip(idx, 0, np.array(vol.shape) - 1) + half  # in padded coordinates
    grids = [np.arange(-h, h + 1) for h in half]
    zz = idx[:, 0, None, None, None] + grids[0][None, :, None, None]
    yy = idx[:, 1, None, None, None] + grids[1][None, None, :, None]
    xx = idx[:, 2, None, None, None] + grids[2][None, None, None, :]
    patches = padded[zz, yy, xx]
    background = float(np.median(vol))
    peaks = patches[:, half[0], half[1], half[2]] - background if len(patches) else np.zeros(1)
    scale = float(np.median(peaks)) if len(peaks) else 1.0
    if not scale > 0:
        scale = float(np.std(vol)) or 1.0
    return ((patches - background) / scale).astype(np.float32)


@dataclass
class SpotEmbedder:
    """A loaded embedding model (eval mode, CPU or the selected device).

    Attributes
    ----------
    net : the torch module (:func:`build_embedding_net`).
    config : its architecture and recommended ``appearance_sigma``.
    metrics : what the training measured (``metrics.json``; may be empty).
    """

    net: Any
    config: SpotEmbeddingConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    device: Any = None

    def embed(
        self, volume_zyx: np.ndarray, centres_vox: np.ndarray, *, batch: int = 2048
    ) -> np.ndarray:
        """``(n, dim)`` float32 unit embeddings of the spots at ``centres_vox`` (``zyx``
        voxels) in one channel's ``(z, y, x)`` volume."""
        import torch

        patches = extract_patches(volume_zyx, centres_vox, self.config.patch_zyx)
        out = np.zeros((len(patches), self.config.dim), np.float32)
        with torch.no_grad():
            for start in range(0, len(patches), batch):
                x = torch.from_numpy(patches[start : start + batch, None]).to(self.device)
                out[start : start + batch] = self.net(x).cpu().numpy()
        return out


def save_spot_embedder(
    net: Any,
    config: SpotEmbeddingConfig,
    folder: str | Path,
    *,
    metrics: dict[str, Any],
    training: dict[str, Any],
    card: str,
) -> Path:
    """Write ``config.json``, ``weights.pt`` (float32 ``state_dict``), ``metrics.json``,
    ``training.json`` and ``model_card.md`` into ``folder`` (a temporary sibling renamed
    into place; an existing folder is replaced)."""
    return write_model_folder(
        folder, net.state_dict(), config, metrics=metrics, training=training, card=card
    )


def load_spot_embedder(model_dir: str | Path | None = None, *, device: Any = None) -> SpotEmbedder:
    """Load an embedding model folder (default: the shipped one) for inference.

    Raises
    ------
    InputError
        The folder lacks ``config.json`` / ``weights.pt``, or holds another kind of model.
    """
    import torch

    from cellrna_pipeline.core.device import select_device

    folder = Path(model_dir) if model_dir is not None else DEFAULT_EMBEDDING_DIR
    config = read_model_folder_config(folder, SpotEmbeddingConfig, EMBEDDING_KIND, "spot embedding")
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    dev = device or select_device()
    net = build_embedding_net(config)
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.to(dev).eval()
    return SpotEmbedder(net=net, config=config, metrics=metrics, device=dev)
