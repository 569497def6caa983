"""PaDiM's test step as one torch module: what the torch engine runs and what export traces.

Why one module: a second implementation of the scoring path for export (or for the service) is a
second thing to keep equal. ``PatchScorer.forward`` is the only place pixels become scores; the
torch engine calls it eagerly, ``padim.deploy.export`` traces the same module into ONNX.

Shapes: B images, (H, W) the model's input size, (h, w) layer1's grid, P = h * w, d channels.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from padim.core.features import CPU_FORWARD_CHUNK, cpu_chunk, embed, layer_plan
from padim.core.gaussian import mahalanobis
from padim.core.lean import LeanGraph, fold_input_scale, lean_possible
from padim.core.maps import upsample_blur_matrix
from padim.files.memory import Workspace
from padim.core.tiling import cut, stitch


class PatchScorer(nn.Module):
    """uint8 pixels (B, H, W, 3), already resized to the model's input -> anomaly maps (B, H, W)
    float32 and image scores (B,) float32.

    Steps: ImageNet normalisation -> the frozen backbone prefix -> ``features.embed`` (the kept
    channels, or the projection, of every layer on layer1's grid) -> ``gaussian.mahalanobis`` per
    patch -> bilinear upsampling + Gaussian blur (sigma), as two matrix products (``maps``) -> the
    map's maximum.

    Eagerly the backbone sees at most ``CPU_FORWARD_CHUNK`` images at a time on the CPU (per image
    as fast as a batch of 32, a quarter of the activations' memory) and the batch-sized
    temporaries live in a reused ``Workspace``; inside ``tracing()`` both are off, so that
    torch.export sees plain operations with a dynamic batch.

    extractor: (B, 3, H, W) -> list of (B, C_l, h_l, w_l); channel_idx: (k,) int64 sorted;
    projection: (k, d) or None; mean: (P, d); factor: (P, d, d) lower-triangular W, W^T W = cov^-1.
    The tensors are held as buffers, not copied (the estimator's own tensors). tiles: the model's
    ``padim.core.tiling.TileLayout`` (None: one pass per picture); ignore: (H, W) bool, pixels that
    never count (their map is 0).
    """

    def __init__(self, extractor: nn.Module, channel_idx: torch.Tensor, projection: Optional[torch.Tensor],
                 mean: torch.Tensor, factor: torch.Tensor, feature_hw: Tuple[int, int], input_size: Tuple[int, int],
                 sigma: float, rgb_mean: Sequence[float], rgb_std: Sequence[float], tiles=None,
                 ignore: Optional[torch.Tensor] = None):
        super().__init__()
        device = mean.device
        self.extractor = extractor
        self.grid, self.input_size = tuple(feature_hw), tuple(input_size)
        self.tiles = tiles  # a padim.core.tiling.TileLayout, or None
        # (H, W) 1 where pixels count, 0 where they never do (the model's ignore mask); None: all count
        self.register_buffer("keep", None if ignore is None else (~ignore.bool()).float().to(device))
        # each map's grid and size before stitching: a tile's, or the whole input's
        self.map_grid = self.grid if tiles is None else tiles.tile_grid(self.grid)
        map_size = self.input_size if tiles is None else (tiles.tile, tiles.tile)
        if tiles is not None:
            self.register_buffer("window", tiles.window.to(device))
            self.register_buffer("inverse_total", tiles.inverse_total.to(device))
        std = torch.tensor(rgb_std, dtype=torch.float32, device=device)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 1, 1, 3))
        self.register_buffer("shift", (-torch.tensor(rgb_mean, dtype=torch.float32, device=device) / std).view(1, 1, 1, 3))
        self.register_buffer("channel_idx", channel_idx)
        self.register_buffer("projection", projection)
        self.register_buffer("mean", mean)
        self.register_buffer("factor", factor)
        rows = upsample_blur_matrix(self.map_grid[0], map_size[0], float(sigma), torch.float32, device)  # (H, h)
        cols = upsample_blur_matrix(self.map_grid[1], map_size[1], float(sigma), torch.float32, device)  # (W, w)
        self.register_buffer("rows", rows.clone())
        self.register_buffer("cols_t", cols.T.contiguous())  # (w, W)
        self.plan = None  # where each layer's kept channels go: from the first batch's maps (layer_plan)
        self.d = len(channel_idx) if projection is None else projection.shape[1]
        self._tracing = False
        self._lean: Optional[nn.Module] = None  # the lean graph, inside tracing() only
        self._workspace = Workspace()

    @contextlib.contextmanager
    def tracing(self, lean: bool = True):
        """No chunking, no reused buffers: plain operations for torch.export (same numbers). With
        ``lean`` (whole-factor grids, no tiles), the lean graph of ``padim.core.lean``: the
        normalisation's factor folded into the first convolution, the channel subset as 1 x 1
        convolutions, one patch-major layout change per layer; else the eager path's own plain
        operations."""
        with torch.inference_mode():  # shapes from a real pass now: a traced graph must not compute them
            side = self.input_size if self.tiles is None else (self.tiles.tile, self.tiles.tile)
            dummy = torch.zeros(1, 3, *side, device=self.mean.device)
            feature_maps = self.extractor(dummy.contiguous(memory_format=torch.channels_last))
        self._plan_for(feature_maps)
        grids = [tuple(f.shape[-2:]) for f in feature_maps]
        if lean and self.tiles is None and lean_possible(self.grid, grids):
            folded = fold_input_scale(self.extractor, self.scale.view(3))
            offset = None if folded is None else (-self.shift / self.scale)  # 255 * mean, (1, 1, 1, 3)
            self._lean = LeanGraph(folded if folded is not None else self.extractor, self.plan, grids,
                                   [f.shape[1] for f in feature_maps], self.grid, self.mean, self.factor,
                                   self.rows, self.cols_t, offset, self.scale, self.shift, self.keep).eval()
        self._tracing = True
        try:
            yield self
        finally:
            self._tracing = False
            self._lean = None

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 with the ImageNet mean/std, channels_last
        (a permuted view of the HWC result: no transposing copy). Ignored pixels become 0 (the
        ImageNet mean colour): what is inside the region never reaches the backbone."""
        x = (pixels.to(torch.float32) * self.scale + self.shift).permute(0, 3, 1, 2)
        return x if self.keep is None else x * self.keep

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, h, w, d) embeddings."""
        if self._tracing:
            return embed(self.extractor(x), self.channel_idx, projection=self.projection, plan=self.plan)
        x = x.contiguous(memory_format=torch.channels_last)
        chunk = (CPU_FORWARD_CHUNK if self.tiles is None else cpu_chunk(*x.shape[-2:])) if x.device.type == "cpu" \
            else len(x)
        out = None
        for start in range(0, len(x), chunk):
            feature_maps = self.extractor(x[start : start + chunk])
            self._plan_for(feature_maps)
            if out is None:
                out = self._workspace.get("embeddings", (len(x), *self.map_grid, self.d), feature_maps[0].dtype,
                                          x.device)
            embed(feature_maps, self.channel_idx, out=out[start : start + chunk], projection=self.projection,
                  plan=self.plan)
            del feature_maps
        return out

    def _plan_for(self, feature_maps) -> None:
        if self.plan is None:
            self.plan = layer_plan([f.shape[1] for f in feature_maps], self.channel_idx, self.projection)

    def _embedded(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, h, w, d) embeddings; tiled: per position, (B, T h, w, d)."""
        x = self.normalise(pixels)  # (B, 3, H, W)
        if self.tiles is not None:
            x = cut(x, self.tiles.boxes, self.tiles.tile)  # (B T, 3, S, S)
        emb = self.embeddings(x)  # (B, h, w, d); tiled: (B T, h, w, d)
        return emb if self.tiles is None else self.tiles.embeddings_per_image(emb)

    def with_deltas(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inside ``tracing()``: ``forward``'s maps and scores and the embeddings minus the mean,
        (P, B, d) (an int8 export refits its Gaussians on the int8 graph's embeddings)."""
        if self._lean is not None:
            return self._lean.scored(pixels)
        maps, scores = self.forward(pixels)
        delta = self._embedded(pixels).flatten(1, 2) - self.mean  # (B, P, d)
        return maps, scores, delta.transpose(0, 1)

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._tracing and self._lean is not None:
            return self._lean(pixels)
        emb = self._embedded(pixels)  # (B, h, w, d); tiled: per position, (B, T h, w, d)
        workspace = None if self._tracing else self._workspace
        distances = mahalanobis(emb.flatten(1, 2), self.mean, self.factor, workspace)  # (B, P)
        maps = self.rows @ distances.reshape(-1, *self.map_grid) @ self.cols_t  # (B, H, W); tiled: (B T, S, S)
        if self.tiles is not None:
            maps = stitch(maps, self.tiles.boxes, self.input_size, self.window, self.inverse_total)  # (B, H, W)
        if self.keep is not None:
            maps = maps * self.keep  # ignored pixels are 0: never above a threshold, never the maximum
        return maps, maps.flatten(1).amax(dim=1)
