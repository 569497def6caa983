"""The image score of large pictures (issue 30): the paper's maximum of the map against rules that keep
PaDiM's maps untouched, on every real data set here: image AUROC per rule.

    PYTHONPATH=. python benchmarks/image_score.py --data-root /work/shared/datasets \\
        --json benchmarks/image_score.json

Each data set is fitted once per seed (efficientnet_lite0, ImageNet weights, the default options; for
kolektorsdd also with ``--tile auto``: native 1260 x 500 in 18 tiles of 256 px, shared statistics) and
its test pictures scored once; every rule is computed from the same maps (at the model's input size,
the ignore region 0):

- max: the map's maximum (the paper; padim's score);
- top 0.1 % / top 1 %: the mean of the highest 0.1 % / 1 % of the map's pixels;
- max x coverage: the maximum of the map times the stitching weights' sum scaled to 1 at its largest
  (tiled models: pixels only the edge of one tile sees count less; untiled: the maximum);
- region: the largest sum of (map - pixel threshold) over a connected region above the calibrated
  pixel threshold (8-connectivity); without such a region, the maximum minus the threshold.

Seed spread: the rules are computed for seeds 0, 1, 2 (the random channel subset) and reported as
mean and range, the spread a rule must beat to count as better.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from padim import PaDiM, find_category


def coverage_of(model):
    """(H, W) the tiles' stitching weights' sum scaled to 1 at its largest; None without tiles."""
    tiles = model.embedder_.tiles
    if tiles is None:
        return None
    total = 1.0 / tiles.inverse_total.numpy().astype(np.float64)
    return total / total.max()


def rules(maps, pixel_threshold: float, coverage):
    """maps (N, H, W) -> {rule: (N,) scores}."""
    flat = maps.reshape(len(maps), -1)
    n_pixels = flat.shape[1]
    top = {f: np.sort(flat, axis=1)[:, -max(1, int(round(f * n_pixels))):].mean(axis=1) for f in (0.001, 0.01)}
    regions = []
    for m in maps:
        above = m >= pixel_threshold
        if not above.any():
            regions.append(float(m.max() - pixel_threshold))
            continue
        labelled, count = ndimage.label(above, structure=np.ones((3, 3)))
        regions.append(float(ndimage.sum(m - pixel_threshold, labelled, index=np.arange(1, count + 1)).max()))
    return {"max": flat.max(axis=1), "top 0.1 %": top[0.001], "top 1 %": top[0.01],
            "max x coverage": flat.max(axis=1) if coverage is None else (maps * coverage).reshape(len(maps), -1).max(axis=1),
            "region": np.array(regions)}


def measure(root: str, category: str, seed: int, **options) -> dict:
    found = find_category(root, category, need_test=True)
    model = PaDiM(backbone="efficientnet_lite0", seed=seed, device="cpu", **options).fit(found.train)
    labels = np.array([sample.defect != "good" for sample in found.test])
    maps = []
    paths = [sample.path for sample in found.test]
    for start in range(0, len(paths), 16):  # maps at the input size, a few at a time
        maps.append(model.predict(paths[start : start + 16]).maps.astype(np.float32))
    maps = np.concatenate(maps)
    scores = rules(maps, model.pixel_threshold_, coverage_of(model))
    return {rule: float(roc_auc_score(labels, s)) for rule, s in scores.items()}


SETS = {
    "kolektorsdd, tiles (--tile auto)": ("kolektorsdd", dict(image_size=(1260, 500), tile=256,
                                                             tile_statistics="shared")),
    "kolektorsdd, squeezed 256": ("kolektorsdd", {}),
    "magnetic_tile": ("magnetic_tile", {}),
    "elpv_mono": ("elpv_mono", {}),
    "elpv_poly": ("elpv_poly", {}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated names of SETS")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    previous = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    results = previous.get("results", {})
    for name, (category, options) in SETS.items():
        if args.only and name not in args.only.split(","):
            continue
        for seed in seeds:
            key = f"{name} | seed {seed}"
            if key in results:
                continue
            results[key] = measure(args.data_root, category, seed, **options)
            print(key, json.dumps(results[key]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"results": results}, indent=1) + "\n")
    print(table(results))


def table(results: dict) -> str:
    names = list(dict.fromkeys(key.split(" | ")[0] for key in results))
    rules_ = list(next(iter(results.values())))
    lines = ["| data set | " + " | ".join(rules_) + " |", "|" + " --- |" * (len(rules_) + 1)]
    for name in names:
        runs = [value for key, value in results.items() if key.split(" | ")[0] == name]
        cells = []
        for rule in rules_:
            values = np.array([run[rule] for run in runs])
            cells.append(f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})")
        lines.append(f"| {name} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
