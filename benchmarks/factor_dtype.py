"""float32 against float16 storage of the precision factor: one fit, scored both ways.

Fits padim on a category, evaluates it, rounds its factor to float16 (what `padim fit
--factor-dtype float16` stores), saves and reloads it, evaluates again; prints both model files'
sizes, the largest relative change of an image score and every metric side by side.

    python benchmarks/factor_dtype.py --data-root ../shared/datasets --category magnetic_tile \
        --backbone efficientnet_lite0
"""

import argparse
import dataclasses
import os
import tempfile

import numpy as np
import torch

from padim import PaDiM
from padim.data import find_category
from padim.evaluate import METRIC_KEYS, evaluate
from padim.gaussian import store_factor


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
    model = PaDiM(backbone=args.backbone, weights=args.weights, device="cpu").fit(category.train)
    folder = tempfile.mkdtemp()
    full, half = os.path.join(folder, "float32.safetensors"), os.path.join(folder, "float16.safetensors")
    model.save(full)
    as_float32 = evaluate(model, category)

    model.precision_factor_packed_ = store_factor(model.precision_factor_packed_, "float16")
    model._precision_factor = None  # unpacked again from the rounded factor
    model.config_ = dataclasses.replace(model.config_, factor_dtype="float16")
    model.save(half)
    as_float16 = evaluate(PaDiM.load(half, device="cpu"), category)

    change = np.abs(as_float16.scores - as_float32.scores) / np.abs(as_float32.scores)
    print(f"{args.category}, {args.backbone} ({args.weights} weights)")
    print(f"model file MB: float32 {os.path.getsize(full) / 1e6:.1f}, float16 {os.path.getsize(half) / 1e6:.1f}")
    print(f"largest relative change of an image score: {change.max():.2e}")
    for key in METRIC_KEYS:
        a, b = as_float32.metrics[key], as_float16.metrics[key]
        print(f"{key:15s} float32 {a:.5f}  float16 {b:.5f}  difference {b - a:+.5f}")


if __name__ == "__main__":
    main()
