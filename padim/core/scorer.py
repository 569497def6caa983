"""PaDiM's test step as one torch module: what the torch engine runs and what export traces.

Why one module: a second implementation of the scoring path for export (or for the service) is a
second thing to keep equal. ``PatchScorer.forward`` is the only place pixels become scores; the
torch engine calls it eagerly, ``padim.deploy.export`` traces the same module into ONNX.

Shapes: B images, (H, W) the model's input size, (h, w) layer1's grid, P = h * w, d channels.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from padim.core.embedding import PatchEmbedder
from padim.core.gaussian import mahalanobis, mahalanobis_packed
from padim.core.lean import LeanGraph, fold_input_scale, lean_possible
from padim.core.maps import upsample_blur_matrix
from padim.core.tiling import stitch
from padim.files.memory import Workspace


# at most this many bytes of tile embeddings at once when a tiled model fits or scores eagerly (about 40
# tiles of 256 px at d = 100 for one picture; the Mahalanobis step holds two more of its size): beyond
# it, the tiles are embedded and stitched group by group
TILE_GROUP_BYTES = 64 * 2 ** 20


class PatchScorer(nn.Module):
    """uint8 pixels (B, H, W, 3), already resized to the model's input -> anomaly maps (B, H, W)
    float32 and image scores (B,) float32.

    Steps: ``embedder`` (a ``core.embedding.PatchEmbedder``: normalisation, the ignore mask, tiles,
    the frozen backbone, the kept channels; the fit's own) -> ``gaussian.mahalanobis`` per patch ->
    bilinear upsampling + Gaussian blur (sigma), as two matrix products (``maps``) -> tiles stitched
    (``core.tiling``) -> ignored pixels set to 0 -> the map's maximum.

    The batch-sized temporaries live in a reused ``Workspace``; inside ``tracing()`` they do not,
    so that torch.export sees plain operations with a dynamic batch.

    mean: (P, d); factor: (P, d, d) lower-triangular W, W^T W = cov^-1, or still packed (P, d (d + 1)
    / 2): unpacked block by block (slower, never the whole factor: what scores the held-out images
    inside a fit, whose peak memory it would raise). The tensors are held as buffers, not copied.
    """

    def __init__(self, embedder: PatchEmbedder, mean: torch.Tensor, factor: torch.Tensor,
                 feature_hw: Tuple[int, int], sigma: float):
        super().__init__()
        device = mean.device
        self.embedder = embedder
        self.grid, self.input_size, self.tiles = tuple(feature_hw), embedder.input_size, embedder.tiles
        # each map's grid and size before stitching: a tile's, or the whole input's
        self.map_grid = self.grid if self.tiles is None else self.tiles.tile_grid(self.grid)
        if self.tiles is not None:
            self.register_buffer("window", self.tiles.window.to(device))
            self.register_buffer("inverse_total", self.tiles.inverse_total.to(device))
        self.register_buffer("mean", mean)
        self.register_buffer("factor", factor)
        rows = upsample_blur_matrix(self.map_grid[0], embedder.side[0], float(sigma), torch.float32, device)  # (H, h)
        cols = upsample_blur_matrix(self.map_grid[1], embedder.side[1], float(sigma), torch.float32, device)  # (W, w)
        self.register_buffer("rows", rows.clone())
        self.register_buffer("cols_t", cols.T.contiguous())  # (w, W)
        self._tracing = False
        self._lean: Optional[nn.Module] = None  # the lean graph, inside tracing() only
        self._workspace = Workspace()

    # what export and the int8 graphs read of the embedding step
    extractor = property(lambda self: self.embedder.extractor)
    keep = property(lambda self: self.embedder.keep)
    scale = property(lambda self: self.embedder.scale)
    shift = property(lambda self: self.embedder.shift)
    plan = property(lambda self: self.embedder.plan)

    @contextlib.contextmanager
    def tracing(self, lean: bool = True):
        """No chunking, no reused buffers: plain operations for torch.export (same numbers). With
        ``lean`` (whole-factor grids, no tiles), the lean graph of ``padim.core.lean``: the
        normalisation's factor folded into the first convolution, the channel subset as 1 x 1
        convolutions, one patch-major layout change per layer; else the eager path's own plain
        operations."""
        with torch.inference_mode():  # shapes from a real pass now: a traced graph must not compute them
            dummy = torch.zeros(1, 3, *self.embedder.side, device=self.mean.device)
            feature_maps = self.embedder.layer_maps(dummy.contiguous(memory_format=torch.channels_last))
        grids = [tuple(f.shape[-2:]) for f in feature_maps]
        if lean and self.tiles is None and self.factor.dim() == 3 and lean_possible(self.grid, grids):
            folded = fold_input_scale(self.extractor, self.scale.view(3))
            self._lean = LeanGraph(folded if folded is not None else self.extractor, self.embedder, folded is not None,
                                   grids, [f.shape[1] for f in feature_maps], self.grid, self.mean, self.factor,
                                   self.rows, self.cols_t).eval()
        self._tracing = self.embedder.plain = True
        try:
            yield self
        finally:
            self._tracing = self.embedder.plain = False
            self._lean = None

    def with_deltas(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inside ``tracing()``: ``forward``'s maps and scores and the embeddings minus the mean,
        (P, B, d) (an int8 export refits its Gaussians on the int8 graph's embeddings)."""
        if self._lean is not None:
            maps, delta = self._lean.scored(pixels)
            return (*self.finish(maps), delta)
        emb = self.embedder(pixels)
        maps, scores = self.score_embeddings(emb)
        return maps, scores, (emb.flatten(1, 2) - self.mean).transpose(0, 1)

    def score_embeddings(self, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embeddings as ``PatchEmbedder`` gives them -> maps (B, H, W) and scores (B,)."""
        if self.factor.dim() == 2:
            distances = mahalanobis_packed(emb.flatten(1, 2), self.mean, self.factor)  # (B, P)
        else:
            distances = mahalanobis(emb.flatten(1, 2), self.mean, self.factor,
                                    None if self._tracing else self._workspace)  # (B, P)
        return self.finish(self.rows @ distances.reshape(-1, *self.map_grid) @ self.cols_t)  # (B, H, W); tiled: (B T, S, S)

    def finish(self, maps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Upsampled maps ((B, H, W), or tiles' (B T, S, S)) -> stitched, ignored pixels 0 (never above a
        threshold, never the maximum) -> maps (B, H, W) and scores (B,), the maps' maxima."""
        if self.tiles is not None:
            maps = stitch(maps, self.tiles.boxes, self.input_size, self.window, self.inverse_total)  # (B, H, W)
        if self.keep is not None:
            maps = maps * self.keep
        return maps, maps.flatten(1).amax(dim=1)

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._lean is not None:
            return self.finish(self._lean.scored(pixels)[0])
        if self.tiles is not None and not self._tracing:
            return self.score_tiles_streamed(pixels)
        return self.score_embeddings(self.embedder(pixels))

    def score_tiles_streamed(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of a tiled model, eagerly, in groups of tiles: each group is cut, embedded,
        scored, upsampled and added into the stitched map in place, so memory holds the map and one
        group's tiles, not every tile's embeddings (a 20-megapixel picture has 425 tiles of 256 px:
        their embeddings alone are 0.7 GB at d = 100), and stitching costs each tile's own pixels
        (a tile placed by padding to the whole picture costs the whole picture per tile). The same
        numbers as the traced path (``score_embeddings`` + ``stitch``) up to float rounding."""
        tiles, (height, width) = self.tiles, self.input_size
        n_img, side, grid = pixels.shape[0], tiles.tile, self.map_grid
        positions = grid[0] * grid[1]
        out = torch.zeros(n_img, height, width, dtype=torch.float32, device=pixels.device)
        for start, boxes, emb in self.embedder.tile_groups(pixels, TILE_GROUP_BYTES):  # emb: (B g, h, w, d)
            if tiles.shared:
                mean, factor, patches = self.mean, self.factor, emb.flatten(1, 2)  # (B g, P, d)
            else:  # each tile's own Gaussians: rows start P .. (start + g) P of the stacked grid
                rows = slice(start * positions, (start + len(boxes)) * positions)
                mean, factor, patches = self.mean[rows], self.factor[rows], emb.reshape(n_img, -1, emb.shape[-1])
            if factor.dim() == 2:
                distances = mahalanobis_packed(patches, mean, factor)
            else:
                distances = mahalanobis(patches, mean, factor, self._workspace)
            maps = (self.rows @ distances.reshape(-1, *grid) @ self.cols_t) * self.window  # (B g, S, S)
            maps = maps.reshape(n_img, len(boxes), side, side)
            for index, (top, left) in enumerate(boxes):
                out[:, top : top + side, left : left + side] += maps[:, index]
            del emb, distances, maps
        out *= self.inverse_total
        if self.keep is not None:
            out *= self.keep
        return out, out.flatten(1).amax(dim=1)


def score_pixels(scorer: PatchScorer, pixels) -> Tuple[np.ndarray, np.ndarray]:
    """(B, H, W, 3) uint8 pixels decoded by ``files.images.load_pixels`` -> scores (B,), maps (B, H, W)
    float32 NumPy arrays: the torch engine, for every caller (a model's ``score_pixels``, a fit's
    held-out images)."""
    with torch.inference_mode():
        maps, scores = scorer(torch.as_tensor(np.asarray(pixels, dtype=np.uint8)).to(scorer.mean.device))
        return scores.cpu().numpy(), maps.cpu().numpy()
