"""The geometry of tiles, as arithmetic (torch-free: the runtime and the option checks use it):
where tiles start, how many a picture has, the size a backbone pass sees and the fitted grid.
See ``padim.core.tiling`` for what tiles are for and how their maps are stitched.
"""

from __future__ import annotations

from typing import List, Tuple

TILE_STATISTICS = ("position", "shared")


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets along one axis: 0, S - O, 2 (S - O), ..., and the last tile flush with the end."""
    if tile > length:
        raise ValueError(f"tile {tile} is larger than the picture's side {length}")
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_boxes(size: Tuple[int, int], tile: int, overlap: int) -> List[Tuple[int, int]]:
    """(top, left) of every tile of a (H, W) picture, row by row."""
    return [(top, left) for top in tile_starts(size[0], tile, overlap) for left in tile_starts(size[1], tile, overlap)]


def default_overlap(tile: int) -> int:
    """An eighth of the tile (32 px for 256): enough for the blur (sigma 4) to fade into a neighbour."""
    return tile // 8


def n_tiles(config) -> int:
    """T for a configuration (1 without tiles)."""
    if config.tile is None:
        return 1
    return len(tile_boxes(config.input_size, config.tile, config.tile_overlap))


def embed_size(config) -> Tuple[int, int]:
    """What one backbone pass sees: (S, S) with tiles, else the whole input."""
    return (config.tile, config.tile) if config.tile is not None else tuple(config.input_size)


def fitted_grid(config, tile_grid: Tuple[int, int]) -> Tuple[int, int]:
    """The Gaussians' grid: (T h, w) with per-position tiles (the tiles' grids stacked), else (h, w)."""
    if config.tile is None or config.tile_statistics == "shared":
        return tuple(tile_grid)
    return (n_tiles(config) * tile_grid[0], tile_grid[1])
