"""The commands but ``predict``: parse -> call the library -> print (``padim.cli.predict`` has predict)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from padim.cli.common import expand_paths, ray_cluster, stderr, tune_malloc
from padim.errors import PadimError

def nncf_output_to_stderr():
    """While an int8 export is made: NNCF's progress bars (rich, on stdout) go to stderr, where
    progress belongs; stdout is the command's results."""
    return contextlib.redirect_stdout(sys.stderr)


def cmd_fit(args) -> None:
    from padim.jobs.runs import fit_category

    cluster = None
    if args.ray is not None:
        from padim.cluster.ray_fit import RayFit

        ray_cluster(args.ray)
        cluster = RayFit(args.ray, shards=args.shards, cpus_per_shard=args.cpus_per_shard, log=stderr)
    layers = [layer.strip() for layer in args.layers.split(",")] if args.layers else None
    model = fit_category(args.data_root, args.category, args.output, backbone=args.backbone, weights=args.weights,
                         layers=layers, n_features=args.n_features, image_size=args.image_size, crop=args.crop,
                         seed=args.seed, factor_dtype=args.factor_dtype, batch_size=args.batch_size,
                         reduction=args.reduction, covariance=args.covariance, tile=args.tile,
                         tile_overlap=args.tile_overlap, tile_statistics=args.tile_statistics,
                         ignore_mask=args.ignore_mask, calibration_fraction=args.calibration_fraction, calibration=args.calibration,
                         folds=args.folds, target_fpr=args.target_fpr, target_pixel_fpr=args.target_pixel_fpr,
                         device=args.device, progress=None, keep_statistics=args.keep_statistics, cluster=cluster)
    size_mb = args.output.stat().st_size / 1e6
    options = "" if (model.config_.reduction, model.config_.covariance) == ("random", "fixed") else \
        f", {model.config_.reduction} reduction, {model.config_.covariance} covariance"
    if model.config_.tile is not None:
        from padim.core.tiling import n_tiles

        options += (f", {n_tiles(model.config_)} tiles of {model.config_.tile} px per picture "
                    f"({model.config_.tile_statistics} statistics)")
    print(f"fitted {model.config_.backbone} (weights: {model.weights_source_}, d={model.config_.n_features}{options}, "
          f"layers {','.join(model.config_.layers)}) on {model.n_train_images_} images of {args.category} "
          f"in {model.fit_seconds_:.1f} s -> {args.output} ({size_mb:.1f} MB)")


def cmd_update(args) -> None:
    from padim.core.estimator import PaDiM
    from padim.core.statistics import FitStatistics
    from padim.files.atomic import write_together

    model = PaDiM.load(args.model, device=args.device, batch_size=args.batch_size, progress=None, weights=args.weights)
    model.attach_statistics(FitStatistics.load(args.statistics))
    images = expand_paths(args.add) if args.add else []
    verdicts = None
    if args.from_log:
        from padim.monitor.verdicts import read_verdicts

        verdicts = read_verdicts(args.from_log, args.log_model or args.model.stem)
        images += verdicts.good
        if not images:
            raise PadimError(f"no picture to add: under {', '.join(map(str, args.from_log))}, {verdicts.feedback} "
                             f"verdicts on model {args.log_model or args.model.stem}, none 'good' on a kept picture"
                             + (f" (models there: {', '.join(verdicts.models)}; --log-model NAME)" if verdicts.models else ""))
    before = model.n_train_images_
    model.partial_fit(images)
    if verdicts is not None:  # before the model is written: a picture gone since is one line, nothing written
        from padim.cli.checks import defects_folder
        from padim.monitor.verdicts import keep_labelled

        keep_labelled(verdicts.defect, defects_folder(args))
    writes = [(args.output, model.save)]
    if args.keep_statistics is not None:
        writes.append((args.keep_statistics, model.statistics_.save))
    write_together(writes)  # both or neither
    print(f"added {len(images)} images to {before}: {args.output} is fitted on {model.n_train_images_} images"
          + (f"; statistics -> {args.keep_statistics}" if args.keep_statistics is not None else ""))
    if verdicts is not None:
        folder = defects_folder(args)
        print(f"from the line: {len(verdicts.good)} pictures operators marked good ({verdicts.false_alarms} of them "
              f"false alarms) added; {len(verdicts.defect)} marked defect -> {folder}"
              + (f"; {verdicts.unmatched} verdicts on pictures not kept" if verdicts.unmatched else ""))
    if model.image_threshold_ is not None or model.pixel_threshold_ is not None:
        stderr(f"note: {model.calibration_note_}")


def cmd_recalibrate(args) -> None:
    from padim.core.estimator import PaDiM

    model = PaDiM.load(args.model, device=args.device, batch_size=args.batch_size, progress=None, weights=args.weights)
    before = model.image_threshold_
    images = expand_paths(args.add)
    model.recalibrate(images, target_fpr=args.target_fpr, target_pixel_fpr=args.target_pixel_fpr)
    model.save(args.output)
    was = "none" if before is None else f"{before:.4g}"
    print(f"recalibrated on {model.calibration_.n} good pictures: image threshold {was} -> "
          f"{model.image_threshold_:.4g} ({model.threshold_source_}), pixel threshold {model.pixel_threshold_:.4g}; "
          f"scores unchanged -> {args.output}")
    print(f"the guarantee now covers pictures exchangeable with these {model.calibration_.n} (same line, lighting and "
          "camera as they were taken)")
    if model.calibration_.rank(model.target_fpr_) > model.calibration_.n:
        stderr(f"warning: {model.threshold_source_}")


def _metrics_table(category: str, metrics: dict) -> str:
    from padim.jobs.evaluate import METRIC_KEYS

    header = "| Category | " + " | ".join(METRIC_KEYS) + " |"
    rule = "|" + "---|" * (len(METRIC_KEYS) + 1)
    row = f"| {category} | " + " | ".join("n/a" if metrics[key] is None else f"{metrics[key]:.4f}"
                                         for key in METRIC_KEYS) + " |"
    return "\n".join([header, rule, row])


def cmd_test(args) -> None:
    from padim.jobs.runs import test_category

    output = args.output if args.output is not None else Path("padim-test") / args.category
    with nncf_output_to_stderr() if args.precision == "int8" else contextlib.nullcontext():
        summary = test_category(args.model, args.data_root, args.category, output, args.save_images,
                                args.max_images, args.device, args.batch_size, weights=args.weights, tune_malloc=True,
                                target_fpr=args.target_fpr, store_oracle_thresholds=args.store_oracle_thresholds,
                                engine=args.engine, precision=args.precision, export=args.export)
    print(_metrics_table(args.category, summary))
    print(f"{summary['n_test_images']} test images in {summary['test_s']:.1f} s "
          f"({summary['test_ms_per_image']:.1f} ms/image, engine {args.engine}"
          f"{'' if args.precision == 'f32' else ' ' + args.precision}); metrics -> {output / 'metrics.json'}")
    print(f"best-F1 thresholds, chosen on this test set (optimistic): image {summary['oracle_image_threshold']:.4g}, "
          f"pixel {'n/a' if summary['oracle_pixel_threshold'] is None else format(summary['oracle_pixel_threshold'], '.4g')}"
          + (f"; stored in {args.model}" if args.store_oracle_thresholds else ""))
    if summary["image_F1_calibrated"] is not None:
        source = summary["calibrated_threshold_source"] + ("" if args.precision != "int8" else
                                                           f"; thresholds from: {summary['thresholds_from']}")
        print(f"at the calibrated thresholds ({source}): "
              f"good images flagged {summary['good_FPR_calibrated']:.3f}, defects caught "
              f"{summary['image_recall_calibrated']:.3f}, image F1 {summary['image_F1_calibrated']:.4f}"
              + (f", pixel F1 {summary['pixel_F1_calibrated']:.4f}" if summary["pixel_F1_calibrated"] is not None else ""))
    if args.save_images:
        print(f"{len(summary['pictures'])} pictures -> {output}")


def _print_results(output: Path) -> None:
    print((output / "results.md").read_text(), end="")
    print(f"report: {(output / 'report.html').resolve()}")


def _fail_on_failed_categories(rows) -> None:
    """After the table is printed: a failed category makes the command fail (exit 1, one line), so a
    script or CI never takes a benchmark whose categories failed for a success."""
    failed = [row for row in rows if "error" in row]
    if len(failed) == 1:
        raise PadimError(f"category {failed[0]['category']!r} failed: {failed[0]['error']}")
    if failed:
        raise PadimError(f"{len(failed)} of {len(rows)} categories failed "
                         f"({', '.join(row['category'] for row in failed)}): see the table above")


def cmd_benchmark(args) -> None:
    from padim.jobs.benchmark import parse_categories, run_benchmark

    if args.ray is not None:
        ray_cluster(args.ray)
    rows = run_benchmark(args.data_root, parse_categories(args.categories), args.output, force=args.force,
                         max_images=args.max_images, batch_size=args.batch_size, device=args.device,
                         backbone=args.backbone, weights=args.weights, n_features=args.n_features,
                         image_size=args.image_size, seed=args.seed, tune_malloc=True, engine=args.engine,
                         precision=args.precision, reduction=args.reduction, covariance=args.covariance, ray=args.ray,
                         cpus_per_category=args.cpus_per_category, tile=args.tile, tile_overlap=args.tile_overlap,
                         tile_statistics=args.tile_statistics)
    _print_results(args.output)
    _fail_on_failed_categories(rows)


def cmd_export(args) -> None:
    from padim.deploy.cache import export_file
    from padim.errors import RANDOM_WEIGHTS_WARNING

    if args.precision == "int8":
        from padim.data.mvtec import find_category
        from padim.deploy.quantize import export_int8

        train = find_category(args.data_root, args.category, note=stderr).train
        with nncf_output_to_stderr():
            folder = export_int8(args.model, train, args.output, weights=args.weights,
                                 n_images=args.quantization_images)
    else:
        folder = export_file(args.model, args.format, args.output, weights=args.weights)
    record = json.loads((folder / "padim.json").read_text())
    if record["model"].get("config", {}).get("weights") == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    size_mb = sum((folder / name).stat().st_size for name in record["files"]) / 1e6
    kind = args.format if args.precision == "f32" else f"{args.format} int8"
    thresholds = "" if args.precision == "f32" else f" (thresholds from: {record['model'].get('thresholds_from')})"
    print(f"exported {args.model} as {kind} -> {folder} ({', '.join(record['files'])}, {size_mb:.1f} MB; "
          f"padim.json holds the config and thresholds{thresholds})")


def cmd_download(args) -> None:
    from dataclasses import replace

    from padim.jobs.benchmark import parse_categories
    from padim.jobs.download import MVTEC_AD, extract, fetch

    archive = replace(MVTEC_AD, url=args.url or MVTEC_AD.url, sha256=(args.sha256 or MVTEC_AD.sha256).lower())
    categories = None if args.categories.strip() == "all" else parse_categories(args.categories)
    path = fetch(archive, args.to)
    print(f"{path}: sha256 verified")
    done = extract(path, args.to, categories)
    print(f"unpacked {', '.join(done)} into {args.to}; use --data-root {args.to}")


def cmd_demo(args) -> None:
    from padim.jobs.benchmark import run_benchmark
    from padim.data.synthetic import make_synthetic_category

    started = time.perf_counter()
    output: Path = args.output
    print(f"generating a synthetic fabric category in {output / 'data'} ...")
    folder = make_synthetic_category(output / "data")
    rows = run_benchmark(output / "data", [folder.name], output, force=True, device=args.device,
                         backbone="efficientnet_lite0", weights="imagenet", tune_malloc=True)
    _print_results(output)
    _fail_on_failed_categories(rows)
    print(f"demo done in {time.perf_counter() - started:.0f} s")


def cmd_serve(args) -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "prometheus_client", "python_multipart", "uvicorn")  # the serve extra
               if importlib.util.find_spec(name) is None]
    if missing:
        raise PadimError(f"the service needs the serve extra ({missing[0]} is missing): pip install \"padim-inspect[serve]\" "
                         "(from a checkout: pip install \".[serve]\")")
    from padim.cli.checks import serve_settings
    from padim.serve import load_models
    from padim.serve.registry import model_files
    from padim.serve.server import run
    from padim.serve.versions import ModelSource

    settings = serve_settings(args)
    settings.check()
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"padim serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the service", file=sys.stderr)
    models = load_models(model_files(args.models, args.models_dir), device=args.device, batch_size=args.max_batch,
                         engine=args.engine, precision=args.precision)
    source = ModelSource(args.models, args.models_dir, device=args.device, batch_size=args.max_batch,
                         engine=args.engine, precision=args.precision)
    if any(getattr(entry.model, "device_", None) is not None and entry.model.device_.type == "cpu"
           for entry in models.values()):
        tune_malloc()
    run(models, settings, host=args.host, port=args.port, log_level=args.log_level, source=source)
