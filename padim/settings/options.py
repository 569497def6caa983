"""Parameter checks that run before any work: a mistake in an option costs one line and no time.

Arithmetic on the options only (no image read, no network built): the known backbones' channels and
strides are a table (``padim.settings.backbone_table``, checked against the real networks in the tests), so ``n_features``
5000 or statistics beyond the free memory are refused in milliseconds, not after minutes of work.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from padim.settings.backbone_table import entry, is_weights_file
from padim.settings.config import COVARIANCES, REDUCTIONS, PadimConfig
from padim.settings.tile_geometry import count_tiles, embed_size, fitted_grid, tile_count_problem
from padim.errors import PadimError

# Seeds torch's generators accept (torch.Generator().manual_seed, torch.manual_seed).
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 1 << 16

class Layout(NamedTuple):
    """What the chosen layers produce for one input size."""

    channels: int  # total channels of the feature layers (the upper bound of d)
    grid: Tuple[int, int]  # (h, w) of the first layer's map: the patch positions, P = h * w
    stage_elements: int  # elements of every stage output up to the deepest layer, per image


def _halve(n: int, times: int) -> int:
    for _ in range(times):
        n = -(-n // 2)
    return n


def _stages(backbone: str) -> List[Tuple[str, int, int]]:
    return entry(backbone).stages


def feature_layout(backbone: str, layers: Sequence[str], input_size: Tuple[int, int]) -> Layout:
    """Channels and grid of ``layers`` of ``backbone`` for (height, width) inputs, without a network."""
    stages = _stages(backbone)
    names = [name for name, _, _ in stages]
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise PadimError(f"unknown layer(s) {', '.join(map(str, unknown))} for {backbone}; "
                         f"it has {', '.join(names[1:])}")
    if not layers:
        raise PadimError("no feature layers given")
    table = {name: (channels, halvings) for name, channels, halvings in stages}
    channels = sum(table[layer][0] for layer in layers)
    halvings = table[layers[0]][1]
    grid = (_halve(input_size[0], halvings), _halve(input_size[1], halvings))
    deepest = max(names.index(layer) for layer in layers)
    elements = sum(c * _halve(input_size[0], s) * _halve(input_size[1], s) for _, c, s in stages[: deepest + 1])
    return Layout(channels, grid, elements)


# ----------------------------------------------------------------------------------------- options
def config_layout(config) -> Layout:
    layout = feature_layout(config.backbone, config.layers, embed_size(config))  # one pass: a tile's, or all
    return layout._replace(grid=fitted_grid(config, layout.grid))  # the Gaussians' grid


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_batch_size(batch_size) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise PadimError(f"`batch_size` must be a positive whole number, got {batch_size}")


def check_seed(seed) -> None:
    if not _is_int(seed) or not SEED_MIN <= int(seed) <= SEED_MAX:
        raise PadimError(f"`seed` must be a whole number from {SEED_MIN} to {SEED_MAX}, got {seed}")


def pair(size: Union[int, Sequence[int], None], option: str) -> Optional[Tuple[int, int]]:
    """N or (H, W) -> (H, W) of whole numbers, or a PadimError naming ``option``."""
    if size is None:
        return None
    values = (size, size) if _is_int(size) else tuple(size) if isinstance(size, (tuple, list)) else None
    if values is None or len(values) != 2 or not all(_is_int(v) for v in values):
        raise PadimError(f"{option} must be N or HxW whole numbers, got {size!r}")
    return values


def check_sizes(image_size, crop) -> Tuple[Tuple[int, int], Optional[Tuple[int, int]]]:
    """Returns (image_size, crop) as pairs; refuses sides outside 32..65536 and a crop larger than
    the image size."""
    size, crop = pair(image_size, "`image_size`"), pair(crop, "`crop`")
    for option, value in (("`image_size`", size), ("`crop`", crop)):
        if value is not None and not (MIN_IMAGE_SIDE <= min(value) and max(value) <= MAX_IMAGE_SIDE):
            raise PadimError(f"{option} sides must be {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels, got {value}")
    if crop is not None and (crop[0] > size[0] or crop[1] > size[1]):
        raise PadimError(f"`crop` {crop} is larger than the image size {size}")
    return size, crop


def check_n_features(n_features, layout: Layout, layers: Sequence[str]) -> None:
    if not _is_int(n_features) or not 1 <= n_features <= layout.channels:
        raise PadimError(f"`n_features` must be 1 to {layout.channels} (the channels of layers "
                         f"{','.join(layers)}), got {n_features}")


# ----------------------------------------------------------------------------------------- memory
def available_memory(device: str) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` ("cpu" or "cuda"), or None when unknown.

    CPU: MemAvailable from /proc/meminfo (else os.sysconf), lowered to the cgroup limit's headroom
    when the process runs in a container with a memory limit.
    """
    if device == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
    found = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found = min(found, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return found


def fit_memory_estimate(layout: Layout, d: int, input_size: Tuple[int, int], batch_size: int, device: str,
                        factor_bytes: int = 4, tiles: int = 1, shared: bool = False) -> int:
    """A lower bound of the bytes a fit needs at its peak.

    The running sums hold P x d (d + 1) / 2 lower triangles and P x (d + 1) fourth-moment sums in
    float64, the factor as many entries in its storage dtype, plus the backbone's stage outputs for
    one forward pass (8 images at a time on the CPU, the batch on a GPU) in float32 and the batch's
    (B, P, d) embeddings. With T ``tiles`` (``layout``, ``input_size``: a tile's) a forward pass
    sees tiles, and the statistics cover T P positions unless ``shared``."""
    tile_positions = layout.grid[0] * layout.grid[1]
    positions = tile_positions * (1 if shared else tiles)
    triangle = d * (d + 1) // 2
    statistics = positions * triangle * (8 + factor_bytes) + 4 * positions * d * 8 + positions * 8
    per_forward = min(batch_size * tiles, 8) if device == "cpu" else batch_size * tiles
    activations = 4 * per_forward * (layout.stage_elements + 3 * input_size[0] * input_size[1])
    embeddings = 4 * batch_size * tiles * tile_positions * d
    return statistics + activations + embeddings


def _gb(n: float) -> str:  # 1.2 GB, 350 MB
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_fit_memory(backbone: str, layers: Sequence[str], d: int, image_size: Tuple[int, int],
                     crop: Optional[Tuple[int, int]], batch_size: int, device: str, factor_bytes: int = 4,
                     available: Optional[int] = None, tile: Optional[int] = None, tile_overlap: int = 0,
                     shared: bool = False) -> None:
    """Refuses a fit whose statistics and activations cannot fit in ``device``'s free memory, with
    the estimate and the largest image size that would fit (tiles counted: T per picture)."""
    input_size = crop or image_size
    available = available_memory(device) if available is None else available
    if tile is not None:
        tiles = count_tiles(input_size, tile, tile_overlap)  # counted, never listed
        layout = feature_layout(backbone, layers, (tile, tile))
        needed = fit_memory_estimate(layout, d, (tile, tile), batch_size, device, factor_bytes, tiles, shared)
        if available is not None and needed > available:
            raise PadimError(f"a fit of {tiles} tiles of {tile} px per picture with d={d} needs at least "
                             f"{_gb(needed)} of memory but {device} has {_gb(available)} available: use a smaller "
                             "`image_size`, shared tile statistics (`tile_statistics`), or a smaller `n_features`")
        return
    layout = feature_layout(backbone, layers, input_size)
    needed = fit_memory_estimate(layout, d, input_size, batch_size, device, factor_bytes)
    if available is None or needed <= available:
        return
    side = max(input_size)
    suggestion = side
    while suggestion > MIN_IMAGE_SIDE:
        suggestion = max(MIN_IMAGE_SIDE, (suggestion * 3 // 4) // 32 * 32)
        scaled = tuple(max(1, v * suggestion // side) for v in input_size)
        smaller = feature_layout(backbone, layers, scaled)
        if fit_memory_estimate(smaller, d, scaled, batch_size, device, factor_bytes) <= available:
            break
    option = "`crop`" if crop else "`image_size`"
    raise PadimError(
        f"a fit at {input_size[0]}x{input_size[1]} with d={d} needs at least {_gb(needed)} of memory "
        f"({layout.grid[0] * layout.grid[1]} positions x {d}x{d} statistics) but {device} has {_gb(available)} "
        f"available: use a smaller {option} (e.g. {suggestion}) or `n_features`, or a smaller `batch_size`"
    )


def check_blur(sigma, input_size: Tuple[int, int]) -> None:
    """sigma: a finite number > 0 whose blur (radius int(4 sigma + 0.5), reflected borders) fits in
    the map: a radius of at least the map's side cannot be reflected."""
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise PadimError(f"sigma must be a finite number > 0, got {sigma!r}")
    radius = int(4.0 * float(sigma) + 0.5)
    if radius >= min(input_size):
        raise PadimError(f"sigma {sigma} blurs over {radius} pixels, more than the {min(input_size)}-pixel map "
                         f"allows: use sigma below {(min(input_size) - 0.5) / 4:.3g} or a larger image size")


def check_epsilon(epsilon) -> None:
    if not (isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon >= 0):
        raise PadimError(f"epsilon must be a finite number >= 0, got {epsilon!r}")


def check_choice(value, option: str, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise PadimError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def check_fit_options(backbone: str, layers: Optional[Sequence[str]], n_features, image_size, crop, seed,
                      batch_size, factor_dtype: str = "float32", device: Optional[str] = None,
                      sigma=4.0, epsilon=0.01, reduction: str = "random", covariance: str = "fixed",
                      tile=None, tile_overlap=None, tile_statistics: str = "position") -> None:
    """Every option of a fit, before anything is read or built. ``layers``/``n_features`` None take
    the backbone's defaults; ``device`` None is the default device (cuda when available)."""
    spec = entry(backbone)
    check_choice(reduction, "`reduction`", REDUCTIONS)
    check_choice(covariance, "`covariance`", COVARIANCES)
    check_batch_size(batch_size)
    check_seed(seed)
    size, crop = check_sizes(image_size, crop)
    overlap = check_tiles(tile, tile_overlap, tile_statistics, size, crop)
    check_blur(sigma, crop or size if tile is None else (tile, tile))
    check_epsilon(epsilon)
    layers = tuple(layers) if layers else spec.default_layers
    if len(set(layers)) != len(layers):
        raise PadimError(f"`layers` names a layer twice: {','.join(layers)}")
    layout = feature_layout(backbone, layers, crop or size if tile is None else (tile, tile))
    d = spec.default_d if n_features is None else n_features
    check_n_features(d, layout, layers)
    factor_bytes = {"float32": 4, "float16": 2}.get(factor_dtype)
    if factor_bytes is None:
        raise PadimError(f"`factor_dtype` must be float32 or float16, got {factor_dtype!r}")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_fit_memory(backbone, layers, d, size, crop, batch_size, str(device).split(":")[0], factor_bytes, None, tile,
                     overlap, tile_statistics == "shared")


def check_tiles(tile, tile_overlap, tile_statistics: str, size: Tuple[int, int], crop) -> int:
    """Tile options against the picture's working size -> the overlap (default: an eighth of the tile)."""
    if tile is None and tile_overlap not in (None, 0):
        raise PadimError("`tile_overlap` needs `tile`")
    if tile is None:
        return 0
    if not _is_int(tile) or not MIN_IMAGE_SIDE <= tile <= min(size):
        raise PadimError(f"`tile` must be a whole number from {MIN_IMAGE_SIDE} to the image's shorter side "
                         f"({min(size)}), got {tile!r}")
    if crop is not None:
        raise PadimError("`tile` and `crop` do not go together: tiles cover the whole picture")
    overlap = tile // 8 if tile_overlap is None else tile_overlap
    if not _is_int(overlap) or not 0 <= overlap < tile:
        raise PadimError(f"`tile_overlap` must be a whole number from 0 to {tile - 1}, got {overlap!r}")
    if tile_statistics not in ("position", "shared"):
        raise PadimError(f"`tile_statistics` must be position or shared, got {tile_statistics!r}")
    if (problem := tile_count_problem(size, tile, overlap)) is not None:  # arithmetic: nothing listed first
        raise PadimError(f"`tile`/`tile_overlap`: {problem}")
    return int(overlap)


def check_estimator(model) -> None:
    """``check_fit_options`` for a ``PaDiM`` estimator's parameters (called by its ``make_config``)."""
    check_fit_options(model.backbone, model.layers, model.n_features, model.image_size, model.crop, model.seed,
                      model.batch_size, model.factor_dtype, model.device, model.sigma, model.epsilon,
                      model.reduction, model.covariance, model.tile, model.tile_overlap, model.tile_statistics)


def config_from_parameters(model) -> "PadimConfig":
    """An estimator's parameters -> its ``PadimConfig``, after ``check_estimator`` (every parameter
    checked before any work)."""
    check_estimator(model)  # every parameter (d, seed, batch size, sizes, sigma, memory) before any work
    spec = entry(model.backbone)
    image_size, crop = pair(model.image_size, "image_size"), pair(model.crop, "crop")
    weights = str(model.weights)
    if is_weights_file(weights):
        weights = os.path.abspath(weights)  # where it was; a moved model is pointed at it with load(weights=)
    return PadimConfig(
        backbone=model.backbone,
        weights=weights,
        layers=tuple(model.layers) if model.layers else spec.default_layers,
        n_features=model.n_features or spec.default_d,
        image_size=image_size,
        crop=crop,
        seed=int(model.seed),
        sigma=float(model.sigma),
        epsilon=float(model.epsilon),
        factor_dtype=model.factor_dtype,
        reduction=model.reduction,
        covariance=model.covariance,
        tile=None if model.tile is None else int(model.tile),
        tile_overlap=check_tiles(model.tile, model.tile_overlap, model.tile_statistics, image_size, crop),
        tile_statistics=model.tile_statistics,
    )
