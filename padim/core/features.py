"""PaDiM embeddings: multi-layer CNN features on layer1's grid, reduced to d channels: a random subset
(the paper's) or a semi-orthogonal projection of all of them."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


CPU_FORWARD_CHUNK = 8  # images per backbone forward on the CPU (see ``core.embedding``), at 256 x 256 or more


def cpu_chunk(height: int, width: int) -> int:
    """Tiles per CPU forward pass: ``CPU_FORWARD_CHUNK`` at 256 x 256 and above; smaller tiles as many
    more as keep the pixels per pass alike (at most 32): a pass has a fixed cost per layer, which
    eight 128-pixel tiles would pay four times over. (Whole pictures keep ``CPU_FORWARD_CHUNK``:
    their results then round alike wherever they are scored, a Ray shard or this process.)"""
    return max(CPU_FORWARD_CHUNK, min(32, CPU_FORWARD_CHUNK * 65536 // max(1, height * width)))


def random_channel_subset(n_channels: int, d: int, seed: int) -> torch.Tensor:
    """The paper's random dimensionality reduction: d of ``n_channels`` indices, drawn with a seeded
    generator (so the same seed gives the same model) and sorted. Returns (d,) int64."""
    if not 0 < d <= n_channels:
        raise ValueError(f"n_features must be in 1..{n_channels} for these layers, got {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_channels, generator=generator)[:d].sort().values


def semi_orthogonal_projection(n_channels: int, d: int, seed: int) -> torch.Tensor:
    """A seeded (C, d) matrix W with orthonormal columns, W^T W = I (Kim et al. 2021, "Semi-orthogonal
    Embedding for Efficient Unsupervised Anomaly Segmentation"): every embedding channel is a mix of
    all C channels instead of one of them. Returns (n_channels, d) float32.

    W is the Q of the QR decomposition of a seeded float64 Gaussian (C, d) matrix, its column signs
    fixed so that diag(R) > 0 (Q is then unique and uniformly distributed). Model files store W:
    LAPACK need not give the same last bits on another machine, a stored matrix does."""
    if not 0 < d <= n_channels:
        raise ValueError(f"n_features must be in 1..{n_channels} for these layers, got {d}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n_channels, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # (C, d), (d, d)
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).to(torch.float32).contiguous()


def make_reduction(n_channels: int, d: int, seed: int, method: str = "random") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The channels an embedding reads and how they become d: (channel_idx (k,) int64, projection (k, d)
    float32 or None). "random": the paper's d seeded channels, no projection (k = d);
    "semi-orthogonal": all k = C channels times ``semi_orthogonal_projection``."""
    if method == "random":
        return random_channel_subset(n_channels, d, seed), None
    if method == "semi-orthogonal":
        return torch.arange(n_channels), semi_orthogonal_projection(n_channels, d, seed)
    raise ValueError(f"reduction must be 'random' or 'semi-orthogonal', got {method!r}")


def embed(feature_maps: Sequence[torch.Tensor], channel_idx: torch.Tensor, out: Optional[torch.Tensor] = None,
          projection: Optional[torch.Tensor] = None, plan: Optional["LayerPlan"] = None) -> torch.Tensor:
    """Concatenates the selected channels of every layer on the first layer's grid (and projects them).

    feature_maps: list of (B, C_l, h_l, w_l), shallow to deep (h_0 >= h_1 >= ...)
    channel_idx:  (k,) sorted indices into the concatenation of all C_l channels
    out:          optional (B, h_0, w_0, d) tensor to write into (e.g. a slice of a larger batch)
    projection:   optional (k, d): the embedding is then (selected channels) @ projection
    plan:         ``layer_plan`` of these layers (default: computed from ``channel_idx`` now)
    returns:      (B, h_0, w_0, d), channels last: each patch's embedding is a contiguous row
                  (d = k without a projection)

    Equal to upsampling every map (nearest) to (h_0, w_0), concatenating, keeping ``channel_idx``
    (and multiplying by ``projection``), but selects first, so unused channels are never upsampled,
    and writes each layer's part straight into the result: when the grids differ by whole factors
    (the usual strides 4, 8, 16), nearest upsampling is a broadcast copy into (s_h, s_w) blocks, with
    no upsampled temporary and no concatenating copy. Nearest upsampling copies a pixel's channel
    vector, so it commutes with a per-pixel linear map: each layer is projected at its own
    resolution with its rows of ``projection`` (C_l x d), and the upsampled results are added. Only
    the batch's maps are ever full-channel, never a (B, h_0, w_0, C) upsampled embedding.
    """
    plan = plan if plan is not None else layer_plan([f.shape[1] for f in feature_maps], channel_idx, projection)
    first = feature_maps[0]
    grid = tuple(first.shape[-2:])
    if out is None:
        return _embed_functional(feature_maps, plan, grid)
    written = False
    for layer, local, rows, column in plan:
        part = feature_maps[layer].permute(0, 2, 3, 1)  # (B, h_l, w_l, C_l), a view (contiguous for channels_last maps)
        if local is not None:
            part = part.index_select(3, local)  # (B, h_l, w_l, k_l)
        if rows is None:
            _write_upsampled(out[..., column : column + part.shape[3]], part, grid, add=False)  # (B, h_0, w_0, k_l)
        else:
            _write_upsampled(out, torch.matmul(part, rows.to(part.dtype)), grid, add=written)  # (B, h_l, w_l, d) summed in
            written = True
    return out


def _embed_functional(feature_maps: Sequence[torch.Tensor], plan: "LayerPlan", grid: Tuple[int, int]) -> torch.Tensor:
    """``embed`` without an output buffer: the same values from plain operations (what torch.export
    traces: nearest upsampling by whole factors as expand + reshape, no gathers, no writes into views)."""
    parts, total = [], None
    for layer, local, rows, _ in plan:
        part = feature_maps[layer].permute(0, 2, 3, 1)  # (B, h_l, w_l, C_l)
        if local is not None:
            part = part.index_select(3, local)  # (B, h_l, w_l, k_l)
        if rows is None:
            parts.append(_upsampled(part, grid))
        else:
            part = _upsampled(torch.matmul(part, rows.to(part.dtype)), grid)  # (B, h_0, w_0, d)
            total = part if total is None else total + part
    return torch.cat(parts, dim=3) if rows is None else total


def _upsampled(part: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, h_l, w_l, k) -> (B, h_0, w_0, k), nearest: a broadcast of each pixel to its (s_h, s_w)
    block when the grids differ by whole factors, else ``F.interpolate``."""
    batch, h_l, w_l, k = part.shape
    if grid[0] % h_l == 0 and grid[1] % w_l == 0:
        blocks = part[:, :, None, :, None, :].expand(batch, h_l, grid[0] // h_l, w_l, grid[1] // w_l, k)
        return blocks.reshape(batch, grid[0], grid[1], k)
    return F.interpolate(part.permute(0, 3, 1, 2), size=grid, mode="nearest").permute(0, 2, 3, 1)


LayerPlan = List[Tuple[int, Optional[torch.Tensor], Optional[torch.Tensor], int]]


def layer_plan(channel_counts: Sequence[int], channel_idx: torch.Tensor,
               projection: Optional[torch.Tensor] = None) -> LayerPlan:
    """Where each layer's kept channels go: [(layer, local indices (k_l,) or None for all of its
    channels, its (k_l, d) rows of ``projection`` or None, first output column)], layers with no
    kept channel left out. Computed once per model: it depends on the indices, not on the images
    (and a traced graph must not compute shapes from tensor values)."""
    plan, start, column = [], 0, 0
    for layer, count in enumerate(channel_counts):
        inside = (channel_idx >= start) & (channel_idx < start + count)
        local = channel_idx[inside] - start
        start += count
        if len(local):  # sorted and distinct: as many as C_l means all of them, in order
            rows = None if projection is None else projection[inside.to(projection.device)]
            plan.append((layer, None if len(local) == count else local, rows, column))
            column += len(local)
    return plan


def _write_upsampled(target: torch.Tensor, part: torch.Tensor, grid: Tuple[int, int], add: bool) -> None:
    """Writes (or adds) (B, h_l, w_l, k) ``part``, upsampled (nearest) to ``grid``, into (B, h_0, w_0, k)
    ``target``."""
    h_l, w_l = part.shape[1:3]
    if grid[0] % h_l == 0 and grid[1] % w_l == 0:
        target = target.unflatten(2, (w_l, grid[1] // w_l)).unflatten(1, (h_l, grid[0] // h_l))
        part = part[:, :, None, :, None, :]  # (B, h_l, s_h, w_l, s_w, k) by broadcasting
    else:
        part = F.interpolate(part.permute(0, 3, 1, 2), size=grid, mode="nearest").permute(0, 2, 3, 1)
    if add:
        target.add_(part)
    else:
        target.copy_(part)


def count_channels(extractor: nn.Module, input_size: Tuple[int, int], device) -> int:
    """Total channels of the extractor's feature layers, from one forward pass of a dummy image."""
    with torch.inference_mode():
        dummy = torch.zeros(1, 3, *input_size, device=device)
        return sum(fmap.shape[1] for fmap in extractor(dummy))
