"""Fitting on a Ray cluster: shards of images -> statistics -> tree merge -> Cholesky in blocks.

Why this works: per patch position a fit is a count, a sum and a sum of outer products (see
``padim.core.statistics``), and sums merge exactly. So:

1. the training images are cut into ``shards`` contiguous shards; a Ray task per shard runs the
   backbone on its images and returns its sums already cut into ``blocks`` groups of patch positions
   (whole blocks of the accumulator), each its own Ray object;
2. for every group of positions, the shards' sums are merged pairwise in a tree (left to right, so
   the result is taken around shard 0's shift: the first batch's mean, as in a local fit);
3. a task per group computes that group's mean and Cholesky factor (``GaussianAccumulator.finalize``).

The driver only ever holds the finished model (mean and factor); a worker holds one shard's sums
while accumulating, or one group of positions of two shards (and their sum) while merging: memory
per process is bounded whatever the number of shards. Ray's object store holds the groups of the
shards that are finished but not merged yet (the merge tree is submitted up front, so neighbours
merge as soon as both are done, and merged inputs are freed). The model equals the local fit run
with the same number of threads: the same float64 sums, re-centred exactly (float32 convolutions
round differently with other thread counts: about 1e-8 relative on the mean).

Calibration (the default hold-out) is scored on the cluster too, shard by shard, with the same code a
local fit uses (``PaDiM.calibration_scores``). Images and any weights file must be readable at the
same paths on every node (shared storage), as for any Ray job.

Ray moves these objects between our own processes with its own serialisation; model and statistics
files never do (they are safetensors).
"""

from __future__ import annotations

import math
import os
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from padim.cluster.connect import check_task_cpus, connect, cpus_in_cluster, get
from padim.errors import PadimError
from padim.core.gaussian import GaussianAccumulator


# --------------------------------------------------------------------------------- tasks (on workers)
def _estimator(params: dict, threads: int):
    """A CPU ``PaDiM`` with ``params`` inside a worker, using ``threads`` threads (the task's CPUs:
    the worker process is Ray's, not the user's)."""
    from padim.core.estimator import PaDiM

    torch.set_num_threads(max(1, threads))
    return PaDiM(**{**params, "device": "cpu", "progress": False})


def split_positions(acc: GaussianAccumulator, n_groups: int) -> List[GaussianAccumulator]:
    """``acc`` cut into at most ``n_groups`` accumulators of consecutive positions, each holding
    whole blocks of ``acc.chunk`` positions (the blocks themselves are shared, not copied), with
    their slices of the fourth-moment sums when ``acc`` has them."""
    n_blocks = len(acc.outer)
    per_group = math.ceil(n_blocks / max(1, n_groups))
    groups = []
    for first in range(0, n_blocks, per_group):
        blocks = acc.outer[first : first + per_group]
        start = first * acc.chunk
        stop = start + sum(len(b) for b in blocks)
        # clones: a slice sent to another process would carry its whole base tensor with it
        fourth = (acc.cubic[start:stop].clone(), acc.quartic[start:stop].clone()) if acc.has_fourth_moments \
            else (None, None)
        groups.append(GaussianAccumulator.from_sums(acc.count, acc.shift[start:stop].clone(),
                                                    acc.sum[start:stop].clone(), list(blocks), acc.chunk, *fourth))
    return groups


def _shard_statistics(params: dict, paths: Sequence[str], n_groups: int, threads: int,
                      expected: Tuple[str, Optional[str]]):
    """One shard: -> (feature_hw, n_images, group_0, ..., group_{n_groups-1}) (see the module docstring)."""
    model = _estimator(params, threads)
    stats = model.statistics(paths, desc="shard")
    if (stats.weights_source, stats.weights_sha256) != tuple(expected):
        raise PadimError(f"a worker resolved the backbone weights to '{stats.weights_source}', the driver to "
                         f"'{expected[0]}': install the same weights on every node")
    groups = split_positions(stats.accumulator, n_groups)
    groups += [None] * (n_groups - len(groups))
    return (tuple(stats.feature_hw), stats.count, *groups)


def _merge(left: Optional[GaussianAccumulator], right: Optional[GaussianAccumulator]):
    """The sums of both (exact: ``right`` re-centred onto ``left``'s shift in float64). None: a group
    past the last position (more groups asked for than blocks of positions)."""
    return None if left is None else left.merged(right)


def _finalize(group: GaussianAccumulator, epsilon: float, keep: bool, covariance: str = "fixed"):
    """-> (mean (p, d) float64, packed factor (p, T) float32, the sums when ``keep`` else None)."""
    if group is None:
        return None, None, None
    torch.set_num_threads(1)
    mean, packed = group.finalize(epsilon, torch.float32, keep=keep, covariance=covariance)
    return mean, packed, (group if keep else None)


def _held_out_part(params: dict, paths: Sequence[str], mean, packed, feature_hw, threads: int):
    """Held-out good images scored with the fitted Gaussians -> (scores (n,), maps (n, H, W))."""
    return _estimator(params, threads).held_out_scores(paths, mean, packed, feature_hw)


# ------------------------------------------------------------------------------------------ driver
class RayFit:
    """``PaDiM.fit(images, cluster=RayFit(...))``: the statistics, factors and calibration scores of
    a fit computed on a Ray cluster (see the module docstring).

    address: "local", "HOST:PORT", or None (an existing ``ray.init`` connection, else local);
    shards:  image shards (default: the cluster's CPUs / ``cpus_per_shard``);
    groups:  groups of positions merged and factored apart (default: the cluster's CPUs);
    cpus_per_shard: CPUs (and torch threads) each shard task takes;
    log:     receives one line per finished step (progress), or None.
    """

    def __init__(self, address: Optional[str] = None, shards: Optional[int] = None, groups: Optional[int] = None,
                 cpus_per_shard: int = 1, log=None):
        for name, value in (("shards", shards), ("groups", groups), ("cpus_per_shard", cpus_per_shard)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PadimError(f"{name} must be a whole number of at least 1, got {value!r}")
        self.address, self.shards, self.groups, self.cpus_per_shard = address, shards, groups, cpus_per_shard
        self.log = log or (lambda message: None)
        self.seconds = {}

    def _ray(self):
        return connect(self.address)

    @staticmethod
    def _params(model) -> dict:
        """The estimator's parameters for the workers: no device or progress; a weights file's path
        made absolute (workers do not share the driver's working directory)."""
        from padim.settings.backbone_table import is_weights_file

        params = model.get_params()
        for name in ("device", "progress"):
            params.pop(name, None)
        if is_weights_file(params.get("weights")):
            params["weights"] = os.path.abspath(os.fspath(params["weights"]))
        return params

    def statistics_and_factors(self, model, config, images: Sequence, source: str, sha256: Optional[str], keep: bool,
                               cross_fit_images: Optional[Sequence] = None):
        """-> (mean (P, d) float64, packed factor (P, T) float32, merged GaussianAccumulator or None,
        feature_hw, None), as ``padim.core.fitting.LocalFit``'s. ``images`` must be paths (workers read
        them). Cross-fitting (``calibration="cv"``) is not built on a cluster: refused."""
        if cross_fit_images is not None:
            raise PadimError("calibration 'cv' is not available on a cluster yet: use 'holdout' (the default)")
        paths = [_as_path(image) for image in images]
        ray = self._ray()
        check_task_cpus(ray, self.cpus_per_shard, "--cpus-per-shard")
        cpus = cpus_in_cluster(ray)
        n_shards = min(len(paths), self.shards or max(1, cpus // self.cpus_per_shard))
        if len(paths) < 2 * n_shards and n_shards > 1:
            n_shards = max(1, len(paths) // 2)  # a shard of one image is legal but pointless
        n_groups = self.groups or cpus
        params = self._params(model)
        started = time.perf_counter()

        shard_task = ray.remote(num_cpus=self.cpus_per_shard, num_returns=n_groups + 2)(_shard_statistics)
        bounds = np.linspace(0, len(paths), n_shards + 1).round().astype(int)
        shards = [shard_task.remote(params, paths[a:b], n_groups, self.cpus_per_shard, (source, sha256))
                  for a, b in zip(bounds[:-1], bounds[1:])]
        # The whole tree is submitted now: two neighbouring shards merge as soon as both are done, and a
        # group's sums are freed from Ray's object store once merged (the driver keeps no reference).
        merge_task = ray.remote(num_cpus=1)(_merge)
        finalize_task = ray.remote(num_cpus=1, num_returns=3)(_finalize)
        results = []
        for group in range(n_groups):
            level = [refs[2 + group] for refs in shards]
            while len(level) > 1:  # pairwise, left to right: shard 0's shift survives
                level = [merge_task.remote(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                         for i in range(0, len(level), 2)]
            results.append(finalize_task.remote(level[0], config.epsilon, keep, config.covariance))
            del level
        grid_ref, count_refs = shards[0][0], [refs[1] for refs in shards]
        del shards
        feature_hw = tuple(get(ray, grid_ref))
        counts = get(ray, count_refs)
        self.log(f"ray: {n_shards} shards of {min(counts)}-{max(counts)} images: statistics done "
                 f"({time.perf_counter() - started:.1f} s)")
        means, factors, kept = [], [], []
        while results:
            mean, packed, sums = get(ray, list(results.pop(0)))
            if mean is None:
                continue
            means.append(mean)
            factors.append(packed)
            kept.append(sums)
        self.seconds["fit"] = time.perf_counter() - started
        self.log(f"ray: merged and factored in {len(means)} groups of positions "
                 f"({self.seconds['fit']:.1f} s in all)")
        mean, packed = torch.cat(means), torch.cat(factors)
        stats = _concatenate(kept) if keep else None
        return mean, packed, stats, feature_hw, None

    def held_out_scores(self, model, images: Sequence, mean: torch.Tensor, packed: torch.Tensor, feature_hw):
        """Held-out images scored on the cluster, in order -> (scores (n,), maps (n, H, W))."""
        paths = [_as_path(image) for image in images]
        ray = self._ray()
        started = time.perf_counter()
        n_parts = min(len(paths), max(1, cpus_in_cluster(ray) // self.cpus_per_shard))
        task = ray.remote(num_cpus=self.cpus_per_shard, num_returns=2)(_held_out_part)
        mean_ref, packed_ref = ray.put(mean.cpu()), ray.put(packed.cpu())
        bounds = np.linspace(0, len(paths), n_parts + 1).round().astype(int)
        parts = [task.remote(self._params(model), paths[a:b], mean_ref, packed_ref, feature_hw, self.cpus_per_shard)
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        scores = np.concatenate([get(ray, refs[0]) for refs in parts])
        maps = np.concatenate([get(ray, refs[1]) for refs in parts])
        self.seconds["calibration"] = time.perf_counter() - started
        self.log(f"ray: {len(paths)} held-out images scored for calibration ({self.seconds['calibration']:.1f} s)")
        return scores, maps


def _concatenate(groups: List[GaussianAccumulator]) -> GaussianAccumulator:
    """The groups' sums as one accumulator (they share count and chunk; shifts differ per position only)."""
    first = groups[0]
    fourth = all(g.has_fourth_moments for g in groups)
    return GaussianAccumulator.from_sums(first.count, torch.cat([g.shift for g in groups]),
                                         torch.cat([g.sum for g in groups]),
                                         [block for g in groups for block in g.outer], first.chunk,
                                         torch.cat([g.cubic for g in groups]) if fourth else None,
                                         torch.cat([g.quartic for g in groups]) if fourth else None)


def _as_path(image) -> str:
    """Workers read images themselves: only file paths can be sent to them."""
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    raise PadimError(f"a fit on Ray takes image file paths (workers read them), got {type(image).__name__}")
