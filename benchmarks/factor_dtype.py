"""float32 against float16 storage of the precision factor: one fit, scored both ways.

Fits padim on a category twice, with factor_dtype float32 and float16 (`padim fit --factor-dtype`;
the fits are deterministic, so the second factor is the first rounded), saves, reloads and
evaluates each; prints both model files' sizes, the largest relative change of an image score and
every metric side by side.

    python benchmarks/factor_dtype.py --data-root ../shared/datasets --category magnetic_tile \
        --backbone efficientnet_lite0
"""

import argparse
import os
import tempfile

import numpy as np
import torch

from padim import PaDiM
from padim.data import find_category
from padim.jobs.evaluate import METRIC_KEYS, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    category = find_category(args.data_root, args.category, need_test=True)
    folder = tempfile.mkdtemp()
    evaluations, sizes = {}, {}
    for dtype in ("float32", "float16"):
        path = os.path.join(folder, f"{dtype}.safetensors")
        PaDiM(backbone=args.backbone, weights=args.weights, factor_dtype=dtype, device="cpu").fit(category.train).save(path)
        evaluations[dtype], sizes[dtype] = evaluate(PaDiM.load(path, device="cpu"), category), os.path.getsize(path)
    as_float32, as_float16 = evaluations["float32"], evaluations["float16"]

    change = np.abs(as_float16.scores - as_float32.scores) / np.abs(as_float32.scores)
    print(f"{args.category}, {args.backbone} ({args.weights} weights)")
    print(f"model file MB: float32 {sizes['float32'] / 1e6:.1f}, float16 {sizes['float16'] / 1e6:.1f}")
    print(f"largest relative change of an image score: {change.max():.2e}")
    for key in METRIC_KEYS:
        a, b = as_float32.metrics[key], as_float16.metrics[key]
        print(f"{key:15s} float32 {a:.5f}  float16 {b:.5f}  difference {b - a:+.5f}")


if __name__ == "__main__":
    main()
