"""Scoring engines side by side, with each engine's backbone floor and int8's accuracy: torch (PaDiM
itself), ONNX Runtime, OpenVINO f32, bf16 (where the CPU has it) and int8, on one or more category
folders and backbones, in one process, engines alternated, medians of --repeats.

    pip install "padim[export,openvino]" nncf
    python benchmarks/engines.py --data-root ../shared/datasets \\
        --categories magnetic_tile,elpv_mono,kolektorsdd --backbones efficientnet_lite0,resnet18 \\
        --repeats 3 --output benchmarks/engines_results.json
    # a quick check that it runs (8 test images, 48 training images):
    python benchmarks/engines.py --data-root ../shared/datasets --categories magnetic_tile \\
        --backbones efficientnet_lite0 --max-images 8 --max-train 48 --repeats 1

Per category and backbone (efficientnet_lite0 with its ImageNet weights; resnet18 with random
weights: timing only, its metrics mean nothing), fitted here on train/good (--max-train: the first N),
every engine gets the same threads (--threads) and these figures, ms per test image:

- decode/resize: ``padim.files.images.load_pixels`` alone over the test files, in 2 threads (wall,
  as the pipeline decodes) and in 1 thread (the CPU time decoding costs); the same for every engine;
- end to end: from files, as ``padim test`` scores (decoding in 2 threads, batches of --batch-size);
- model only: the engine on pixels decoded beforehand;
- backbone floor: the engine running the backbone alone (the model's frozen extractor, normalised
  float input, its three feature maps out; int8: that backbone quantised by NNCF on the same
  training images), batches of --batch-size: what the engine cannot go below;
- accuracy: image/pixel AUROC and AUPRO (``padim.jobs.evaluate``) per engine, the largest metric
  difference from torch, and the largest relative map difference from torch (model only).

Tables per run, then the int8 accuracy deltas (int8 - OpenVINO f32) of every run and the issue's
targets (ratios) of every run. The last line is JSON of everything (also written to --output).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from padim.files.memory import tune_malloc_for_scoring  # noqa: E402
from padim.data import find_category  # noqa: E402
from padim.files.images import load_pixels, prefetched  # noqa: E402
from padim.jobs.evaluate import METRIC_KEYS, evaluate  # noqa: E402
from padim.deploy.cache import export_file  # noqa: E402
from padim.deploy.engines import as_torch  # noqa: E402
from padim.deploy.quantize import decoded, export_int8  # noqa: E402
from padim.runtime import ExportedModel  # noqa: E402

ACCURACY_KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
FLOOR_IMAGES = 128  # images the backbone floors run on (normalised float32 inputs are 4x the pixels' memory)


def median_ms(values):
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------- floors
class TorchFloor:
    """The torch engine's backbone: the extractor on channels_last input, CPU chunks of 8 as
    ``PatchScorer`` runs it."""

    def __init__(self, model):
        from padim.core.features import cpu_chunk

        self.extractor, self.chunk = model.extractor_, cpu_chunk(*model.config_.input_size)

    def __call__(self, x: np.ndarray):
        x = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for start in range(0, len(x), self.chunk):
                self.extractor(x[start: start + self.chunk])


def export_backbone(model, path: Path) -> Path:
    """The model's extractor alone as ONNX: (B, 3, H, W) float32 -> its feature maps."""
    import warnings

    height, width = model.config_.input_size
    example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.extractor_.eval(), (example,), dynamo=True, input_names=["x"],
                                    dynamic_shapes=({0: batch},), verbose=False, report=False)
    program.save(str(path))
    return path


class OrtFloor:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()  # as padim.deploy.sessions opens a session
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode, options.inter_op_num_threads = ort.ExecutionMode.ORT_SEQUENTIAL, 1
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray):
        self.session.run(None, {"x": x})


class OpenVinoFloor:
    def __init__(self, model, precision: str, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision,
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "ENABLE_CPU_PINNING": False, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads}
        self.request = core.compile_model(model, "CPU", config).create_infer_request()

    def __call__(self, x: np.ndarray):
        self.request.infer({0: x})


def backbone_floors(model, work: Path, names, threads: int, calibration_inputs: np.ndarray) -> dict:
    """{engine name: callable((B, 3, H, W) float32)} of the backbone alone, one per engine measured."""
    floors = {"torch": TorchFloor(model)}
    path = export_backbone(model, work / "backbone.onnx")
    if "onnxruntime" in names:
        floors["onnxruntime"] = OrtFloor(path, threads)
    if any(name.startswith("openvino") for name in names):
        import openvino as ov

        ir = ov.convert_model(str(path))
        for name in names:
            if name in ("openvino f32", "openvino bf16"):
                floors[name] = OpenVinoFloor(ir, name.split()[1], threads)
        if "openvino int8" in names:
            import nncf

            quantised = nncf.quantize(ir, nncf.Dataset([x[None] for x in calibration_inputs]),
                                      subset_size=len(calibration_inputs), preset=nncf.QuantizationPreset.MIXED)
            floors["openvino int8"] = OpenVinoFloor(quantised, "int8", threads)
    return floors


# ---------------------------------------------------------------------------------------- a run
def subset(items, n):
    """n items evenly spread over ``items`` (all when n is None or larger): both classes of a test set."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def decode_ms(paths, config, workers: int) -> float:
    started = time.perf_counter()
    for _ in prefetched(paths, 32, lambda path: load_pixels(path, config), workers, 0):
        pass
    return 1000 * (time.perf_counter() - started) / len(paths)


def run(args, category_name: str, backbone: str, threads: int) -> dict:
    weights = args.weights if args.weights != "auto" else ("imagenet" if backbone == "efficientnet_lite0" else "random")
    category = find_category(args.data_root, category_name, need_test=True)
    train = category.train[: args.max_train] if args.max_train else list(category.train)
    category = dataclasses.replace(category, train=train, test=subset(category.test, args.max_images))
    work = Path(tempfile.mkdtemp(prefix="padim-engines-"))
    model = PaDiM(backbone=backbone, weights=weights, image_size=args.image_size, batch_size=args.batch_size,
                  device="cpu", progress=False)
    model.fit(train)
    model_path = work / "model.safetensors"
    model.save(model_path)
    print(f"\n{category_name}, {backbone} ({weights}): fitted on {model.n_train_images_} images "
          f"({model.n_calibration_images_ or 0} held out) in {model.fit_seconds_:.1f} s", flush=True)
    model = PaDiM.load(model_path, device="cpu", batch_size=args.batch_size, progress=False)

    wanted = [name.strip() for name in args.engines.split(",")]
    engines, export_s = {"torch": model}, {}
    for fmt, name in (("onnx", "onnxruntime"), ("openvino", "openvino f32")):
        if name in wanted or (fmt == "openvino" and "openvino bf16" in wanted):
            started = time.perf_counter()
            export_file(model_path, fmt, work / fmt, model=model)
            export_s[fmt] = time.perf_counter() - started
    if "onnxruntime" in wanted:
        engines["onnxruntime"] = ExportedModel(work / "onnx", "onnxruntime", batch_size=args.batch_size, threads=threads)
    for precision in ("f32", "bf16"):
        if f"openvino {precision}" in wanted:
            try:
                engines[f"openvino {precision}"] = ExportedModel(work / "openvino", "openvino", precision,
                                                                  batch_size=args.batch_size, threads=threads)
            except Exception as exc:  # a CPU without bf16
                print(f"openvino {precision}: not measured ({exc})", flush=True)
    if "openvino int8" in wanted:
        started = time.perf_counter()
        export_int8(model_path, train, work / "int8", model=model, n_images=args.quantization_images)
        export_s["openvino int8 (quantise + recalibrate)"] = time.perf_counter() - started
        engines["openvino int8"] = ExportedModel(work / "int8", "openvino", "int8", batch_size=args.batch_size,
                                                 threads=threads)
    print("exported in " + ", ".join(f"{k} {v:.1f} s" for k, v in export_s.items()), flush=True)

    paths = [s.path for s in category.test]
    n = len(paths)
    pixels = np.stack(decoded(paths, model.config_))
    floor_inputs = model.embedder_.normalise(torch.as_tensor(pixels[:FLOOR_IMAGES])).contiguous().numpy()
    chosen = subset(train, min(args.quantization_images, len(train)))
    calibration_inputs = model.embedder_.normalise(torch.as_tensor(np.stack(decoded(chosen, model.config_)))).contiguous().numpy()
    floors = backbone_floors(model, work, list(engines), threads, calibration_inputs)
    del calibration_inputs

    def end_to_end(engine):
        for _ in engine.iter_predict(paths):
            pass

    def model_only(engine):
        return np.concatenate([engine.score_pixels(pixels[i: i + args.batch_size])[1] for i in range(0, n, args.batch_size)])

    def floor(name):
        for start in range(0, len(floor_inputs), args.batch_size):
            floors[name](floor_inputs[start: start + args.batch_size])

    maps = {name: model_only(engine) for name, engine in engines.items()}  # warm-up and the parity figure
    for name in floors:
        floor(name)
    times = {name: {"end_to_end": [], "model_only": [], "backbone_floor": []} for name in engines}
    decode = {"2 threads": [], "1 thread": []}
    for repeat in range(args.repeats):
        decode["2 threads"].append(decode_ms(paths, model.config_, 2))
        decode["1 thread"].append(decode_ms(paths, model.config_, 1))
        for name, engine in engines.items():  # alternated: drift of a shared machine hits every engine alike
            started = time.perf_counter()
            end_to_end(engine)
            times[name]["end_to_end"].append(1000 * (time.perf_counter() - started) / n)
            started = time.perf_counter()
            model_only(engine)
            times[name]["model_only"].append(1000 * (time.perf_counter() - started) / n)
            if name in floors:
                started = time.perf_counter()
                floor(name)
                times[name]["backbone_floor"].append(1000 * (time.perf_counter() - started) / len(floor_inputs))
        print(f"repeat {repeat + 1}: decode {decode['2 threads'][-1]:.1f}; " + ", ".join(
            f"{k} {v['end_to_end'][-1]:.1f}/{v['model_only'][-1]:.1f}" for k, v in times.items()), flush=True)

    rows = {}
    for name, engine in engines.items():
        scorer = None if name == "torch" else as_torch(engine.iter_predict)
        result = evaluate(model, category, iter_predict=scorer)
        rows[name] = {
            "end_to_end_ms": median_ms(times[name]["end_to_end"]),
            "model_only_ms": median_ms(times[name]["model_only"]),
            "backbone_floor_ms": median_ms(times[name]["backbone_floor"]),
            **{key: result.metrics[key] for key in METRIC_KEYS},
            "max_rel_map_diff": float(np.abs(maps[name] - maps["torch"]).max() / np.abs(maps["torch"]).max()),
        }
        if name == "openvino int8":
            rows[name]["thresholds_from"] = engine.thresholds_from_
    return {"category": category_name, "backbone": backbone, "weights": weights, "n_test": n,
            "n_train": len(train), "image_size": args.image_size, "batch_size": args.batch_size, "threads": threads,
            "repeats": args.repeats, "decode_ms": {k: median_ms(v) for k, v in decode.items()},
            "export_s": export_s, "engines": rows, "times": times}


# ------------------------------------------------------------------------------------- tables
def fmt(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)


def delta(a, b):
    return None if a is None or b is None else a - b


def print_run(result: dict) -> None:
    rows, base = result["engines"], result["engines"]["torch"]
    decode = result["decode_ms"]
    print(f"\n### {result['category']}, {result['backbone']} ({result['weights']}): {result['n_test']} test images, "
          f"image size {result['image_size']}, batch {result['batch_size']}, {result['threads']} threads, "
          f"medians of {result['repeats']}")
    print(f"decode/resize alone: {decode['2 threads']:.1f} ms/image in 2 threads (wall), {decode['1 thread']:.1f} "
          "ms/image in 1 thread (CPU)")
    print("| engine | end to end ms/image | vs torch | model only ms/image | vs torch | backbone floor ms/image | "
          "model only / floor | max rel. map diff | " + " | ".join(METRIC_KEYS) + " | max metric delta vs torch |")
    print("|---" * (9 + len(METRIC_KEYS)) + "|")
    for name, row in rows.items():
        deltas = [abs(row[k] - base[k]) for k in METRIC_KEYS if row[k] is not None and base[k] is not None]
        row["max_metric_delta"] = max(deltas) if deltas else None
        floor = row["backbone_floor_ms"]
        print(f"| {name} | {fmt(row['end_to_end_ms'])} | {row['end_to_end_ms'] / base['end_to_end_ms']:.2f} | "
              f"{fmt(row['model_only_ms'])} | {row['model_only_ms'] / base['model_only_ms']:.2f} | {fmt(floor)} | "
              f"{fmt(None if not floor else row['model_only_ms'] / floor, '.2f')} | {row['max_rel_map_diff']:.1e} | "
              + " | ".join(fmt(row[k], ".4f") for k in METRIC_KEYS) + f" | {fmt(row['max_metric_delta'], '.1e')} |")


def print_summary(results) -> None:
    runs = [r for r in results if "openvino int8" in r["engines"] and "openvino f32" in r["engines"]]
    if runs:
        print("\n### int8 accuracy: OpenVINO int8 - OpenVINO f32 (target: image and pixel AUROC within 0.005)")
        print("| data set | backbone | " + " | ".join(f"{k} f32 | int8 | delta" for k in ACCURACY_KEYS)
              + " | within 0.005 |")
        print("|---" * (3 + 3 * len(ACCURACY_KEYS)) + "|")
        for r in runs:
            f32, int8 = r["engines"]["openvino f32"], r["engines"]["openvino int8"]
            deltas = {k: delta(int8[k], f32[k]) for k in ACCURACY_KEYS}
            ok = all(abs(deltas[k]) <= 0.005 for k in ("image_AUROC", "pixel_AUROC") if deltas[k] is not None)
            r["int8_deltas"] = deltas
            print(f"| {r['category']} | {r['backbone']} ({r['weights']}) | " + " | ".join(
                f"{fmt(f32[k], '.4f')} | {fmt(int8[k], '.4f')} | {fmt(deltas[k], '+.4f')}" for k in ACCURACY_KEYS)
                + f" | {'yes' if ok else 'NO'} |")
    print("\n### targets (ratios; model only / floor of the same engine)")
    print("| data set | backbone | best f32 engine | end to end vs torch | model only / its floor | int8 end to end "
          "vs torch | int8 model only / its floor |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rows, base = r["engines"], r["engines"]["torch"]["end_to_end_ms"]
        f32 = [name for name in rows if name in ("onnxruntime", "openvino f32")]
        best = min(f32, key=lambda name: rows[name]["end_to_end_ms"]) if f32 else None
        int8 = rows.get("openvino int8")

        def over_floor(row):
            return None if row is None or not row["backbone_floor_ms"] else row["model_only_ms"] / row["backbone_floor_ms"]

        print(f"| {r['category']} | {r['backbone']} | {best or 'n/a'} | "
              f"{fmt(None if best is None else rows[best]['end_to_end_ms'] / base, '.2f')} | "
              f"{fmt(over_floor(rows.get(best)), '.2f')} | {fmt(None if int8 is None else int8['end_to_end_ms'] / base, '.2f')} | "
              f"{fmt(over_floor(int8), '.2f')} |")


def machine() -> dict:
    """The CPU (model, cores, the instruction sets int8 and bf16 speed depend on) and the versions."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["isa"] = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni"))
    except (OSError, StopIteration):
        pass
    for package in ("torch", "onnxruntime", "openvino", "nncf"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--categories", default="magnetic_tile", help="comma-separated category folders")
    parser.add_argument("--backbones", default="efficientnet_lite0", help="comma-separated backbones")
    parser.add_argument("--weights", default="auto",
                        help="auto (imagenet for efficientnet_lite0, random for the others: timing only), imagenet "
                             "or random")
    parser.add_argument("--engines", default="torch,onnxruntime,openvino f32,openvino bf16,openvino int8",
                        help="comma-separated, of: torch, onnxruntime, openvino f32, openvino bf16, openvino int8")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="per engine (default: torch.get_num_threads())")
    parser.add_argument("--max-train", type=int, default=None, help="fit on the first N training images")
    parser.add_argument("--max-images", type=int, default=None, help="N test images, evenly spread (both classes)")
    parser.add_argument("--quantization-images", type=int, default=300, help="int8: NNCF calibration images, at most")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tune_malloc_for_scoring()  # as the padim command does before scoring (applies to every engine alike)
    import logging

    logging.getLogger("nncf").setLevel(logging.WARNING)  # this script's process: NNCF's per-node notes off
    results = []
    for category in [c.strip() for c in args.categories.split(",")]:
        for backbone in [b.strip() for b in args.backbones.split(",")]:
            results.append(run(args, category, backbone, threads))
            print_run(results[-1])
    print_summary(results)
    print(f"\nmachine: {json.dumps(machine())}")
    text = json.dumps({"machine": machine(), "runs": results})
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
