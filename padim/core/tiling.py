"""Tiles: a large picture, at its working resolution (the model's input size, up to native), cut into
overlapping square tiles that the backbone embeds at tile size, and their maps stitched back.

Why: a hairline crack of 0.5 % of a 500 x 1260 picture disappears when the picture is squeezed into
256 x 256; tiles keep every pixel at its own scale. Two ways to model them (``tile_statistics``):
"position": one Gaussian per patch position of every tile (T tiles x P positions: a part whose
layout is fixed, as PaDiM models positions); "shared": one set of P Gaussians that every tile is a
sample of (uniform textures and surfaces: T times the samples, 1 / T of the statistics).

Geometry: tiles of S x S pixels start every S - overlap pixels along each axis, the last one flush
with the far edge, so every pixel is covered and the tile positions depend only on (H, W), S and
the overlap. Maps are stitched with weights that ramp linearly across each overlap (a pixel near a
tile's edge counts less than one near its centre), so seams do not show.

Shapes: B pictures, T tiles, (H, W) the working size, S the tile side, (h, w) a tile's feature grid.
All of it is plain tensor slicing, padding and sums: torch.export traces it (no data-dependent shapes).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from padim.settings.tile_geometry import (TILE_STATISTICS, default_overlap, embed_size, fitted_grid,  # noqa: F401
                                      n_tiles, tile_boxes, tile_starts)


class TileLayout:
    """The tiles of a configuration: ``boxes`` [(top, left)], ``tile`` S, ``size`` (H, W), ``shared``
    statistics or per position, and the stitching weights (``stitch_weights``)."""

    def __init__(self, config):
        self.tile, self.size, self.overlap = config.tile, tuple(config.input_size), config.tile_overlap
        self.boxes = tile_boxes(self.size, self.tile, self.overlap)
        self.shared = config.tile_statistics == "shared"
        self.window, self.inverse_total = stitch_weights(self.size, self.boxes, self.tile, self.overlap)

    def __len__(self) -> int:
        return len(self.boxes)

    def embeddings_per_image(self, emb: torch.Tensor) -> torch.Tensor:
        """(B T, h, w, d) tile embeddings -> what the statistics see: (B T, h, w, d) shared, or
        (B, T h, w, d) per position (each picture's tiles stacked along the height: tile-major)."""
        if self.shared:
            return emb
        return emb.reshape(-1, len(self.boxes) * emb.shape[1], *emb.shape[2:])

    def tile_distances(self, distances: torch.Tensor, tile_grid: Tuple[int, int]) -> torch.Tensor:
        """(B T, P) or (B, T P) patch distances -> (B T, h, w)."""
        return distances.reshape(-1, *tile_grid)


    def tile_grid(self, feature_hw: Tuple[int, int]) -> Tuple[int, int]:
        """A tile's (h, w) from the fitted grid (``fitted_grid``'s inverse)."""
        return tuple(feature_hw) if self.shared else (feature_hw[0] // len(self.boxes), feature_hw[1])


def layout_of(config) -> Optional[TileLayout]:
    return None if config.tile is None else TileLayout(config)


def cut(x: torch.Tensor, boxes, tile: int) -> torch.Tensor:
    """(B, C, H, W) -> (B T, C, S, S), tile-major within each picture (picture 0's tiles first)."""
    tiles = [x[:, :, top : top + tile, left : left + tile] for top, left in boxes]
    return torch.stack(tiles, dim=1).flatten(0, 1)


@lru_cache(maxsize=8)
def _ramp(tile: int, overlap: int) -> torch.Tensor:
    """(S,) float64 weights: 1 in the middle, falling linearly to 1 / (O + 1) at the edges."""
    x = torch.arange(tile, dtype=torch.float64)
    edge = torch.minimum(x + 1, tile - x) / (overlap + 1)
    return edge.clamp(max=1.0)


def stitch_weights(size: Tuple[int, int], boxes, tile: int, overlap: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S, S) weight of a tile's pixels and (H, W) the inverse of their sum over all tiles, float32."""
    ramp = _ramp(tile, overlap)
    window = ramp[:, None] * ramp[None, :]
    total = torch.zeros(size, dtype=torch.float64)
    for top, left in boxes:
        total[top : top + tile, left : left + tile] += window
    return window.float(), (1.0 / total).float()


def stitch(maps: torch.Tensor, boxes, size: Tuple[int, int], window: torch.Tensor,
           inverse_total: torch.Tensor) -> torch.Tensor:
    """(B T, S, S) tile maps -> (B, H, W): each tile's map weighted by ``window``, placed by padding,
    summed, and divided by the weights' sum (``inverse_total``): a weighted mean where tiles overlap."""
    n_boxes, tile = len(boxes), maps.shape[-1]
    maps = (maps * window).unflatten(0, (-1, n_boxes))  # (B, T, S, S)
    out: Optional[torch.Tensor] = None
    for index, (top, left) in enumerate(boxes):
        placed = F.pad(maps[:, index], (left, size[1] - left - tile, top, size[0] - top - tile))
        out = placed if out is None else out + placed
    return out * inverse_total
