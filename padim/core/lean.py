"""The scoring path as export traces it: ``PatchScorer``'s numbers from fewer and cheaper operations.

The eager path is written for PyTorch (views, reused buffers, ``index_select``); a traced graph is
run by engines that fuse convolutions but pay for every gather and transpose. What this graph does
instead, and why each step gives the eager path's numbers:

- **normalisation**: (p / 255 - m) / s = (p - 255 m) * (1 / (255 s)). The per-channel factor is
  folded into the first convolution's weights (per input channel: linear, exact up to rounding);
  the subtraction of 255 m stays before it. Folding the subtraction too would change the border:
  the first convolution pads with zeros, and zero in the normalised image is pixel value 255 m,
  not 0; with the subtraction kept, the padded values are the eager path's.
- **channel subset / projection**: per layer, a 1 x 1 convolution on the layer's own grid whose
  weights are one-hot rows (the kept channels; x * 1 + 0 * y + ... = x exactly) or the layer's
  rows of the projection. No Gather; the engines run it as one small GEMM on their own layout.
- **layout**: each layer's k_l kept channels are transposed once, on their own grid, to
  (h_l, w_l, B, k_l): patch-major, the layout the per-patch products need. Nearest upsampling by
  whole factors and the mean subtraction are then one broadcast subtraction
  (h_l, 1, w_l, 1, B, k_l) - (h_l, s_h, w_l, s_w, 1, k_l): no expanded copy, no transpose of the
  whole embedding. The projection's layers are summed at layer1's grid (in the eager order) first.
- **Mahalanobis**: (P, B, d) @ (P, d, d)^T and the L2 norm give (P, B); one transpose of that
  (the smallest tensor of the path) to (B, P); the maps are the same two matrix products.

Grids that are not whole multiples of each other (odd input sizes) keep the eager functional path
(``features.embed`` with ``F.interpolate``): ``lean_possible`` says which.

Shapes: B images, (H, W) input, (h, w) layer1's grid (P = h * w), C_l a layer's channels, d the
embedding's.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn


def lean_possible(grid: Tuple[int, int], layer_grids: Sequence[Tuple[int, int]]) -> bool:
    """Whether every layer's grid divides layer1's by whole factors (the usual strides 4, 8, 16)."""
    return all(grid[0] % h == 0 and grid[1] % w == 0 for h, w in layer_grids)


def fold_input_scale(extractor: nn.Module, scale: torch.Tensor) -> Optional[nn.Module]:
    """A copy of ``extractor`` (sharing every module but the first convolution) whose first
    convolution's weights are multiplied by ``scale`` (3,) per input channel; None when the first
    stage does not start with a plain zero-padded 3-channel convolution (nothing is folded then)."""
    from padim.core.backbones import StagedFeatureExtractor

    stem = extractor.stages[0]
    first = stem[0] if isinstance(stem, nn.Sequential) and len(stem) else None
    if not (type(first) is nn.Conv2d and first.in_channels == 3 and first.groups == 1
            and first.padding_mode == "zeros"):
        return None
    conv = nn.Conv2d(3, first.out_channels, first.kernel_size, first.stride, first.padding, first.dilation,
                     bias=first.bias is not None).to(first.weight.device)
    with torch.no_grad():
        conv.weight.copy_(first.weight * scale.view(1, 3, 1, 1).to(first.weight.dtype))
        if first.bias is not None:
            conv.bias.copy_(first.bias)
    stages = [("stem", nn.Sequential(conv, *list(stem)[1:]))]
    stages += list(zip(extractor.stage_names[1:], extractor.stages[1:]))
    return StagedFeatureExtractor(stages, extractor.layers).eval().requires_grad_(False)


def _reduction_conv(local: Optional[torch.Tensor], rows: Optional[torch.Tensor], channels: int,
                    device) -> Optional[nn.Conv2d]:
    """The 1 x 1 convolution (C_l -> k_l, no bias) that keeps ``local`` channels (one-hot rows) or
    applies the layer's ``rows`` (k_l, d) of the projection; None when the layer is kept whole."""
    if local is None and rows is None:
        return None
    keep = torch.arange(channels, device=device) if local is None else local.to(device)
    if rows is None:
        weight = torch.zeros(len(keep), channels, device=device)
        weight[torch.arange(len(keep), device=device), keep] = 1.0
    else:
        weight = torch.zeros(rows.shape[1], channels, dtype=torch.float32, device=device)
        weight[:, keep] = rows.to(device=device, dtype=torch.float32).T
    conv = nn.Conv2d(channels, weight.shape[0], 1, bias=False).to(device)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
    return conv.requires_grad_(False)


class LeanGraph(nn.Module):
    """pixels (B, H, W, 3) uint8 -> (maps (B, H, W) before the ignore mask, embeddings minus the mean
    (P, B, d)), what ``PatchScorer`` computes, as plain operations for torch.export (see the module's
    docstring). ``PatchScorer.finish`` then applies the ignore mask and takes the maxima, as eagerly.

    extractor: the backbone prefix, its first convolution already scaled (``fold_input_scale``) when
    ``folded``; embedder: the ``PatchEmbedder`` whose normalisation (``centred`` when folded, else
    ``normalise``: the ignore mask included) runs first and whose ``plan`` reads the layers;
    layer_grids: every layer's (h_l, w_l); channels: every C_l; mean: (P, d); factor: (P, d, d);
    rows (H, h), cols_t (w, W): ``maps.upsample_blur_matrix``.
    """

    def __init__(self, extractor: nn.Module, embedder: nn.Module, folded: bool,
                 layer_grids: Sequence[Tuple[int, int]], channels: Sequence[int], grid: Tuple[int, int],
                 mean: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor, cols_t: torch.Tensor):
        super().__init__()
        plan = embedder.plan
        self.extractor, self.grid, self.folded = extractor, tuple(grid), folded
        self.normalising = [embedder]  # a plain list: the embedder's modules are not this graph's submodules
        self.projected = plan[0][2] is not None
        self.register_buffer("factor", factor)
        self.register_buffer("rows", rows)
        self.register_buffer("cols_t", cols_t)
        self.layers: List[Tuple[int, Tuple[int, int]]] = []  # (layer, (s_h, s_w)) per plan entry
        self.reduce = nn.ModuleList()
        d = mean.shape[1]
        mean_grid = mean.view(*self.grid, 1, d)  # (h, w, 1, d)
        for i, (layer, local, layer_rows, column) in enumerate(plan):
            h_l, w_l = layer_grids[layer]
            steps = (self.grid[0] // h_l, self.grid[1] // w_l)
            self.layers.append((layer, steps))
            conv = _reduction_conv(local, layer_rows, channels[layer], mean.device)
            self.reduce.append(conv if conv is not None else nn.Identity())
            if not self.projected:  # this layer's columns of the mean, as (h_l, s_h, w_l, s_w, 1, k_l)
                k = channels[layer] if local is None else len(local)
                block = mean_grid[..., column: column + k].reshape(h_l, steps[0], w_l, steps[1], 1, k)
                self.register_buffer(f"mean_{i}", block.contiguous())
        if self.projected:
            self.register_buffer("mean_grid", mean_grid.contiguous())

    def deltas(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The backbone's maps -> embedding minus mean, (P, B, d), patch-major."""
        parts = []
        total = None
        for i, ((layer, (s_h, s_w)), reduce) in enumerate(zip(self.layers, self.reduce)):
            part = reduce(feature_maps[layer]).permute(2, 3, 0, 1)  # (h_l, w_l, B, k_l): k_l channels transposed
            h_l, w_l, batch, k = part.shape
            if not self.projected:
                delta = part[:, None, :, None] - getattr(self, f"mean_{i}")  # upsampling and centring in one op
                parts.append(delta.reshape(self.grid[0] * self.grid[1], batch, k))
            elif total is None:
                total = part[:, None, :, None].expand(h_l, s_h, w_l, s_w, batch, k).reshape(*self.grid, batch, k)
            else:
                total = (total.reshape(h_l, s_h, w_l, s_w, batch, k) + part[:, None, :, None]).reshape(
                    *self.grid, batch, k)
        if self.projected:
            delta = total - self.mean_grid  # (h, w, B, d)
            return delta.reshape(self.grid[0] * self.grid[1], delta.shape[2], delta.shape[3])
        return torch.cat(parts, dim=2)

    def scored(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> maps (B, H, W), before the ignore mask, and the embeddings minus the mean, (P, B, d)."""
        embedder = self.normalising[0]
        x = embedder.centred(pixels) if self.folded else embedder.normalise(pixels)  # (B, 3, H, W)
        delta = self.deltas(self.extractor(x))  # (P, B, d)
        whitened = torch.matmul(delta, self.factor.transpose(1, 2))  # (P, B, d): W (x - mean) per patch
        distances = torch.linalg.vector_norm(whitened, dim=2).T  # (B, P)
        return self.rows @ distances.unflatten(1, self.grid) @ self.cols_t, delta  # (B, H, W)
