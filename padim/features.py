"""PaDiM embeddings: multi-layer CNN features on layer1's grid, reduced to a random subset of d channels."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F


def random_channel_subset(n_channels: int, d: int, seed: int) -> torch.Tensor:
    """The paper's random dimensionality reduction: d of ``n_channels`` indices, drawn with a seeded
    generator (so the same seed gives the same model) and sorted. Returns (d,) int64."""
    if not 0 < d <= n_channels:
        raise ValueError(f"n_features must be in 1..{n_channels} for these layers, got {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_channels, generator=generator)[:d].sort().values


def embed(feature_maps: Sequence[torch.Tensor], channel_idx: torch.Tensor) -> torch.Tensor:
    """Concatenates the selected channels of every layer on the first layer's grid.

    feature_maps: list of (B, C_l, h_l, w_l), shallow to deep (h_0 >= h_1 >= ...)
    channel_idx:  (d,) sorted indices into the concatenation of all C_l channels
    returns:      (B, d, h_0, w_0)

    Equal to upsampling every map (nearest) to (h_0, w_0), concatenating and then keeping
    ``channel_idx``, but selects first, so unused channels are never upsampled.
    """
    grid = feature_maps[0].shape[-2:]
    parts: List[torch.Tensor] = []
    start = 0
    for fmap in feature_maps:
        stop = start + fmap.shape[1]
        local = channel_idx[(channel_idx >= start) & (channel_idx < stop)] - start
        if len(local):
            part = fmap.index_select(1, local.to(fmap.device))
            if part.shape[-2:] != grid:
                part = F.interpolate(part, size=grid, mode="nearest")
            parts.append(part)
        start = stop
    return torch.cat(parts, dim=1)
