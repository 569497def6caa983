"""Fit statistics as a first-class object: the sums a PaDiM fit is made of, saved, loaded, merged and
finalised into a model.

Why: per patch position, a fit is a count, a sum of embeddings and a sum of their outer products.
Sums merge exactly, so statistics computed apart (another day's images, another machine's shard)
add up to the statistics of all the images together, and finalising them gives the model a single
fit on the union would give. This module holds what makes such sums meaningful together:

- ``accumulator``: a ``padim.core.gaussian.GaussianAccumulator`` (count; float64 ``shift`` (P, d), ``sum``
  (P, d) of x - shift, lower triangles (P, d (d + 1) / 2) of sum (x - shift)(x - shift)^T in blocks);
  and the fourth-moment sums ``cubic`` (P, d) and ``quartic`` (P,) for the Ledoit-Wolf shrinkage;
- ``channel_idx`` (k,), ``projection`` (k, d) or None (see ``padim.core.features.make_reduction``) and
  ``feature_hw`` (h, w), P = h * w;
- ``config``: the ``PadimConfig`` they were computed with, and the backbone weights' source and
  SHA-256: statistics of another backbone, weights file, layer set, reduction, d, seed, image size,
  crop or normalisation describe other features, and merging them is refused (``check_compatible``);
- ``covers``: which images the sums are of, in words (with a calibration hold-out, the images the
  Gaussians were fitted on: not the held-out ones), and ``history``, one entry per contribution.

Files: safetensors + a JSON header through ``padim.files.safetensors_io`` (no pickle, atomic, with the same SHA-256
checksum as model files), marked ``"kind": "padim-statistics"``; loading checks every shape against
the configuration and every value for finiteness. Size: P x (d + d + d (d + 1) / 2) float64, e.g.
resnet18, d = 100 at 256 x 256: 4096 x 5250 x 8 B = 172 MB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

import torch

from padim.files import safetensors_io as model_io
from padim.settings.config import PadimConfig
from padim.errors import ModelFileError, PadimError
from padim.core.gaussian import GaussianAccumulator

KIND = "padim-statistics"
# PadimConfig fields that change the embeddings themselves: statistics differing in any cannot merge.
# (sigma, epsilon, factor_dtype and covariance act only when a model is made from the sums.)
FEATURE_FIELDS = ("backbone", "weights", "layers", "n_features", "seed", "image_size", "crop", "mean", "std",
                  "reduction", "tile", "tile_overlap", "tile_statistics")
_OUTER = re.compile(r"outer\.(\d{5})")


class StatisticsMismatchError(PadimError):
    """Two statistics (or statistics and a model) come from different configurations or images."""


class StatisticsFileError(ModelFileError):
    """A statistics file is missing, damaged, or not padim statistics."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class FitStatistics:
    """The sums of one or more partial fits, with what they belong to (see the module docstring)."""

    config: PadimConfig
    channel_idx: torch.Tensor  # (d,) int64
    feature_hw: Tuple[int, int]
    accumulator: GaussianAccumulator
    weights_source: Optional[str] = None
    weights_sha256: Optional[str] = None  # of the weights file, for models fitted with one
    covers: str = ""
    history: List[Dict[str, Any]] = field(default_factory=list)
    projection: Optional[torch.Tensor] = None  # (k, d) float32 with reduction "semi-orthogonal"

    @property
    def count(self) -> int:
        """Number of samples the sums are over: images, or tiles with shared tile statistics (every
        tile of every image is a sample of the same Gaussians; see ``n_images``)."""
        return self.accumulator.count

    @property
    def n_images(self) -> int:
        """Number of images the sums are over: ``count`` / the tiles per image with shared tile
        statistics (``samples_per_image``), else ``count``."""
        return self.accumulator.count // samples_per_image(self.config)

    def mean(self) -> torch.Tensor:
        """(P, d) float64 mean embedding per position (cheap: no covariance)."""
        return self.accumulator.mean()

    def to(self, device) -> "FitStatistics":
        """The same statistics with their sums on ``device`` (self when already there)."""
        acc = self.accumulator
        if acc.sum is None or acc.sum.device == torch.device(device):
            return self
        moved = GaussianAccumulator.from_sums(acc.count, acc.shift.to(device), acc.sum.to(device),
                                              [block.to(device) for block in acc.outer], acc.chunk,
                                              *_fourth(acc, lambda t: t.to(device)))
        return replace(self, accumulator=moved)

    # ------------------------------------------------------------------------------------- merging
    def check_compatible(self, other: "FitStatistics", what: str = "statistics") -> None:
        """Refuses, in one line naming the first differing field, statistics of other features."""
        mine, theirs = self.config.to_dict(), other.config.to_dict()
        for name in FEATURE_FIELDS:
            if name == "weights" and (self.weights_sha256 or other.weights_sha256):
                if self.weights_sha256 != other.weights_sha256:
                    raise StatisticsMismatchError(
                        f"cannot combine {what} of different configurations: weights file sha256 "
                        f"{str(self.weights_sha256)[:16]} vs {str(other.weights_sha256)[:16]}")
                continue
            if mine[name] != theirs[name]:
                raise StatisticsMismatchError(f"cannot combine {what} of different configurations: "
                                              f"{name} {_show(mine[name])} vs {_show(theirs[name])}")
        if not self.weights_sha256 and self.weights_source != other.weights_source:
            raise StatisticsMismatchError(f"cannot combine {what} of different configurations: weights "
                                          f"{self.weights_source!r} vs {other.weights_source!r}")
        if tuple(self.feature_hw) != tuple(other.feature_hw):
            raise StatisticsMismatchError(f"cannot combine {what}: feature grids {tuple(self.feature_hw)} "
                                          f"vs {tuple(other.feature_hw)}")
        if not torch.equal(self.channel_idx.cpu(), other.channel_idx.cpu()):
            raise StatisticsMismatchError(f"cannot combine {what}: their channel subsets differ")
        if (self.projection is None) != (other.projection is None) or (
                self.projection is not None and not torch.equal(self.projection.cpu(), other.projection.cpu())):
            raise StatisticsMismatchError(f"cannot combine {what}: their projections differ")

    def merge(self, other: "FitStatistics") -> "FitStatistics":
        """The statistics of both sets of images (which must be disjoint: an image given twice counts
        twice). Exact: ``other``'s sums are re-centred onto this shift in float64, then added. A new
        object, sharing nothing writable with either; sigma, epsilon and factor dtype are this one's."""
        self.check_compatible(other)
        merged = self.accumulator.merged(other.accumulator)
        if merged is self.accumulator or merged is other.accumulator:  # one side was empty
            merged = GaussianAccumulator.from_sums(merged.count, merged.shift.clone(), merged.sum.clone(),
                                                   [block.clone() for block in merged.outer], merged.chunk,
                                                   *_fourth(merged, torch.clone))
        covers = "; ".join(text for text in (self.covers, other.covers) if text)
        return replace(self, accumulator=merged, covers=covers, history=self.history + other.history)

    # ----------------------------------------------------------------------------------- finalising
    def finalize(self, dtype: torch.dtype = torch.float32, epsilon: Optional[float] = None,
                 release=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P, d) float64 mean and (P, d (d + 1) / 2) packed factor in ``dtype`` (see
        ``GaussianAccumulator.finalize``; the configuration's covariance estimate), keeping the sums.
        ``PaDiM`` calls this to make a model (``PaDiM.from_statistics(statistics)`` makes one)."""
        if self.count < 2:
            raise PadimError(f"statistics of {self.count} image(s): a covariance needs at least 2")
        try:
            return self.accumulator.finalize(self.config.epsilon if epsilon is None else epsilon, dtype,
                                             release=release, keep=True, covariance=self.config.covariance)
        except torch.linalg.LinAlgError:
            raise StatisticsFileError("these statistics do not give a positive definite covariance "
                                      "(damaged, or made of something other than embeddings)") from None

    # ------------------------------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Writes the statistics atomically: safetensors tensors (``shift``, ``sum``, ``outer.NNNNN``
        per block of positions, ``cubic``, ``quartic``, ``channel_idx``, ``projection`` when there is
        one) and a JSON header (kind, count, config, grid, weights, covers, history) with a SHA-256
        checksum, through ``padim.files.safetensors_io``."""
        acc = self.accumulator
        if acc.sum is None:
            raise PadimError("these statistics hold no image yet")
        tensors = {"shift": acc.shift, "sum": acc.sum, "channel_idx": self.channel_idx.to(torch.int64)}
        tensors.update({f"outer.{i:05d}": block for i, block in enumerate(acc.outer)})
        if acc.has_fourth_moments:
            tensors.update(cubic=acc.cubic, quartic=acc.quartic)
        if self.projection is not None:
            tensors["projection"] = self.projection.to(torch.float32)
        from padim.version import __version__

        metadata = {"kind": KIND, "count": int(acc.count), "config": self.config.to_dict(),
                    "feature_hw": list(self.feature_hw), "weights_source": self.weights_source,
                    "weights_sha256": self.weights_sha256, "covers": self.covers, "history": self.history,
                    "package_version": __version__}
        try:
            model_io.save(path, tensors, metadata)
        except ModelFileError as exc:
            raise StatisticsFileError(_statistics_text(exc)) from None

    @classmethod
    def load(cls, path, device: str = "cpu") -> "FitStatistics":
        """Reads and checks a statistics file: checksum, kind, configuration, every tensor's shape
        and dtype against it, finiteness; StatisticsFileError (one line) otherwise."""
        try:
            tensors, meta = model_io.load(path, {"shift": 2, "sum": 2, "channel_idx": 1})
        except StatisticsFileError:
            raise
        except ModelFileError as exc:
            raise StatisticsFileError(_statistics_text(exc)) from None
        if meta.get("kind") != KIND:
            raise StatisticsFileError(f"{path} is not a padim statistics file (a model file? pass it as `model`)")
        from padim.settings.options import config_layout
        from padim.settings.validation import validate_config_dict

        def refuse(reason: str):
            raise StatisticsFileError(f"statistics file {path}: {reason}")

        try:
            config = validate_config_dict(meta.get("config"), f"statistics file {path}")
        except ModelFileError as exc:
            raise StatisticsFileError(str(exc)) from None
        layout = config_layout(config)
        if meta.get("feature_hw") != list(layout.grid):
            refuse(f"feature grid {meta.get('feature_hw')!r} does not match {config.backbone} at "
                   f"{config.input_size[0]}x{config.input_size[1]} ({layout.grid[0]}x{layout.grid[1]})")
        n_pos, d = layout.grid[0] * layout.grid[1], config.n_features
        count = meta.get("count")
        if type(count) is not int or count < 1 or count % samples_per_image(config):
            refuse(f"count must be a whole number >= 1 (a multiple of the {samples_per_image(config)} tiles per "
                   f"image with shared tile statistics), got {count!r}")
        for name in ("shift", "sum"):
            if tuple(tensors[name].shape) != (n_pos, d) or tensors[name].dtype != torch.float64:
                refuse(f"tensor {name!r} is {tensors[name].dtype} {tuple(tensors[name].shape)}, expected float64 "
                       f"{(n_pos, d)} for {config.backbone} d={d}")
        idx = tensors["channel_idx"]
        k = layout.channels if config.reduction == "semi-orthogonal" else d
        if tuple(idx.shape) != (k,) or idx.dtype != torch.int64 or bool((idx[1:] <= idx[:-1]).any()) \
                or int(idx[0]) < 0 or int(idx[-1]) >= layout.channels:
            refuse(f"channel_idx must be {k} increasing int64 indices within 0..{layout.channels - 1}")
        try:
            projection = model_io.check_projection(tensors.get("projection"), config, k)
        except ModelFileError as exc:
            refuse(str(exc))
        optional = [name for name in ("cubic", "quartic", "projection") if name in tensors]
        names = sorted(name for name in tensors if _OUTER.fullmatch(name))
        if [int(_OUTER.fullmatch(n).group(1)) for n in names] != list(range(len(names))) or \
                len(names) + 3 + len(optional) != len(tensors):
            refuse(f"unexpected tensors {sorted(tensors)[:8]}")
        fourth = [tensors.get("cubic"), tensors.get("quartic")]
        if (fourth[0] is None) != (fourth[1] is None):
            refuse("it holds only one of the fourth-moment sums cubic and quartic")
        if fourth[0] is not None and (tuple(fourth[0].shape) != (n_pos, d) or tuple(fourth[1].shape) != (n_pos,)
                                      or fourth[0].dtype != torch.float64 or fourth[1].dtype != torch.float64):
            refuse(f"its fourth-moment sums must be float64 {(n_pos, d)} and {(n_pos,)}")
        blocks = [tensors[name] for name in names]
        width = d * (d + 1) // 2
        if (not blocks or any(b.dtype != torch.float64 or b.dim() != 2 or b.shape[1] != width for b in blocks)
                or sum(len(b) for b in blocks) != n_pos or any(len(b) != len(blocks[0]) for b in blocks[:-1])
                or len(blocks[-1]) > len(blocks[0])):
            refuse(f"its outer-product blocks do not tile {n_pos} positions x {width} float64")
        checked = [("shift", tensors["shift"]), ("sum", tensors["sum"])] + list(zip(names, blocks))
        checked += [(name, tensors[name]) for name in ("cubic", "quartic") if name in tensors]
        for name, tensor in checked:
            if not bool(torch.isfinite(tensor).all()):
                refuse(f"tensor {name!r} holds NaN or infinite values")
        sha = meta.get("weights_sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            refuse(f"weights_sha256 must be 64 hexadecimal digits, got {sha!r}")
        for key in ("weights_source", "covers"):
            if not (meta.get(key) is None or isinstance(meta.get(key), str)):
                refuse(f"{key} must be text or null")
        if not isinstance(meta.get("history", []), list):
            refuse("history must be a list")
        accumulator = GaussianAccumulator.from_sums(count, tensors["shift"].to(device), tensors["sum"].to(device),
                                                    [b.to(device) for b in blocks], None,
                                                    *[None if t is None else t.to(device) for t in fourth])
        return cls(config, idx, tuple(layout.grid), accumulator, meta.get("weights_source"), sha,
                   meta.get("covers") or "", list(meta.get("history", [])), projection)


def samples_per_image(config) -> int:
    """What one image adds to a ``FitStatistics``' count: its T tiles with shared tile statistics
    (``padim.settings.tile_geometry.n_tiles``), else 1 (per-position tiles are stacked into one sample)."""
    if config.tile is None or config.tile_statistics != "shared":
        return 1
    from padim.settings.tile_geometry import n_tiles

    return n_tiles(config)


def _fourth(accumulator: GaussianAccumulator, apply) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``apply`` to the accumulator's fourth-moment sums (cubic, quartic), or (None, None)."""
    if not accumulator.has_fourth_moments:
        return None, None
    return apply(accumulator.cubic), apply(accumulator.quartic)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if all(isinstance(v, str) for v in value) else "x".join(map(str, value))
    return str(value)


def _statistics_text(exc: Exception) -> str:
    """padim.files.safetensors_io says "model file"; these are statistics files."""
    return str(exc).replace("model file", "statistics file").replace("not a padim model", "not padim statistics")


def statistics_like(model) -> FitStatistics:
    """An empty ``FitStatistics`` with a fitted model's configuration, channels, grid and weights:
    what statistics must match to belong to it (see ``PaDiM.attach_statistics``)."""
    projection = None if model.projection_ is None else model.projection_.cpu()
    return FitStatistics(model.config_, model.channel_idx_.cpu(), tuple(model.feature_hw_), GaussianAccumulator(),
                         model.weights_source_, model.weights_sha256_, projection=projection)
