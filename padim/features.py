"""PaDiM embeddings: multi-layer CNN features on layer1's grid, reduced to a random subset of d channels."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .memory import Workspace

CPU_FORWARD_CHUNK = 8  # images per backbone forward on the CPU (see ``Embedder``)


def random_channel_subset(n_channels: int, d: int, seed: int) -> torch.Tensor:
    """The paper's random dimensionality reduction: d of ``n_channels`` indices, drawn with a seeded
    generator (so the same seed gives the same model) and sorted. Returns (d,) int64."""
    if not 0 < d <= n_channels:
        raise ValueError(f"n_features must be in 1..{n_channels} for these layers, got {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_channels, generator=generator)[:d].sort().values


def embed(feature_maps: Sequence[torch.Tensor], channel_idx: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenates the selected channels of every layer on the first layer's grid.

    feature_maps: list of (B, C_l, h_l, w_l), shallow to deep (h_0 >= h_1 >= ...)
    channel_idx:  (d,) sorted indices into the concatenation of all C_l channels
    out:          optional (B, h_0, w_0, d) tensor to write into (e.g. a slice of a larger batch)
    returns:      (B, h_0, w_0, d), channels last: each patch's embedding is a contiguous row

    Equal to upsampling every map (nearest) to (h_0, w_0), concatenating and then keeping
    ``channel_idx``, but selects first, so unused channels are never upsampled, and writes each
    layer's channels straight into their columns of the result: when the grids differ by whole
    factors (the usual strides 4, 8, 16), nearest upsampling is a broadcast copy into (s_h, s_w)
    blocks, with no upsampled temporary and no concatenating copy.
    """
    first = feature_maps[0]
    grid = tuple(first.shape[-2:])
    if out is None:
        out = first.new_empty(first.shape[0], *grid, len(channel_idx))
    start = column = 0
    for fmap in feature_maps:
        stop = start + fmap.shape[1]
        local = channel_idx[(channel_idx >= start) & (channel_idx < stop)] - start
        if len(local):
            part = fmap.permute(0, 2, 3, 1).index_select(3, local.to(fmap.device))  # (B, h_l, w_l, k)
            target = out[..., column : column + len(local)]  # (B, h_0, w_0, k)
            h_l, w_l = part.shape[1:3]
            if grid[0] % h_l == 0 and grid[1] % w_l == 0:
                blocks = target.unflatten(2, (w_l, grid[1] // w_l)).unflatten(1, (h_l, grid[0] // h_l))
                blocks.copy_(part[:, :, None, :, None, :])  # (B, h_l, s_h, w_l, s_w, k)
            else:
                target.copy_(F.interpolate(part.permute(0, 3, 1, 2), size=grid, mode="nearest").permute(0, 2, 3, 1))
            column += len(local)
        start = stop
    return out


def count_channels(extractor: nn.Module, input_size: Tuple[int, int], device) -> int:
    """Total channels of the extractor's feature layers, from one forward pass of a dummy image."""
    with torch.inference_mode():
        dummy = torch.zeros(1, 3, *input_size, device=device)
        return sum(fmap.shape[1] for fmap in extractor(dummy))


class Embedder:
    """A frozen feature extractor and its channel subset: normalised images -> PaDiM embeddings.

    extractor:   (B, 3, H, W) -> list of (B, C_l, h_l, w_l), already on ``device`` (channels_last)
    channel_idx: (d,) int64 on ``device``, sorted indices into the concatenated C_l channels
    """

    def __init__(self, extractor: nn.Module, channel_idx: torch.Tensor, device: torch.device):
        self.extractor = extractor
        self.channel_idx = channel_idx
        self.device = torch.device(device)

    def __call__(self, batch: torch.Tensor, workspace: Optional[Workspace] = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, h, w, d) PaDiM embeddings (channels last).

        On the CPU the backbone sees at most ``CPU_FORWARD_CHUNK`` images at a time: per image it is
        as fast as a batch of 32, and its activations (the largest buffers of a fit) take a quarter
        of the memory. The result still holds the whole batch, in ``workspace``'s buffer when given.
        """
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        chunk = CPU_FORWARD_CHUNK if self.device.type == "cpu" else len(batch)
        workspace = workspace if workspace is not None else Workspace()
        out = None
        for start in range(0, len(batch), chunk):
            feature_maps = self.extractor(batch[start : start + chunk])
            if out is None:
                shape = (len(batch), *feature_maps[0].shape[-2:], len(self.channel_idx))
                out = workspace.get("embeddings", shape, feature_maps[0].dtype, feature_maps[0].device)
            embed(feature_maps, self.channel_idx, out=out[start : start + chunk])
            del feature_maps
        return out
