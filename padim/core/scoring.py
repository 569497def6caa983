"""Scoring a stream of batches with fitted Gaussians: embeddings -> patch distances -> maps -> scores,
and the decisions that thresholds turn them into.

Shapes: B images per batch, P = h * w patch positions, d channels, (H, W) the model's input size.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from padim.settings.calibration import PadimResult, labels_at, masks_at  # noqa: F401  (torch-free, shared with the runtime)
from padim.errors import PadimError
from padim.core.features import Embedder
from padim.core.gaussian import mahalanobis, mahalanobis_packed
from padim.core.maps import anomaly_maps, image_scores
from padim.files.memory import Workspace

Batch = Tuple[torch.Tensor, List[Tuple[int, int]]]  # (B, 3, H, W) inputs, original (height, width) sizes


def score_batches(embedder: Embedder, mean: torch.Tensor, factor: torch.Tensor, feature_hw: Tuple[int, int],
                  input_size: Tuple[int, int], sigma: float, batches: Iterable[Batch],
                  tiles=None) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]]:
    """Yields, batch by batch: image scores (B,), anomaly maps (B, H, W), both on the CPU, and the
    original sizes passed through.

    mean: (P, d); factor: (P, d, d) lower-triangular W with W^T W = cov^-1; feature_hw: (h, w).
    The batch-sized temporaries live in one reused ``Workspace`` (nothing yielded lives in it).
    tiles: a ``padim.core.tiling.TileLayout`` for tiled models (None: none).
    """
    workspace = Workspace()
    with torch.inference_mode():
        for batch, sizes in batches:
            emb = embedder(batch, workspace) if tiles is None else tiles.embed(embedder, batch, workspace)
            yield (*score_embeddings(emb, mean, factor, feature_hw, input_size, sigma, workspace, tiles), sizes)


def score_embeddings(embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, feature_hw: Tuple[int, int],
                     input_size: Tuple[int, int], sigma: float, workspace: Optional[Workspace] = None,
                     tiles=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, h, w, d) embeddings -> image scores (B,) and anomaly maps (B, H, W), both on the CPU.

    factor: (P, d, d) unpacked, or (P, d (d + 1) / 2) still packed (unpacked block by block: slower,
    but never holds the whole factor; for scoring inside a fit)."""
    if tuple(embeddings.shape[1:3]) != tuple(feature_hw):
        raise PadimError(f"feature grid {tuple(embeddings.shape[1:3])} differs from the fitted {tuple(feature_hw)}")
    if factor.dim() == 2:
        distances = mahalanobis_packed(embeddings.flatten(1, 2), mean, factor)  # (B, P)
    else:
        distances = mahalanobis(embeddings.flatten(1, 2), mean, factor, workspace)  # (B, P)
    if tiles is not None:
        maps = tiles.maps(distances, feature_hw, sigma)  # (B, H, W), stitched
    else:
        maps = anomaly_maps(distances.view(-1, *feature_hw), input_size, sigma)  # (B, H, W)
    return image_scores(maps).cpu(), maps.cpu()


def to_original_resolution(anomaly_map: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """(H, W) map -> (h0, w0) numpy map at the image's original size (bilinear, half-pixel centres)."""
    resized = F.interpolate(torch.as_tensor(anomaly_map)[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
