"""Accuracy of the embedding reduction and covariance options (issue 15), measured on real data.

A grid of reduction (random, semi-orthogonal) x covariance (fixed, oas, ledoit-wolf) x d x seed per
data set: image AUROC, and pixel AUROC and AUPRO where there are masks.

Why it is affordable on 2 cores: the backbone forward dominates a fit and a test, and it does not
depend on the reduction, the covariance, d or (with ImageNet weights) the seed. So each image goes
through the backbone once (``padim.files.images.pixel_batches`` + ``PatchEmbedder.normalise`` + ``build_extractor``, as a
fit does), its layer maps are cached on disk at their native resolutions (float32 memmaps:
0.67 MB per image for efficientnet_lite0 at 256 px), and every cell then feeds those maps through
padim's own code: ``features.make_reduction`` + ``features.embed`` -> ``gaussian.GaussianAccumulator``
-> ``finalize(covariance=...)`` -> ``gaussian.store_factor`` -> ``scoring.score_embeddings`` ->
``padim.jobs.metrics`` (as ``padim.jobs.evaluate`` calls them). Each cell fits on the images a default
``padim fit`` fits on (the seeded 10 % calibration hold-out left out). With random backbone weights
the backbone depends on the seed: the cache is then per seed. ``verify`` checks a cell against a real
``PaDiM(...).fit`` + ``padim.jobs.evaluate.evaluate`` (scores equal to ~1e-5 relative; see RESULTS.md).

The costs of a cell (fit time, test ms per image, model size) depend on neither the seed nor the
data set: ``costs`` times real ``padim fit`` / ``padim test`` processes per (reduction, covariance,
d) on one category, median of ``--repeats``. Run it on a quiet machine.

    python benchmarks/accuracy.py grid --data-root ../shared/datasets \\
        --datasets magnetic_tile,elpv_mono,elpv_poly --backbone efficientnet_lite0 --d 50,100,176 \\
        --seeds 0,1,2 --results benchmarks/accuracy_efficientnet_lite0.json
    python benchmarks/accuracy.py grid ... --backbone resnet18 --weights random --d 100,200 \\
        --results benchmarks/accuracy_resnet18_random.json
    python benchmarks/accuracy.py verify --data-root ../shared/datasets --dataset magnetic_tile \\
        --backbone efficientnet_lite0 --reduction semi-orthogonal --covariance ledoit-wolf --d 100 --seed 1 \\
        --results benchmarks/accuracy_efficientnet_lite0.json
    python benchmarks/accuracy.py costs --data-root ../shared/datasets --category magnetic_tile \\
        --backbone efficientnet_lite0 --d 50,100,176 --repeats 3 --results benchmarks/accuracy_costs.json
    python benchmarks/accuracy.py report --results benchmarks/accuracy_efficientnet_lite0.json \\
        [--costs benchmarks/accuracy_costs.json]          # markdown tables and the decision rule

The grid and costs write their JSON after every cell (atomically) and skip cells already there: a
killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from padim.settings import calibration as cal  # noqa: E402
from padim.core.backbones import build_extractor  # noqa: E402
from padim.settings.backbone_table import entry  # noqa: E402
from padim.settings.config import COVARIANCES, REDUCTIONS, PadimConfig  # noqa: E402
from padim.data.mvtec import find_category  # noqa: E402
from padim.core.features import embed, make_reduction  # noqa: E402
from padim.core.gaussian import GaussianAccumulator, store_factor, unpack_lower  # noqa: E402
from padim.core.embedding import PatchEmbedder  # noqa: E402
from padim.core.scorer import PatchScorer  # noqa: E402
from padim.files.images import load_mask, pixel_batches  # noqa: E402
from padim.jobs.metrics import image_metrics, pixel_metrics  # noqa: E402

BATCH = 32  # the fit's and test's default batch size
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


# ----------------------------------------------------------------------------------------- helpers
def _csv(text: str, kind=str) -> List:
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def _write_json(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def _config(args, d: int, seed: int, reduction: str = "random", covariance: str = "fixed") -> PadimConfig:
    spec = entry(args.backbone)
    return PadimConfig(backbone=args.backbone, weights=args.weights, layers=spec.default_layers, n_features=d,
                       image_size=(args.image_size, args.image_size), seed=seed, reduction=reduction,
                       covariance=covariance)


def cell_key(dataset: str, args, reduction: str, covariance: str, d: int, seed: int) -> str:
    return f"{dataset}|{args.backbone}|{args.weights}|{args.image_size}|{reduction}|{covariance}|{d}|{seed}"


# ----------------------------------------------------------------------------------------- feature cache
class FeatureCache:
    """A data set's backbone layer maps, once per image: train (N, C_l, h_l, w_l) and test float32
    memmaps per layer, the test labels, and the test masks at the model's geometry (as
    ``padim.jobs.evaluate`` loads them) for the images that have ground truth."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = json.loads((folder / "index.json").read_text())
        self.shapes = [tuple(s) for s in index["shapes"]]
        self.n_train, self.n_test = index["n_train"], index["n_test"]
        self.labels = np.array(index["labels"], dtype=bool)
        self.truth = index["truth"]  # test indices with ground truth (good, or defect with a non-empty mask)
        self.has_pixels = index["has_pixels"]
        self.train = [self._open(f"train_{i}", self.n_train, s) for i, s in enumerate(self.shapes)]
        self.test = [self._open(f"test_{i}", self.n_test, s) for i, s in enumerate(self.shapes)]
        self.masks = np.load(folder / "masks.npy", mmap_mode="r") if self.has_pixels else None

    def _open(self, name: str, n: int, shape) -> np.memmap:
        return np.memmap(self.folder / f"{name}.f32", dtype=np.float32, mode="r", shape=(n, *shape))

    @property
    def n_channels(self) -> int:
        return sum(s[0] for s in self.shapes)

    def maps(self, which: str, indices: Sequence[int]) -> List[torch.Tensor]:
        """The layer maps of images ``indices`` of ``which`` ("train"/"test"): list of (B, C_l, h_l, w_l)."""
        layers = self.train if which == "train" else self.test
        return [torch.from_numpy(np.ascontiguousarray(layer[np.asarray(indices)])) for layer in layers]


def build_cache(data_root, dataset: str, config: PadimConfig, folder: Path, workers: int = 2) -> FeatureCache:
    """Runs every train and test image of ``dataset`` through the backbone once (``pixel_batches`` and
    ``PatchEmbedder``: the fit's and the scorer's own decoding and normalisation) and stores the layer
    maps; reuses a complete cache."""
    if (folder / "index.json").is_file():
        return FeatureCache(folder)
    found = find_category(data_root, dataset, need_test=True)
    extractor, source, _ = build_extractor(config.backbone, config.weights, config.layers, config.seed)
    extractor = extractor.to("cpu", memory_format=torch.channels_last)
    embedder = PatchEmbedder(extractor, torch.arange(1), None, config.input_size, config.mean, config.std)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.inference_mode():
        shapes = [tuple(f.shape[1:]) for f in extractor(torch.zeros(1, 3, *config.input_size))]
        n_test, masks, truth = len(found.test), [], []
        for which, items in (("train", found.train), ("test", [s.path for s in found.test])):
            memmaps = [np.memmap(folder / f"{which}_{i}.f32", dtype=np.float32, mode="w+", shape=(len(items), *s))
                       for i, s in enumerate(shapes)]
            done = 0
            for pixels, sizes in pixel_batches(items, config, BATCH, torch.device("cpu"), workers, None, which):
                batch = embedder.normalise(pixels).contiguous(memory_format=torch.channels_last)
                for start in range(0, len(batch), 8):  # as PatchEmbedder: 8 images per CPU forward
                    for memmap, fmap in zip(memmaps, extractor(batch[start : start + 8])):
                        memmap[done + start : done + start + len(fmap)] = fmap.contiguous().numpy()
                if which == "test":
                    for offset, size in enumerate(sizes):
                        sample = found.test[done + offset]
                        mask = load_mask(sample.mask, config, size) if sample.mask is not None else None
                        if mask is not None and sample.is_anomalous and not mask.any():
                            mask = None  # an all-black defect mask: no ground truth (as evaluate)
                        elif mask is None and not sample.is_anomalous:
                            mask = torch.zeros(config.input_size, dtype=torch.bool)
                        if mask is not None:
                            truth.append(done + offset)
                            masks.append(mask.numpy())
                done += len(batch)
            for memmap in memmaps:
                memmap.flush()
    has_pixels = bool(masks) and any(m.any() for m in masks)
    if has_pixels:
        np.save(folder / "masks.npy", np.stack(masks))
    index = {"dataset": dataset, "weights_source": source, "shapes": [list(s) for s in shapes],
             "n_train": len(found.train), "n_test": n_test, "labels": [bool(s.is_anomalous) for s in found.test],
             "truth": truth, "has_pixels": has_pixels, "train": [str(p) for p in found.train],
             "test": [str(s.path) for s in found.test], "seconds": time.perf_counter() - started}
    (folder / "index.json").write_text(json.dumps(index))
    print(f"  cached {dataset}: {len(found.train)} train + {n_test} test images in {index['seconds']:.0f} s",
          file=sys.stderr, flush=True)
    return FeatureCache(folder)


# ----------------------------------------------------------------------------------------- one cell
def fit_indices(n_train: int, seed: int) -> np.ndarray:
    """The training images a default ``padim fit`` fits its Gaussians on (10 % held out, seeded)."""
    n_calibration = cal.calibration_size(n_train, cal.DEFAULT_CALIBRATION_FRACTION)
    return cal.split_indices(n_train, n_calibration, seed)[0] if n_calibration else np.arange(n_train)


def run_cells(cache: FeatureCache, config: PadimConfig, covariances: Sequence[str]) -> Dict[str, dict]:
    """One (reduction, d, seed) on one data set, every covariance in ``covariances``: the sums are
    accumulated once (the covariance acts only in finalize). Returns {covariance: record}."""
    channel_idx, projection = make_reduction(cache.n_channels, config.n_features, config.seed, config.reduction)
    started = time.perf_counter()
    stats = GaussianAccumulator()
    feature_hw = None
    with torch.inference_mode():
        order = fit_indices(cache.n_train, config.seed)
        for start in range(0, len(order), BATCH):
            emb = embed(cache.maps("train", order[start : start + BATCH]), channel_idx, projection=projection)
            feature_hw = tuple(emb.shape[1:3])
            stats.update(emb.flatten(1, 2))  # (B, P, d)
        accumulate_s = time.perf_counter() - started
        out = {}
        for covariance in covariances:
            started = time.perf_counter()
            mean, packed = stats.finalize(config.epsilon, keep=True, covariance=covariance)
            shrinkage = None if covariance == "fixed" else float(stats.shrinkage(covariance).mean())
            factor = unpack_lower(store_factor(packed, config.factor_dtype), config.n_features, torch.float32)
            mean = mean.float()
            finalize_s = time.perf_counter() - started
            started = time.perf_counter()
            scores, maps = [], []
            embedder = PatchEmbedder(torch.nn.Identity(), channel_idx, projection, config.input_size, config.mean,
                                     config.std)  # the cached maps stand for the backbone's
            scorer = PatchScorer(embedder, mean, factor, feature_hw, config.sigma)  # the torch engine's steps
            for start in range(0, cache.n_test, BATCH):
                emb = embed(cache.maps("test", range(start, min(start + BATCH, cache.n_test))), channel_idx,
                            projection=projection)
                batch_maps, batch_scores = scorer.score_embeddings(emb)
                scores.append(batch_scores.clone())
                maps.append(batch_maps.clone())
            score_s = time.perf_counter() - started
            scores = torch.cat(scores).numpy()
            record = {"image_AUROC": image_metrics(cache.labels, scores)["image_AUROC"], "pixel_AUROC": None,
                      "pixel_AUPRO": None, "mean_shrinkage": shrinkage, "n_fit": int(len(order)),
                      "accumulate_s": accumulate_s, "finalize_s": finalize_s, "score_s": score_s}
            if cache.has_pixels:
                maps = torch.cat(maps).numpy()[cache.truth]
                pixels = pixel_metrics(np.array(cache.masks), maps)
                record.update(pixel_AUROC=pixels["pixel_AUROC"], pixel_AUPRO=pixels["pixel_AUPRO"])
            record["scores"] = scores  # (N,) for ``verify``; not written to the results file
            out[covariance] = record
            del factor, maps
    return out


# ----------------------------------------------------------------------------------------- grid
def cache_folder(args, dataset: str) -> Path:
    seed_part = f"-seed{args._seed}" if args.weights == "random" else ""  # random weights: a backbone per seed
    return Path(args.cache) / f"{args.backbone}-{args.weights}-{args.image_size}{seed_part}" / dataset


def cmd_grid(args) -> None:
    torch.set_num_threads(args.threads)
    results = _read_json(args.results) or {"cells": {}}
    results["meta"] = {"backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
                       "torch": torch.__version__, "threads": args.threads,
                       "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    reductions, covariances = _csv(args.reductions), _csv(args.covariances)
    for dataset in _csv(args.datasets):
        # with ImageNet weights the cache serves every seed; with random weights each seed has its own backbone
        seed_groups = [[s] for s in _csv(args.seeds, int)] if args.weights == "random" else [_csv(args.seeds, int)]
        for seeds in seed_groups:
            todo = [(r, d, s) for r, d, s in itertools.product(reductions, _csv(args.d, int), seeds)
                    if any(cell_key(dataset, args, r, c, d, s) not in results["cells"] for c in covariances)]
            if not todo:
                continue
            args._seed = seeds[0]
            folder = cache_folder(args, dataset)
            cache = build_cache(args.data_root, dataset, _config(args, 1, seeds[0]), folder, args.workers)
            for reduction, d, seed in todo:
                started = time.perf_counter()
                cells = run_cells(cache, _config(args, d, seed, reduction), covariances)
                for covariance, record in cells.items():
                    record.pop("scores")
                    results["cells"][cell_key(dataset, args, reduction, covariance, d, seed)] = {
                        "dataset": dataset, "reduction": reduction, "covariance": covariance, "d": d, "seed": seed,
                        **record}
                _write_json(args.results, results)
                shown = "  ".join(f"{c}: " + " ".join(f"{cells[c][m]:.4f}" for m in METRICS if cells[c][m] is not None)
                                  for c in covariances)
                print(f"{dataset} {reduction} d={d} seed={seed} ({time.perf_counter() - started:.0f} s)  {shown}",
                      flush=True)
            if args.weights == "random" and not args.keep_cache:
                shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------- verify
def cmd_verify(args) -> None:
    """One cell against the product: ``PaDiM(...).fit(train)`` then ``padim.jobs.evaluate.evaluate``."""
    from padim.jobs.evaluate import evaluate
    from padim.core.estimator import PaDiM

    torch.set_num_threads(args.threads)
    args._seed = args.seed
    cache = build_cache(args.data_root, args.dataset, _config(args, 1, args.seed), cache_folder(args, args.dataset),
                        args.workers)
    config = _config(args, args.d, args.seed, args.reduction, args.covariance)
    cell = run_cells(cache, config, [args.covariance])[args.covariance]
    found = find_category(args.data_root, args.dataset, need_test=True)
    model = PaDiM(backbone=args.backbone, weights=args.weights, n_features=args.d, image_size=args.image_size,
                  seed=args.seed, reduction=args.reduction, covariance=args.covariance, device="cpu").fit(found.train)
    real = evaluate(model, found)
    ours = cell["scores"]
    relative = float(np.max(np.abs(ours - real.scores) / np.abs(real.scores)))
    record = {"dataset": args.dataset, "reduction": args.reduction, "covariance": args.covariance, "d": args.d,
              "seed": args.seed, "max_relative_score_difference": relative,
              **{f"grid_{m}": cell[m] for m in METRICS}, **{f"padim_{m}": real.metrics[m] for m in METRICS}}
    print(json.dumps(record, indent=1))
    if args.results:
        results = _read_json(args.results) or {"cells": {}}
        results.setdefault("verification", []).append(record)
        _write_json(args.results, results)


# ----------------------------------------------------------------------------------------- costs
def _run(command: List[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return time.perf_counter() - started


def cmd_costs(args) -> None:
    """Real ``padim fit`` / ``padim test`` processes per (reduction, covariance, d), median of repeats."""
    results = _read_json(args.results) or {"costs": {}}
    results.setdefault("costs", {})
    work = Path(tempfile.mkdtemp(prefix="padim-costs-"))
    common = ["--backbone", args.backbone, "--weights", args.weights, "--image-size", str(args.image_size)]
    try:
        for reduction, covariance, d in itertools.product(_csv(args.reductions), _csv(args.covariances),
                                                          _csv(args.d, int)):
            key = f"{args.category}|{args.backbone}|{args.weights}|{args.image_size}|{reduction}|{covariance}|{d}"
            if key in results["costs"]:
                continue
            runs = []
            for _ in range(args.repeats):
                model = work / "model.safetensors"
                fit_wall = _run([sys.executable, "-m", "padim", "fit", "--data-root", str(args.data_root), "--category",
                                 args.category, *common, "--n-features", str(d), "--reduction", reduction,
                                 "--covariance", covariance, "--output", str(model)])
                header = _padim_header(model)
                test_wall = _run([sys.executable, "-m", "padim", "test", "--model", str(model), "--data-root",
                                  str(args.data_root), "--category", args.category, "--output", str(work / "test")])
                metrics = json.loads((work / "test" / "metrics.json").read_text())
                runs.append({"fit_s": header["fit_seconds"], "fit_process_s": fit_wall,
                             "test_ms_per_image": metrics["test_ms_per_image"], "test_process_s": test_wall,
                             "model_MB": model.stat().st_size / 1e6, "image_AUROC": metrics["image_AUROC"]})
            results["costs"][key] = {"reduction": reduction, "covariance": covariance, "d": d, "runs": runs,
                                     **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
            _write_json(args.results, results)
            row = results["costs"][key]
            print(f"{reduction} {covariance} d={d}: fit {row['fit_s']:.1f} s, test {row['test_ms_per_image']:.1f} "
                  f"ms/image, model {row['model_MB']:.1f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _padim_header(path: Path) -> dict:
    from padim.files.safetensors_io import read_metadata

    return read_metadata(path)


# ----------------------------------------------------------------------------------------- report
def _summary(values: List[float]) -> Optional[tuple]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0), len(values)


def aggregate(cells: Dict[str, dict]) -> Dict[tuple, dict]:
    """{(dataset, reduction, covariance, d): {metric: (mean, sd, n)}} over seeds."""
    groups: Dict[tuple, List[dict]] = {}
    for cell in cells.values():
        groups.setdefault((cell["dataset"], cell["reduction"], cell["covariance"], cell["d"]), []).append(cell)
    return {key: {m: _summary([c[m] for c in group]) for m in METRICS + ("mean_shrinkage",)}
            for key, group in groups.items()}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value[0]:.4f} ± {value[1]:.4f}"


def decide(table: Dict[tuple, dict], baseline=("random", "fixed"), judged=METRICS) -> List[dict]:
    """The issue's rule for every option against the default (random, fixed) at the same d: "at least
    as good on every data set (within the seed spread)" -- for each metric in ``judged``, mean
    difference >= -max(sd_option, sd_default) -- "and better by >= 0.01 image AUROC or >= 0.01 AUPRO
    on at least one" data set. (The test-time part of the rule needs the costs table.)"""
    datasets = sorted({k[0] for k in table})
    out = []
    for (reduction, covariance, d) in sorted({k[1:] for k in table}):
        if (reduction, covariance) == baseline:
            continue
        worse, better, deltas = [], [], {}
        for dataset in datasets:
            mine, base = table.get((dataset, reduction, covariance, d)), table.get((dataset, *baseline, d))
            if mine is None or base is None:
                continue
            for metric in METRICS:
                if mine[metric] is None or base[metric] is None:
                    continue
                delta = mine[metric][0] - base[metric][0]
                deltas[(dataset, metric)] = delta
                if metric in judged and delta < -max(mine[metric][1], base[metric][1]):
                    worse.append((dataset, metric, delta))
                if metric in ("image_AUROC", "pixel_AUPRO") and delta >= 0.01:
                    better.append((dataset, metric, delta))
        out.append({"reduction": reduction, "covariance": covariance, "d": d, "worse": worse, "better": better,
                    "passes_accuracy": not worse and bool(better), "deltas": deltas})
    return out


SHORT = {"image_AUROC": "img", "pixel_AUROC": "pix", "pixel_AUPRO": "PRO"}


def cmd_report(args) -> None:
    cells = {}
    for path in args.results:
        cells.update(_read_json(path).get("cells", {}))
    table = aggregate(cells)
    costs = {}
    for path in args.costs or []:
        for row in _read_json(path).get("costs", {}).values():
            costs[(row["reduction"], row["covariance"], row["d"])] = row
    datasets = sorted({k[0] for k in table})
    for dataset in datasets:
        print(f"\n{dataset} (mean ± sd over seeds)\n")
        print("| reduction | covariance | d | image AUROC | pixel AUROC | AUPRO | mean shrinkage | fit s | "
              "test ms/image | model MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for key in sorted(k for k in table if k[0] == dataset):
            row, cost = table[key], costs.get(key[1:])
            n = row["image_AUROC"][2]
            shrink = "-" if row["mean_shrinkage"] is None else f"{row['mean_shrinkage'][0]:.3f}"
            money = (f"{cost['fit_s']:.1f} | {cost['test_ms_per_image']:.1f} | {cost['model_MB']:.1f}" if cost
                     else "- | - | -")
            print(f"| {key[1]} | {key[2]} | {key[3]} | {_fmt(row['image_AUROC'])} | {_fmt(row['pixel_AUROC'])} | "
                  f"{_fmt(row['pixel_AUPRO'])} | {shrink} | {money} |" + ("" if n == 3 else f" ({n} seeds)"))
    if costs:
        print("\nCosts: real `padim fit` / `padim test` processes on magnetic_tile (685 fitted images, 583 tested), "
              "medians of the runs; test time and model size do not depend on the covariance estimate (the "
              "factor has the same shape), fit time barely (one more sum, a different ridge):\n")
        print("| reduction | covariance | d | runs | fit s | test ms/image | x random test time | model MB |")
        print("|---|---|---|---|---|---|---|---|")
        for key in sorted(costs):
            row, base = costs[key], costs.get(("random", "fixed", key[2]))
            ratio = f"{row['test_ms_per_image'] / base['test_ms_per_image']:.2f}" if base else "-"
            print(f"| {key[0]} | {key[1]} | {key[2]} | {len(row['runs'])} | {row['fit_s']:.1f} | "
                  f"{row['test_ms_per_image']:.1f} | {ratio} | {row['model_MB']:.1f} |")
    full, narrow = decide(table), decide(table, judged=("image_AUROC", "pixel_AUPRO"))
    columns = [(d, m) for d in datasets for m in METRICS if any((d, m) in v["deltas"] for v in full)]
    print("\nDifferences of the means from random + fixed at the same d (img: image AUROC, pix: pixel AUROC, "
          "PRO: AUPRO; * = worse by more than the larger seed sd), and the rule's accuracy part judged on all "
          "metrics / on image AUROC and AUPRO only:\n")
    print("| option | d | " + " | ".join(f"{d} {SHORT[m]}" for d, m in columns) + " | all metrics | img + PRO only |")
    print("|---|---|" + "---|" * len(columns) + "---|---|")
    for verdict, loose in zip(full, narrow):
        worse = {(d, m) for d, m, _ in verdict["worse"]}
        shown = [f"{verdict['deltas'][c]:+.4f}" + ("*" if c in worse else "") if c in verdict["deltas"] else "-"
                 for c in columns]
        print(f"| {verdict['reduction']} + {verdict['covariance']} | {verdict['d']} | " + " | ".join(shown) +
              f" | {'passes' if verdict['passes_accuracy'] else 'fails'} | "
              f"{'passes' if loose['passes_accuracy'] else 'fails'} |")


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p, datasets: bool = True):
        p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "datasets")
        p.add_argument("--backbone", default="efficientnet_lite0")
        p.add_argument("--weights", default="imagenet")
        p.add_argument("--image-size", type=int, default=256)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--workers", type=int, default=2, help="decoding threads")
        p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "padim-accuracy-cache"),
                       help="folder for the cached layer maps (float32 memmaps)")

    grid = commands.add_parser("grid", help="the accuracy grid from cached layer maps")
    common(grid)
    grid.add_argument("--datasets", default="magnetic_tile,elpv_mono,elpv_poly")
    grid.add_argument("--reductions", default=",".join(REDUCTIONS))
    grid.add_argument("--covariances", default=",".join(COVARIANCES))
    grid.add_argument("--d", default="50,100,176")
    grid.add_argument("--seeds", default="0,1,2")
    grid.add_argument("--results", type=Path, required=True, help="JSON file, written after every cell (resumable)")
    grid.add_argument("--keep-cache", action="store_true", help="keep per-seed caches of random-weight backbones")

    verify = commands.add_parser("verify", help="one cell against a real PaDiM fit + evaluate")
    common(verify)
    verify.add_argument("--dataset", default="magnetic_tile")
    verify.add_argument("--reduction", default="semi-orthogonal", choices=REDUCTIONS)
    verify.add_argument("--covariance", default="ledoit-wolf", choices=COVARIANCES)
    verify.add_argument("--d", type=int, default=100)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--results", type=Path, default=None, help="append the check to this results file")

    costs = commands.add_parser("costs", help="fit time, test ms/image, model size from real padim fit/test")
    common(costs)
    costs.add_argument("--category", default="magnetic_tile")
    costs.add_argument("--reductions", default=",".join(REDUCTIONS))
    costs.add_argument("--covariances", default=",".join(COVARIANCES))
    costs.add_argument("--d", default="50,100,176")
    costs.add_argument("--repeats", type=int, default=3)
    costs.add_argument("--results", type=Path, required=True)

    report = commands.add_parser("report", help="markdown tables and the decision rule from results files")
    report.add_argument("--results", type=Path, nargs="+", required=True)
    report.add_argument("--costs", type=Path, nargs="*", default=None)

    args = parser.parse_args(argv)
    {"grid": cmd_grid, "verify": cmd_verify, "costs": cmd_costs, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
