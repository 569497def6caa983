"""The geometry of a fit chosen from its training pictures (``--tile auto``, issue 30), and the
warning a fit gives when its pictures are much larger or longer than the model input.

The rule is ``padim.settings.tile_geometry.auto_geometry`` (the one written in benchmarks/RESULTS.md),
applied to the median height and width of the training pictures (their headers only: nothing is
decoded; at most ``SAMPLE`` pictures, evenly spaced). Pictures given as pixels in memory count as
their array's size.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from padim.errors import PadimError
from padim.files.decode import picture_hw
from padim.settings.tile_geometry import auto_geometry, count_tiles, default_overlap

SAMPLE = 200


def median_size(images: Sequence) -> Tuple[int, int]:
    """(height, width), the median of the pictures' upright sizes."""
    step = max(1, len(images) // SAMPLE)
    sizes = [tuple(np.shape(item)[:2]) if hasattr(item, "shape") else picture_hw(item) for item in images[::step]]
    heights, widths = zip(*sizes)
    return int(np.median(heights)), int(np.median(widths))


def _input(image_size) -> Tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _shown(size: Tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def choose_geometry(images: Sequence, params: dict, note: Callable[[str], None]) -> dict:
    """``params`` of a fit with its geometry settled: ``tile="auto"`` replaced by what the rule chooses
    (said in one line through ``note``), ``tile_statistics`` None by its default (shared for tiles the
    rule chose, else position); without tiles asked for, a warning through ``note`` when the rule
    would tile or keep the aspect."""
    params = dict(params)
    auto, statistics = params.get("tile") == "auto", params.get("tile_statistics")
    input_hw = _input(params.get("image_size", 256))
    if auto or (params.get("tile") is None and params.get("crop") is None):
        try:
            median = median_size(images)
        except PadimError:
            if auto:
                raise
            return {**params, "tile_statistics": statistics or "position"}  # the fit itself says what is wrong
        chosen = auto_geometry(median, input_hw)
        seen = f"the training pictures are {_shown(median)} px (median of {len(images)})"
        if auto:
            params["tile"] = None
            if chosen is None or chosen[1] is None:
                params["tile_overlap"] = None  # no tiles: an overlap asked for has nothing to apply to
            if chosen is None:
                note(f"--tile auto: {seen}, within twice the {_shown(input_hw)} input and not long: no tiles, "
                     f"--image-size {_shown(input_hw)}")
            else:
                params["image_size"], params["tile"] = chosen
                statistics = statistics or ("shared" if params["tile"] else None)
                note(f"--tile auto: {seen}: {describe(chosen, statistics, params.get('tile_overlap'))}")
        elif chosen is not None and chosen[0] != input_hw:
            note(f"warning: {seen}, much {'larger' if chosen[1] else 'longer'} than the {_shown(input_hw)} model "
                 f"input: squeezed to it, small defects can vanish; --tile auto would use "
                 f"{describe(chosen, statistics or 'shared', params.get('tile_overlap'))}")
    params["tile_statistics"] = statistics or "position"
    return params


def describe(chosen, statistics: Optional[str], overlap: Optional[int]) -> str:
    size, tile = chosen
    if tile is None:
        return f"--image-size {_shown(size)} (their aspect), no tiles"
    overlap = default_overlap(tile) if overlap is None else overlap
    return (f"--image-size {_shown(size)} --tile {tile} --tile-statistics {statistics} "
            f"({count_tiles(size, tile, overlap)} tiles per picture)")
