"""Scoring engines side by side: torch (PaDiM itself), ONNX Runtime, OpenVINO f32 and bf16, on one
category folder, in one process, alternated, medians of --repeats.

    pip install "padim[export,openvino]"
    python benchmarks/engines.py --data-root ../shared/datasets --category magnetic_tile \\
        --backbone efficientnet_lite0 --repeats 3

Figures per engine:
- end to end: ms per test image from files (decoding with padim.files.images.load_pixels in 2 threads,
  batches of --batch-size, maps and scores on the CPU), as ``padim test`` scores;
- model only: ms per image on pixels decoded beforehand (the engine's floor for this scoring path);
- the five metrics of ``padim test`` (padim.jobs.evaluate with the engine's scores) and their largest
  difference from the torch engine's, and the largest relative difference of the maps.
Every engine gets the same thread count (--threads, default torch's). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from padim import PaDiM  # noqa: E402
from padim.data import find_category  # noqa: E402
from padim.pipeline.cache import export_file  # noqa: E402
from padim.pipeline.engines import as_torch  # noqa: E402
from padim.jobs.evaluate import METRIC_KEYS, evaluate  # noqa: E402
from padim.files.images import load_pixels, prefetched, to_input  # noqa: E402
from padim.core.memory import tune_malloc_for_scoring  # noqa: E402
from padim.runtime import ExportedModel  # noqa: E402
from padim.core.scoring import score_batches  # noqa: E402


def torch_model_only(model: PaDiM, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Scores pixel batches decoded beforehand with the torch engine; returns the maps."""
    config = model.config_
    batches = ((to_input(torch.from_numpy(pixels[i: i + batch_size]), config), None)
               for i in range(0, len(pixels), batch_size))
    return np.concatenate([maps.numpy() for _, maps, _ in score_batches(
        model.embedder_, model.mean_, model.precision_factor_, model.feature_hw_, config.input_size, config.sigma, batches)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="per engine (default: torch.get_num_threads())")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--model", type=Path, default=None, help="a fitted model file instead of fitting one")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tune_malloc_for_scoring()  # as the padim command does before scoring (applies to every engine alike)

    category = find_category(args.data_root, args.category, need_test=True)
    work = Path(tempfile.mkdtemp(prefix="padim-engines-"))
    model_path = args.model
    if model_path is None:
        model = PaDiM(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                      batch_size=args.batch_size, device="cpu")
        model.fit(category.train[: args.max_train] if args.max_train else category.train)
        model_path = work / "model.safetensors"
        model.save(model_path)
        print(f"fitted {args.backbone} on {model.n_train_images_} images in {model.fit_seconds_:.1f} s", flush=True)
    model = PaDiM.load(model_path, device="cpu", batch_size=args.batch_size)
    export_s = {}
    for fmt in ("onnx", "openvino"):
        started = time.perf_counter()
        export_file(model_path, fmt, work / fmt, model=model)
        export_s[fmt] = time.perf_counter() - started
    print(f"exported in {export_s['onnx']:.1f} s (onnx), {export_s['openvino']:.1f} s (openvino IR)", flush=True)

    engines = {"torch": model,
               "onnxruntime": ExportedModel(work / "onnx", "onnxruntime", batch_size=args.batch_size, threads=threads),
               "openvino f32": ExportedModel(work / "openvino", "openvino", "f32", batch_size=args.batch_size,
                                             threads=threads)}
    try:
        engines["openvino bf16"] = ExportedModel(work / "openvino", "openvino", "bf16", batch_size=args.batch_size,
                                                 threads=threads)
    except Exception as exc:  # a CPU without bf16
        print(f"openvino bf16: not measured ({exc})", flush=True)

    paths = [s.path for s in category.test]
    pixels = np.stack([p for p, _ in (batch[0] for batch in prefetched(paths, 1, lambda item: load_pixels(item, model.config_)))])
    n = len(paths)

    def end_to_end(engine):
        for _ in engine.iter_predict(paths):
            pass

    def model_only(name, engine):
        if name == "torch":
            return torch_model_only(engine, pixels, args.batch_size)
        return np.concatenate([engine.score_pixels(pixels[i: i + args.batch_size])[1]
                               for i in range(0, n, args.batch_size)])

    maps = {name: model_only(name, engine) for name, engine in engines.items()}  # warm-up and the parity figure
    times = {name: {"end_to_end": [], "model_only": []} for name in engines}
    for repeat in range(args.repeats):
        for name, engine in engines.items():  # alternated: drift of a shared machine hits every engine alike
            started = time.perf_counter()
            end_to_end(engine)
            times[name]["end_to_end"].append(1000 * (time.perf_counter() - started) / n)
            started = time.perf_counter()
            model_only(name, engine)
            times[name]["model_only"].append(1000 * (time.perf_counter() - started) / n)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v['end_to_end'][-1]:.1f}/{v['model_only'][-1]:.1f}"
                                                     for k, v in times.items()), flush=True)

    rows = {}
    for name, engine in engines.items():
        scorer = None if name == "torch" else as_torch(engine.iter_predict)
        result = evaluate(model, category, iter_predict=scorer)
        rows[name] = {
            "end_to_end_ms": statistics.median(times[name]["end_to_end"]),
            "model_only_ms": statistics.median(times[name]["model_only"]),
            "test_ms": 1000 * result.test_seconds / n,
            **{key: result.metrics[key] for key in METRIC_KEYS},
            "max_rel_map_diff": float(np.abs(maps[name] - maps["torch"]).max() / np.abs(maps["torch"]).max()),
        }
    base = rows["torch"]
    print(f"\n{args.backbone} ({args.weights}), {args.category}, {n} test images, image size {args.image_size}, "
          f"batch {args.batch_size}, {threads} threads, medians of {args.repeats}")
    print("| engine | end to end ms/image | ratio | model only ms/image | ratio | max rel. map diff | "
          + " | ".join(METRIC_KEYS) + " | max metric delta |")
    print("|---" * (7 + len(METRIC_KEYS)) + "|")
    for name, row in rows.items():
        delta = max(abs(row[key] - base[key]) for key in METRIC_KEYS)
        row["max_metric_delta"] = delta
        print(f"| {name} | {row['end_to_end_ms']:.1f} | {row['end_to_end_ms'] / base['end_to_end_ms']:.2f} | "
              f"{row['model_only_ms']:.1f} | {row['model_only_ms'] / base['model_only_ms']:.2f} | "
              f"{row['max_rel_map_diff']:.1e} | " + " | ".join(f"{row[key]:.4f}" for key in METRIC_KEYS)
              + f" | {delta:.1e} |")
    print(json.dumps({"backbone": args.backbone, "weights": args.weights, "category": args.category, "n_test": n,
                      "image_size": args.image_size, "batch_size": args.batch_size, "threads": threads,
                      "repeats": args.repeats, "export_s": export_s, "engines": rows, "times": times}))


if __name__ == "__main__":
    main()
