"""Every option of a command checked before it starts work (``padim.settings.options``,
``padim.files.outputs``): one line, no wait."""

from __future__ import annotations

from pathlib import Path

from padim.cli.common import require_ray
from padim.errors import PadimError

def check_args(args) -> None:
    """Every option checked before a command starts work (see ``padim.settings.options``): one line, no wait."""
    from padim.settings import options as checks
    from padim.files import outputs

    if getattr(args, "batch_size", 1) is not None:
        checks.check_batch_size(getattr(args, "batch_size", 1))
    if getattr(args, "max_images", None) is not None and args.max_images < 1:
        raise PadimError(f"--max-images must be at least 1, got {args.max_images}")
    if args.command == "fit":
        layers = [layer.strip() for layer in args.layers.split(",")] if args.layers else None
        checks.check_fit_options(args.backbone, layers, args.n_features, args.image_size, args.crop, args.seed,
                                 args.batch_size, args.factor_dtype, args.device, reduction=args.reduction,
                                 covariance=args.covariance, **_tile_options(args))
        outputs.check_output_file(args.output)
        if args.keep_statistics is not None:
            outputs.check_output_file(args.keep_statistics, "--keep-statistics")
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
            require_ray(args.ray)
    elif args.command == "recalibrate":
        outputs.check_output_file(args.output)
        for name in ("target_fpr", "target_pixel_fpr"):
            value = getattr(args, name)
            if value is not None and not 0.0 < value < 1.0:
                raise PadimError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
    elif args.command == "update":
        if not args.add and not args.from_log:
            raise PadimError("give good pictures to add: --add PATH... and/or --from-log DIR...")
        if not args.from_log and (args.log_model is not None or args.keep_defects is not None):
            raise PadimError("--log-model and --keep-defects are --from-log options")
        outputs.check_output_file(args.output)
        if args.from_log:
            outputs.check_output_folder(defects_folder(args), "--keep-defects")
        if args.keep_statistics is not None:
            outputs.check_output_file(args.keep_statistics, "--keep-statistics")
    elif args.command == "benchmark":
        checks.check_fit_options(args.backbone, None, args.n_features, args.image_size, None, args.seed,
                                 args.batch_size, "float32", args.device, reduction=args.reduction,
                                 covariance=args.covariance, **_tile_options(args))
        outputs.check_output_folder(args.output)
        if args.cpus_per_category < 1:
            raise PadimError(f"--cpus-per-category must be at least 1, got {args.cpus_per_category}")
        if args.ray is not None:
            if args.device == "cuda":
                raise PadimError("--ray runs the categories on the workers' CPUs; --device cuda is for a local run")
            require_ray(args.ray)
    elif args.command == "predict":
        from padim.serve.settings import check_drift_delta

        check_drift_delta(args.drift_delta)
        check_predict_ray(args)
    elif args.command == "serve":
        check_serve(args)
    elif args.command == "test":
        outputs.check_output_folder(args.output if args.output is not None else Path("padim-test") / args.category)
        if args.store_oracle_thresholds and args.precision == "int8":
            raise PadimError("--store-oracle-thresholds would store thresholds of int8 scores in the model file, "
                             "whose thresholds are for f32 scores: leave it out with --precision int8")
        if args.store_oracle_thresholds and args.model.is_file():  # the thresholds are written back into it
            outputs.check_output_file(args.model, "--model")
    if args.command in ("predict", "test", "benchmark", "serve"):
        if args.precision != "f32" and args.engine != "openvino":
            raise PadimError(f"--precision {args.precision} is an OpenVINO option (--engine openvino); "
                             f"--engine {args.engine} computes in f32")
        if getattr(args, "export", None) is not None and args.engine == "torch":
            raise PadimError("--export DIR is for --engine onnxruntime or openvino")
    check_overlaps(args)
    if args.command == "predict" and args.model is None and (args.export is None or args.engine == "torch"):
        raise PadimError("--model is required (or, with --engine onnxruntime|openvino, --export DIR)")
    if args.command in ("predict", "demo") and args.output is not None:
        outputs.check_output_folder(args.output)
    elif args.command == "export":
        check_export(args)
        outputs.check_output_folder(args.output)
    elif args.command == "download":
        outputs.check_output_folder(args.to, "--to")


def check_export(args) -> None:
    """padim export: int8 is an OpenVINO graph calibrated on the model's training folder."""
    if args.precision == "int8":
        if args.format == "onnx":
            raise PadimError("--precision int8 exports OpenVINO IR: use --format openvino (or leave --format out)")
        if args.data_root is None or args.category is None:
            raise PadimError("--precision int8 needs --data-root and --category: the training folder the model was "
                             "fitted on (its images calibrate the quantisation and, held out, the thresholds)")
        if args.quantization_images < 1:
            raise PadimError(f"--quantization-images must be at least 1, got {args.quantization_images}")
    elif args.data_root is not None or args.category is not None:
        raise PadimError("--data-root and --category are for --precision int8 (an f32 export needs only --model)")
    args.format = args.format or ("openvino" if args.precision == "int8" else "onnx")


def serve_settings(args):
    """``padim serve``'s options -> its ``ServeSettings`` (not yet checked)."""
    from padim.serve.settings import ServeSettings

    return ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue=args.queue,
                         max_upload_mb=args.max_upload_mb, max_files=args.max_files, api_key=args.api_key,
                         drift_delta=args.drift_delta, webhook=args.webhook, reload_interval=args.reload_interval,
                         log_decisions=None if args.log_decisions is None else str(args.log_decisions),
                         log_max_mb=args.log_max_mb,
                         keep_flagged=None if args.keep_flagged is None else str(args.keep_flagged),
                         keep_max_gb=1.0 if args.keep_max_gb is None else args.keep_max_gb,
                         keep_good_sample=args.keep_good_sample)


def check_serve(args) -> None:
    """padim serve's settings, and the folders it writes into: writable, and not the models' folder."""
    from padim.files import outputs

    serve_settings(args).check()
    if args.keep_max_gb is not None and args.keep_flagged is None:
        raise PadimError("--keep-max-gb is the limit of --keep-flagged DIR: give that folder too")
    for option, folder in (("--log-decisions", args.log_decisions), ("--keep-flagged", args.keep_flagged)):
        if folder is not None:
            outputs.check_output_folder(folder, option)
    if args.log_decisions is not None and args.keep_flagged is not None and \
            args.log_decisions.resolve() == args.keep_flagged.resolve():
        raise PadimError("--log-decisions and --keep-flagged must be two different folders")
    models = [args.models_dir] if args.models_dir is not None else []
    outputs.check_no_overlap({"MODEL": list(args.models), "--models": models}, {},
                             {"--log-decisions": args.log_decisions, "--keep-flagged": args.keep_flagged})


def check_predict_ray(args) -> None:
    """padim predict's --ray options: the others refused, the output a results folder, Ray installed."""
    from padim.files import outputs
    from padim.cluster import connect as cluster

    ray_only = {"--actors": args.actors, "--actor-threads": args.actor_threads, "--heatmaps": args.heatmaps}
    if args.ray is None:
        for option, value in ray_only.items():
            if value is not None:
                raise PadimError(f"{option} is a --ray option (without --ray, --output DIR holds the pictures)")
        return
    if args.output is None:
        raise PadimError("--ray needs --output FOLDER: the results go there as Parquet (e.g. --output results.parquet)")
    if args.export is not None:
        raise PadimError("--ray opens the model file's export on every actor; --export DIR is for scoring without --ray")
    if args.device == "cuda":
        raise PadimError("--ray scores on the actors' CPUs; --device cuda is for scoring without --ray")
    for option in ("--actors", "--actor-threads"):
        value = ray_only[option]
        if value is not None and value < 1:
            raise PadimError(f"{option} must be at least 1, got {value}")
    if args.heatmaps is not None:
        outputs.check_output_folder(args.heatmaps, "--heatmaps")
    if cluster.is_loopback(args.ray):
        cluster.loopback_environment()  # before Ray is imported: it reads these when it loads
    cluster.require_ray_data()
    from padim.cluster.results_folder import ResultsFolder

    ResultsFolder.check(args.output)


def check_overlaps(args) -> None:
    """No output of a command is one of its inputs or another of its outputs (links and other names of
    the same file included); pictures and results never go into an input folder. The one documented
    exception: ``padim test --store-oracle-thresholds`` writes its thresholds into --model."""
    from padim.files.outputs import check_no_overlap

    weights = [args.weights] if isinstance(getattr(args, "weights", None), (str, Path)) and \
        str(args.weights) not in ("imagenet", "random") else []
    if args.command == "fit":
        if args.ignore_mask is not None and not args.ignore_mask.is_file():
            raise PadimError(f"--ignore-mask {args.ignore_mask} is not a file")
        check_no_overlap({"--data-root": [args.data_root / args.category], "--weights": weights,
                          "--ignore-mask": [args.ignore_mask]},
                         {"--output": args.output, "--keep-statistics": args.keep_statistics})
    elif args.command == "update":
        check_no_overlap({"--model": [args.model], "--statistics": [args.statistics], "--add": args.add,
                          "--from-log": args.from_log, "--weights": weights},
                         {"--output": args.output, "--keep-statistics": args.keep_statistics},
                         {"--keep-defects": defects_folder(args)} if args.from_log else {})
    elif args.command == "recalibrate":
        check_no_overlap({"--model": [args.model], "--add": args.add, "--weights": weights}, {"--output": args.output})
    elif args.command == "predict":
        inputs = {"--model": [args.model], "--export": [args.export], "PATH": args.paths, "--weights": weights}
        check_no_overlap(inputs, {}, {"--output": args.output, "--heatmaps": args.heatmaps})
    elif args.command == "test":
        inputs = {"--data-root": [args.data_root / args.category], "--export": [args.export], "--weights": weights}
        if not args.store_oracle_thresholds:
            inputs["--model"] = [args.model]
        check_no_overlap(inputs, {}, {"--output": args.output})
    elif args.command == "export":
        data = [args.data_root / args.category] if args.data_root is not None and args.category is not None else []
        check_no_overlap({"--model": [args.model], "--weights": weights, "--data-root": data}, {},
                         {"--output": args.output})


def defects_folder(args) -> Path:
    """padim update --from-log: where the pictures marked defect go (--keep-defects, or OUTPUT-defects)."""
    return args.keep_defects if args.keep_defects is not None else args.output.with_name(args.output.stem + "-defects")


def _tile_options(args) -> dict:
    """The tile options as a fit is checked before work: with --tile auto (chosen from the training
    pictures once they are found, ``padim.jobs.runs.choose_geometry``), as without tiles."""
    auto = args.tile == "auto"
    return {"tile": None if auto else args.tile, "tile_overlap": None if auto else args.tile_overlap,
            "tile_statistics": args.tile_statistics or "position"}
