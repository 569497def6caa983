"""Pixels -> PaDiM embeddings: the one place where a picture becomes features, for a fit and for
scoring alike.

Why one module: the normalisation, the ignore mask and the tiles were applied by the fit and by the
scorer separately, and two copies drift (a fit that normalises a little differently from the scorer
moves every score). ``PatchEmbedder`` is what ``core.fitting`` streams into the Gaussians and what
``core.scorer.PatchScorer`` scores; export traces it inside the scorer.

Shapes: B pictures, (H, W) the model's input size, T tiles of S x S, (h, w) layer1's grid of what
the backbone sees (a picture, or a tile), d channels.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from padim.core.features import CPU_FORWARD_CHUNK, cpu_chunk, embed, layer_plan
from padim.core.tiling import cut
from padim.files.memory import Workspace


class PatchEmbedder(nn.Module):
    """uint8 pixels (B, H, W, 3), already resized to the model's input and on the module's device ->
    embeddings as the Gaussians see them: (B, h, w, d); tiled, per position (B, T h, w, d) (each
    picture's tiles stacked along the height) or shared (B T, h, w, d) (every tile a sample).

    Steps: ImageNet normalisation -> ignored pixels set to 0 (the ImageNet mean colour: what is in
    the ignore region never reaches the backbone) -> tiles cut (``core.tiling``) -> the frozen
    backbone prefix -> ``features.embed`` (the kept channels or the projection of every layer on
    layer1's grid).

    Eagerly the backbone sees at most ``CPU_FORWARD_CHUNK`` pictures (``cpu_chunk`` tiles) at a time
    on the CPU, and the result lives in a reused ``Workspace`` buffer (the caller uses or copies it
    before the next call); with ``plain`` set (inside ``PatchScorer.tracing``) neither: plain
    operations with a dynamic batch, for torch.export.

    extractor: (B, 3, S, S) -> list of (B, C_l, h_l, w_l); channel_idx: (k,) int64 sorted; projection:
    (k, d) or None; tiles: a ``core.tiling.TileLayout`` or None; ignore: (H, W) bool or None.
    """

    def __init__(self, extractor: nn.Module, channel_idx: torch.Tensor, projection: Optional[torch.Tensor],
                 input_size: Tuple[int, int], rgb_mean: Sequence[float], rgb_std: Sequence[float], tiles=None,
                 ignore: Optional[torch.Tensor] = None):
        super().__init__()
        device = channel_idx.device
        self.extractor = extractor
        self.input_size, self.tiles = tuple(input_size), tiles
        # (H, W) 1 where pixels count, 0 where they never do (the model's ignore mask); None: all count
        self.register_buffer("keep", None if ignore is None else (~torch.as_tensor(ignore).bool()).float().to(device))
        std = torch.tensor(rgb_std, dtype=torch.float32, device=device)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 1, 1, 3))
        self.register_buffer("shift", (-torch.tensor(rgb_mean, dtype=torch.float32, device=device) / std).view(1, 1, 1, 3))
        self.register_buffer("channel_idx", channel_idx)
        self.register_buffer("projection", projection)
        self.d = len(channel_idx) if projection is None else projection.shape[1]
        self.plan = None  # where each layer's kept channels go: from the first batch's maps (layer_plan)
        self.plain = False  # inside PatchScorer.tracing(): no chunks, no reused buffers
        self._workspace = Workspace()

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def side(self) -> Tuple[int, int]:
        """(height, width) of what the backbone sees: a tile, or the whole input."""
        return self.input_size if self.tiles is None else (self.tiles.tile, self.tiles.tile)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 with the ImageNet mean/std, channels_last
        (a permuted view of the HWC result: no transposing copy); ignored pixels are 0."""
        return self._normalised(pixels, self.keep)

    def _normalised(self, pixels: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        x = (pixels.to(torch.float32) * self.scale + self.shift).permute(0, 3, 1, 2)
        return x if keep is None else x * keep

    def centred(self, pixels: torch.Tensor) -> torch.Tensor:
        """``normalise`` before its per-channel factor: (B, H, W, 3) uint8 -> (B, 3, H, W) pixels minus
        255 x the ImageNet mean, ignored pixels 0 (the lean graph folds the factor into the first
        convolution, see ``core.lean``: zero stays zero, so the ignore region and the padded border
        match the eager path's)."""
        x = (pixels.to(torch.float32) - self.shift / -self.scale).permute(0, 3, 1, 2)
        return x if self.keep is None else x * self.keep

    def layer_maps(self, x: torch.Tensor):
        """(B, 3, S, S) normalised -> the backbone's feature maps, and the plan that reads them."""
        feature_maps = self.extractor(x)
        if self.plan is None:
            self.plan = layer_plan([f.shape[1] for f in feature_maps], self.channel_idx, self.projection)
        return feature_maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pictures or tiles -> (B, h, w, d) embeddings."""
        if self.plain:
            return embed(self.layer_maps(x), self.channel_idx, projection=self.projection, plan=self.plan)
        x = x.contiguous(memory_format=torch.channels_last)
        chunk = len(x) if x.device.type != "cpu" else (CPU_FORWARD_CHUNK if self.tiles is None else cpu_chunk(*self.side))
        out = None
        for start in range(0, len(x), chunk):
            feature_maps = self.layer_maps(x[start : start + chunk])
            if out is None:
                out = self._workspace.get("embeddings", (len(x), *feature_maps[0].shape[-2:], self.d),
                                          feature_maps[0].dtype, x.device)
            embed(feature_maps, self.channel_idx, out=out[start : start + chunk], projection=self.projection,
                  plan=self.plan)
            del feature_maps
        return out

    def tile_groups(self, pixels: torch.Tensor, max_bytes: int):
        """uint8 pixels (B, H, W, 3) of a tiled model -> yields (first tile, boxes, embeddings (B g, h, w,
        d)) for groups of g tiles whose embeddings take at most ``max_bytes`` (at least one tile): what
        a tiled fit and tiled scoring stream, so that memory holds one group's tiles, not all T, and
        never the whole picture in float (each group's tiles are cut from the pixels, then normalised:
        the same numbers as normalising first). The embeddings are a reused buffer: use them before
        the next group."""
        side, n_img = self.tiles.tile, len(pixels)
        grid_bytes = n_img * self.d * 4 * (side // 4) * (side // 4)  # about a tile's h w at layer1, d floats
        group = max(1, min(len(self.tiles), max_bytes // max(1, grid_bytes)))
        for start in range(0, len(self.tiles), group):
            boxes = self.tiles.boxes[start : start + group]
            tiles = cut(pixels.permute(0, 3, 1, 2), boxes, side).permute(0, 2, 3, 1)  # (B g, S, S, 3) uint8 views
            keep = None
            if self.keep is not None:  # (g, 1, S, S) -> (B g, 1, S, S), picture-major as the tiles
                keep = cut(self.keep[None, None], boxes, side).repeat(n_img, 1, 1, 1)
            yield start, boxes, self.features(self._normalised(tiles, keep))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalise(pixels)  # (B, 3, H, W)
        if self.tiles is None:
            return self.features(x)  # (B, h, w, d)
        return self.tiles.embeddings_per_image(self.features(cut(x, self.tiles.boxes, self.tiles.tile)))
