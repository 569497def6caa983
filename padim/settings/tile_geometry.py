"""The geometry of tiles, as arithmetic (torch-free: the runtime and the option checks use it):
where tiles start, how many a picture has, the size a backbone pass sees and the fitted grid.
See ``padim.core.tiling`` for what tiles are for and how their maps are stitched.

How many tiles a geometry makes is counted (``count_tiles``), never listed, and refused above
``MAX_TILES`` (``tile_count_problem``) before anything is built from it: 8192 px pictures in tiles
of 32 px that overlap by 31 are 66 million tiles (5 GB of box tuples before a single pixel).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

TILE_STATISTICS = ("position", "shared")
# tiles per picture at most: 4096 is 64 x 64 tiles (a 14000 px side in tiles of 256 with the default
# overlap); each is a backbone pass per picture, and per-position statistics hold T x P Gaussians
MAX_TILES = 4096


def tiles_along(length: int, tile: int, overlap: int) -> int:
    """``len(tile_starts(length, tile, overlap))``, by arithmetic: the starts 0, S - O, ... up to
    length - S, and one more flush with the end when the stride does not land there."""
    if tile > length:
        raise ValueError(f"tile {tile} is larger than the picture's side {length}")
    stride, span = tile - overlap, length - tile
    return span // stride + 1 + (span % stride != 0)


def count_tiles(size: Tuple[int, int], tile: int, overlap: int) -> int:
    """T, the tiles of a (H, W) picture, counted without listing them."""
    return tiles_along(size[0], tile, overlap) * tiles_along(size[1], tile, overlap)


def tile_count_problem(size: Tuple[int, int], tile: int, overlap: int) -> Optional[str]:
    """Why a valid tile geometry (tile within the picture, 0 <= overlap < tile) cannot be used: more
    than ``MAX_TILES`` tiles per picture; None when it can. Arithmetic only."""
    count = count_tiles(size, tile, overlap)
    if count <= MAX_TILES:
        return None
    return (f"{size[0]}x{size[1]} pictures in tiles of {tile} px overlapping by {overlap} px make {count} tiles per "
            f"picture, more than padim's limit of {MAX_TILES}: use a larger tile, a smaller overlap or a smaller "
            "image size")


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
    return count_tiles(config.input_size, config.tile, config.tile_overlap)


def embed_size(config) -> Tuple[int, int]:
    """What one backbone pass sees: (S, S) with tiles, else the whole input."""
    return (config.tile, config.tile) if config.tile is not None else tuple(config.input_size)


def fitted_grid(config, tile_grid: Tuple[int, int]) -> Tuple[int, int]:
    """The Gaussians' grid: (T h, w) with per-position tiles (the tiles' grids stacked), else (h, w)."""
    if config.tile is None or config.tile_statistics == "shared":
        return tuple(tile_grid)
    return (n_tiles(config) * tile_grid[0], tile_grid[1])


# The written rule for large and long pictures (benchmarks/RESULTS.md, "Large pictures and tiles"):
# tiles when the pictures' long side is more than LONG times the model input's, the aspect ratio kept
# when it is more than ASPECT.
AUTO_LONG, AUTO_ASPECT = 2.0, 1.5


def _multiple_of_4(value: float) -> int:
    """The nearest multiple of 4 px (layer1's stride), halves up; at least 32 (the smallest input)."""
    return max(32, int(value / 4.0 + 0.5) * 4)


def auto_geometry(picture_hw: Tuple[int, int], input_hw: Tuple[int, int]) -> Optional[Tuple[Tuple[int, int], Optional[int]]]:
    """What ``--tile auto`` chooses for pictures of (median) size ``picture_hw`` and a model input of
    ``input_hw`` -> (image size (H, W), tile S or None), or None to keep the input as it is.

    - long side more than 2x the input's: the pictures at their native size (sides rounded to 4 px)
      in tiles of the input's long side (256 px by default; the short side when a picture is thinner);
    - else an aspect ratio above 1.5: no tiles, the short side at the input's short side (at most
      native), the long side at the pictures' aspect (KolektorSDD: 640 x 256 against 256 x 256 gave
      AUPRO 0.511 against 0.296);
    - else None: squeezing to the input loses little."""
    height, width = picture_hw
    long_side, short_side = max(height, width), min(height, width)
    if long_side > AUTO_LONG * max(input_hw):
        size = (_multiple_of_4(height), _multiple_of_4(width))
        return size, min(max(input_hw), min(size))
    if long_side / short_side > AUTO_ASPECT:
        short = min(min(input_hw), short_side)
        scaled = (short * height / short_side, short * width / short_side)
        return (_multiple_of_4(scaled[0]), _multiple_of_4(scaled[1])), None
    return None
