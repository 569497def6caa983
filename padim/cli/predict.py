"""``padim predict``: JSON lines from the scoring pipeline, or a Ray Data job into a Parquet folder."""

from __future__ import annotations

from pathlib import Path

from padim.cli.common import expand_paths, ray_cluster, stderr, tune_malloc
from padim.errors import PadimError

def _predict_model(args):
    """The scoring model of --engine (``padim.deploy.engines.open_scoring_model``): a loaded PaDiM
    for torch; else the export of --export DIR alone (no torch), or the model file's (cached)."""
    from padim.deploy.engines import open_scoring_model

    return open_scoring_model(args.engine, args.precision, args.model, args.export, args.weights, args.device,
                              args.batch_size, progress=None)


def _predict_notes(model, point, pictures: bool) -> None:
    """What ``padim predict`` says on stderr before it scores: thresholds it cannot guarantee, no
    calibration, random weights, no masks."""
    from padim.errors import RANDOM_WEIGHTS_WARNING

    if point.warning:
        stderr(point.warning)
    if model.calibration_ is None:
        stderr("note: the model has no calibration (fitted on too few images, with --calibration-fraction 0, or by "
                "an older padim): no p-values" + ("" if point.image_threshold is not None else ", no labels"))
    if model.uses_random_weights:
        stderr(RANDOM_WEIGHTS_WARNING)
    if pictures and point.pixel_threshold is None:
        stderr("note: the model has no pixel threshold (no calibration; give --pixel-threshold): writing heatmaps, "
                "no masks")


def _predict_on_ray(args) -> None:
    """--ray: the images scored by a pool of actors on a Ray cluster into the Parquet folder --output
    (``padim.cluster.ray_scoring``); progress on stderr, a summary line on stdout."""
    import logging

    from padim.cluster import connect as cluster
    from padim.cluster.ray_scoring import score_archive
    from padim.deploy.engines import open_scoring_model

    # opened here too, so that a wrong model, weights file or threshold option is one line before any actor
    # starts, and an exported engine's cache is built once, not by every actor
    model = open_scoring_model(args.engine, args.precision, args.model, None, args.weights, "cpu", args.batch_size,
                               progress=None)
    point = model.operating_point(args.target_fpr, args.image_threshold, args.pixel_threshold)
    _predict_notes(model, point, args.heatmaps is not None)
    del model
    paths = expand_paths(args.paths)
    ray = cluster.require_ray_data()
    connected_before = ray.is_initialized()
    ray_cluster(args.ray)
    try:
        threads, cpus = args.actor_threads or 1, cluster.cpus_in_cluster(ray)
        cluster.check_task_cpus(ray, threads, "--actor-threads")
        actors = args.actors or max(1, cpus // threads)
        if actors * threads > cpus:
            raise PadimError(f"--actors {actors} x --actor-threads {threads} needs {actors * threads} CPUs; the "
                             f"cluster has {cpus}")
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes would drown the progress lines
        stderr(f"scoring {len(paths)} images on {actors} actor(s) x {threads} thread(s) -> {args.output}")
        summary = score_archive(
            ray, args.model, paths, args.output, point, actors=actors, batch_size=args.batch_size, threads=threads,
            weights=None if args.weights is None else str(Path(args.weights).resolve()), heatmaps=args.heatmaps,
            tune_malloc=True, engine=args.engine, precision=args.precision,
            progress=lambda done, total, errors: stderr(f"{done}/{total} images ({errors} errors)"))
    finally:
        if not connected_before:
            ray.shutdown()
    rate = (summary.scored + summary.errors) / max(summary.seconds, 1e-9)
    print(f"{summary.scored} scored, {summary.errors} errors, {summary.skipped} already in the folder; "
          f"{summary.seconds:.1f} s ({rate:.1f} images/s) -> {summary.output}")


def _drift_monitor(model, delta: float):
    """A drift alarm over this run's scores in input order (None without calibration): each stream
    fires with probability at most ``delta`` while the images are exchangeable with the calibration
    images. Seeded (its tie-breaking), so that a rerun prints the same lines."""
    if model.calibration_ is None:
        return None
    from padim.settings.calibration import DEFAULT_TARGET_FPR
    from padim.monitor.drift import DriftMonitor

    return DriftMonitor(model.calibration_.image_scores, delta, model.target_fpr_ or DEFAULT_TARGET_FPR, seed=0)


def _drift_step(drift, score: float, index: int, name: str):
    """Feeds one score -> log10 of the martingale of stream "all"; an alarm that fires is one stderr line."""
    if drift is None:
        return None
    from padim.monitor import STREAM_MEANING

    state = drift.update([score])
    for stream in state["new_alarms"]:
        s = state["streams"][stream]
        stderr(f"drift alarm: stream {stream} at image {index} ({name}): martingale 10^{s['martingale']['log10']:.2f} "
               f">= 1/delta = {s['threshold']:g}: {STREAM_MEANING[stream]}")
    return state["streams"]["all"]["martingale"]["log10"]


def cmd_predict(args) -> int:
    """Scores; one JSON line per input in input order: a decision, or ``{"path", "error"}`` for a file
    that cannot be read (the others are still scored; exit status 1 when any failed, with a closing
    summary on stderr). With --output, per input NAME.EXT (the whole file name, so 000.png and
    000.tif do not collide) writes NAME.EXT_heatmap.png (long side <= 4096 px) and NAME.EXT_mask.png
    (full size), mirroring the inputs' subfolders. With --engine onnxruntime|openvino and --export
    DIR, scoring needs no torch (pictures still do). With --ray, see ``_predict_on_ray``."""
    from padim.pipeline.batches import score_sources
    from padim.pipeline.records import decision, failure, ignored_pixels, json_line
    from padim.pipeline.sources import Source, expand_paths

    if args.ray is not None:
        return _predict_on_ray(args)
    model = _predict_model(args)
    point = model.operating_point(args.target_fpr, args.image_threshold, args.pixel_threshold)
    _predict_notes(model, point, args.output is not None)
    paths = expand_paths(args.paths, note=stderr)
    if args.engine == "torch" and model.device_.type == "cpu":
        tune_malloc()
    if args.output is not None:
        from padim.render.visualize import common_parent, save_prediction_pictures

        common = common_parent(paths)
        ignore = ignored_pixels(model)  # hatched on the heatmaps (the torch engine knows it)
    ahead = 1 if args.engine == "torch" and model.device_.type != "cpu" else 0
    counts = {"scored": 0, "errors": 0}
    drift = _drift_monitor(model, args.drift_delta)
    sources = [Source(str(path), path) for path in paths]
    for batch in score_sources(model, sources, model.batch_size, model.workers, ahead, None, "predict"):
        read = [item for item in batch if item.error is None]
        p_values = model.p_values([item.score for item in read]) if read else None
        p_of = dict(zip((item.index for item in read), [None] * len(read) if p_values is None else p_values.tolist()))
        for item in batch:
            if item.error is not None:
                counts["errors"] += 1
                print(json_line(failure(item.source.name, item.error)), flush=True)
                continue
            counts["scored"] += 1
            record = decision(item.source.name, item.score, p_of[item.index], point)
            record["drift_log10"] = _drift_step(drift, item.score, item.index, item.source.name)
            if model.uses_random_weights:
                record["warning"] = "random backbone weights"
            if args.output is not None:  # pictures and masks need no torch (NumPy, Pillow, matplotlib)
                save_prediction_pictures(item.source.item, item.map, item.original_hw, model.config_,
                                         point.pixel_threshold, args.output, common, ignore)
            print(json_line(record), flush=True)
    stderr(f"scored {counts['scored']}, {counts['errors']} errors")
    return 1 if counts["errors"] else 0
