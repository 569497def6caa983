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
    returns:      (B, h_0, w_0, d), channels last: each patch's embedding is a contiguous row

    Equal to upsampling every map (nearest) to (h_0, w_0), concatenating and then keeping
    ``channel_idx``, but selects first, so unused channels are never upsampled. Works in the
    channels-last layout the backbone runs in, so no transposing copy of the embeddings is made.
    """
    grid = feature_maps[0].shape[-2:]
    parts: List[torch.Tensor] = []
    start = 0
    for fmap in feature_maps:
        stop = start + fmap.shape[1]
        local = channel_idx[(channel_idx >= start) & (channel_idx < stop)] - start
        if len(local):
            part = fmap.permute(0, 2, 3, 1).index_select(3, local.to(fmap.device))  # (B, h_l, w_l, k)
            if part.shape[1:3] != grid:
                part = F.interpolate(part.permute(0, 3, 1, 2), size=grid, mode="nearest").permute(0, 2, 3, 1)
            parts.append(part)
        start = stop
    return torch.cat(parts, dim=3)
