"""Scoring an archive of images on a Ray cluster (Ray Data) into a Parquet folder that a rerun resumes.

The pipeline (``padim predict --ray``):

    paths still to score  --ray.data.from_items-->  blocks of rows {path, file}
      --map_batches(Scorer), a pool of actors-->   each actor loads the model once (one core and one
                                                   torch thread by default) and scores a batch of paths
      --iter_batches, in the driver-->             rows written as Parquet part files as they arrive

One row per image: path, score, p_value, label, threshold, threshold_source, error (``SCHEMA``). Each
file is decoded alone (``images.load_pixels``): an unreadable, corrupt or too big picture becomes a
row with its error and a null score, never a failed job. The pictures of a batch that decoded are
scored together by ``PaDiM.score_pixels``, the steps ``iter_predict`` runs after decoding, and decided
like ``padim predict`` does: the same numbers and labels as a local run.

The output folder (``ResultsFolder``): ``part-NNNNN.parquet`` files, which ``pandas.read_parquet`` and
``pyarrow.dataset`` read as one table, and ``_padim.json``, the model and thresholds the rows come from
(a rerun with another model or operating point is refused). Each part is written whole under a
temporary name and renamed into place (``padim.files.atomic``), so an interruption leaves whole parts and
at most a temporary (dot names: readers skip them); the driver's memory holds one open part. A rerun
reads the parts' paths and scores only the others, and the driver drops any row whose path it has
already written (Ray retries the batches of a lost actor), so no path is ever written twice.

On a cluster of several machines the actors read the model and the images, and write --heatmaps, at
the same paths as the driver sees them (a shared file system); the Parquet folder is written by the
driver alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

import numpy as np
import pyarrow as pa

from padim.cluster.results_folder import SCHEMA, ResultsFolder, path_key
from padim.settings.calibration import OperatingPoint
from padim.errors import PadimError, one_line
from padim.pipeline.batches import decode_source
from padim.pipeline.records import decision, failure
from padim.pipeline.sources import Source

ROWS_PER_PART = 256  # rows the driver holds before it writes a part ...
SECONDS_PER_PART = 30.0  # ... or seconds, whichever comes first (slow pictures still commit progress)


# ----------------------------------------------------------------------------------------- scoring
def score_files(model, paths: Sequence[str], files: Sequence[str], point: OperatingPoint,
                pictures: Optional[Callable] = None) -> pa.Table:
    """One batch -> a table of ``SCHEMA``, a row per file in order.

    model: any engine (``padim.deploy.engines.ScoringModel``); paths: as the user gave them (the ``path`` column); files: where to
    read them (absolute); point: the operating point that decides labels; pictures: called as
    ``pictures(file, anomaly_map (H, W), original (h, w))`` for each scored image (heatmaps), whose
    failure is the row's error while its score is kept.
    """
    n = len(files)
    errors: List[Optional[str]] = [None] * n
    decoded, where, sizes = [], [], []
    for i, (path, file) in enumerate(zip(paths, files)):
        item = decode_source(Source(path, file), model.config_)  # (H, W, 3) uint8, (h, w); or its error
        if item.error is not None:
            errors[i] = item.error
            continue
        decoded.append(item.pixels)
        where.append(i)
        sizes.append(item.original_hw)
    scores = np.full(n, np.nan)
    if decoded:
        batch_scores, maps = model.score_pixels(np.stack(decoded))  # (B,), (B, H, W): the model's engine
        del decoded
        scores[where] = batch_scores
        if pictures is not None:
            for i, anomaly_map, size in zip(where, maps, sizes):
                try:
                    pictures(files[i], anomaly_map, size)
                except Exception as exc:
                    errors[i] = f"heatmap not written: {one_line(exc)}"
    scored = np.zeros(n, dtype=bool)
    scored[where] = True
    p_values = np.full(n, np.nan)
    if scored.any() and model.calibration_ is not None:
        p_values[scored] = model.p_values(scores[scored])
    rows = [failure(path, errors[i]) if not scored[i] else
            {**decision(path, scores[i], None if np.isnan(p_values[i]) else p_values[i], point), "error": errors[i]}
            for i, path in enumerate(paths)]  # the records of padim predict's JSON lines, as columns
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class Scorer:
    """A Ray Data actor (``map_batches(Scorer, ...)``): opens the model once with ``engine`` (the
    driver has built an exported engine's cache already), scores batches of rows {path, file}.
    threads: the engine's threads (1: one actor per core); tune_malloc: the command's
    ``memory.tune_malloc_for_scoring`` in this actor's process, which only scores."""

    def __init__(self, model_path: str, point: OperatingPoint, weights: Optional[str] = None, batch_size: int = 32,
                 threads: int = 1, heatmaps: Optional[str] = None, common: Optional[str] = None,
                 tune_malloc: bool = False, engine: str = "torch", precision: str = "f32"):
        from padim.deploy.engines import open_scoring_model

        if engine == "torch":
            import torch

            torch.set_num_threads(threads)  # this actor's process only scores
        if tune_malloc:
            from padim.files.memory import tune_malloc_for_scoring

            tune_malloc_for_scoring()
        self.model = open_scoring_model(engine, precision, model_path, weights=weights, device="cpu",
                                        batch_size=batch_size, workers=1, threads=threads)
        self.point = point
        self.pictures = None
        if heatmaps is not None:
            import torch

            from padim.render.visualize import save_prediction_pictures

            def pictures(file, anomaly_map, size):
                save_prediction_pictures(Path(file), anomaly_map, size, self.model.config_, point.pixel_threshold,
                                         Path(heatmaps), Path(common))

            self.pictures = pictures

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        return score_files(self.model, [str(p) for p in batch["path"]], [str(f) for f in batch["file"]], self.point,
                           self.pictures)


# ----------------------------------------------------------------------------------------- the job
@dataclass
class ScoringSummary:
    total: int  # paths asked for
    skipped: int  # already in the folder (an earlier run)
    scored: int  # rows written by this run with a score
    errors: int  # rows written by this run without one
    seconds: float
    output: Path


def shown_path(path) -> str:
    """The path as a row can hold it: as given, or with bytes that are not UTF-8 escaped (\\xNN)."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def model_identity(model_path, point: OperatingPoint, heatmaps: bool = False, engine: str = "torch",
                   precision: str = "f32") -> dict:
    """What the rows depend on: the model file (its stored checksum, else its size and time), the
    engine (their scores differ in the last digits), the image threshold with its source; with
    heatmaps, the pixel threshold their masks are drawn at."""
    from padim.files.safetensors_io import read_metadata

    checksum = read_metadata(model_path).get("checksum")
    if checksum is None:
        stat = Path(model_path).stat()
        checksum = f"size {stat.st_size}, modified {stat.st_mtime_ns}"
    identity = {"model": checksum, "threshold": point.image_threshold, "threshold source": point.source}
    if (engine, precision) != ("torch", "f32"):  # folders of torch runs keep their identity of before
        identity["engine"] = engine if precision == "f32" else f"{engine} {precision}"
    if heatmaps:
        identity["pixel threshold"] = point.pixel_threshold
    return identity


def score_archive(ray, model_path, paths: Sequence[Path], output, point: OperatingPoint, *, actors: int,
                  batch_size: int = 32, threads: int = 1, weights: Optional[str] = None, heatmaps=None,
                  tune_malloc: bool = False, engine: str = "torch", precision: str = "f32",
                  rows_per_part: int = ROWS_PER_PART,
                  seconds_per_part: float = SECONDS_PER_PART,
                  progress: Optional[Callable[[int, int, int], None]] = None) -> ScoringSummary:
    """Scores ``paths`` with the model file on the connected Ray cluster into the Parquet folder
    ``output``, skipping the paths it already holds (see the module's docstring).

    point: the operating point (``PaDiM.operating_point``) that decides labels; actors: the size of
    the actor pool, each taking ``threads`` CPUs and torch threads; heatmaps: a folder for ``padim
    predict``'s pictures, or None; progress: called as ``progress(rows done, total, errors)`` after
    each part is written.
    """
    started = time.perf_counter()
    results = ResultsFolder(output)
    results.lock()
    try:
        return _score_archive(ray, results, model_path, paths, output, point, started, actors, batch_size, threads,
                              weights, heatmaps, tune_malloc, (engine, precision), rows_per_part, seconds_per_part,
                              progress)
    finally:
        results.unlock()


def _score_archive(ray, results, model_path, paths, output, point, started, actors, batch_size, threads, weights,
                   heatmaps, tune_malloc, engine, rows_per_part, seconds_per_part, progress) -> "ScoringSummary":
    done = results.open(model_identity(model_path, point, heatmaps is not None, *engine))
    todo = [p for p in paths if path_key(shown_path(p)) not in done]
    summary = ScoringSummary(len(paths), len(paths) - len(todo), 0, 0, 0.0, Path(output))
    unnamed = [p for p in todo if shown_path(p) != str(p)]  # not UTF-8: Arrow and Parquet cannot hold the name
    if unnamed:
        todo = [p for p in todo if shown_path(p) == str(p)]
        results.write(pa.table({"path": [shown_path(p) for p in unnamed], "score": [None] * len(unnamed),
                                "p_value": [None] * len(unnamed), "label": [None] * len(unnamed),
                                "threshold": [point.image_threshold] * len(unnamed),
                                "threshold_source": [point.source] * len(unnamed),
                                "error": ["the file name is not valid UTF-8 (shown escaped): rename the file"]
                                * len(unnamed)}, schema=SCHEMA))
        summary.errors += len(unnamed)
        done.update(path_key(shown_path(p)) for p in unnamed)
    if todo:
        common = None
        if heatmaps is not None:
            from padim.render.visualize import common_parent

            common = str(common_parent(paths))  # of all paths: a rerun names the pictures alike
        scorer = dict(model_path=str(Path(model_path).resolve()), point=point, weights=weights, batch_size=batch_size,
                      threads=threads, heatmaps=None if heatmaps is None else str(Path(heatmaps).resolve()),
                      common=common, tune_malloc=tune_malloc, engine=engine[0], precision=engine[1])
        items = [{"path": str(p), "file": path_key(p)} for p in todo]
        blocks = -(-len(items) // batch_size)
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        actors = min(actors, blocks)  # a short job: no actor that would wait for nothing
        dataset = dataset.map_batches(Scorer, fn_constructor_kwargs=scorer, batch_size=batch_size, num_cpus=threads,
                                      batch_format="numpy", concurrency=actors)
        context = dataset.context  # this dataset's settings, not the process's
        context.enable_progress_bars = False  # progress is ``progress``'s
        context.print_on_execution_start = context.enable_auto_log_stats = False
        _drain(dataset, results, done, summary, len(paths), rows_per_part, seconds_per_part, progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _drain(dataset, results: ResultsFolder, done: Set[str], summary: ScoringSummary, total: int, rows_per_part: int,
           seconds_per_part: float, progress) -> None:
    """Consumes the dataset's batches as they stream in and writes them part by part; what is held
    when the run stops (an error, Ctrl-C) is written before the error goes on."""
    pending: List[pa.Table] = []
    held, last = 0, time.monotonic()

    def flush():
        nonlocal pending, held, last
        if held:
            table = pa.concat_tables(pending)
            results.write(table)
            summary.scored += table.num_rows - table.column("score").null_count
            summary.errors += table.num_rows - table.column("error").null_count  # a failed picture too
            if progress is not None:
                progress(summary.skipped + summary.scored + summary.errors, total, summary.errors)
        pending, held, last = [], 0, time.monotonic()

    batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for table in _one_line_errors(batches):
            keep = [path_key(p) not in done for p in table.column("path").to_pylist()]
            if not all(keep):  # a retried batch: its rows were written already
                table = table.filter(pa.array(keep))
            done.update(path_key(p) for p in table.column("path").to_pylist())
            pending.append(table.cast(SCHEMA))
            held += table.num_rows
            if held >= rows_per_part or time.monotonic() - last >= seconds_per_part:
                flush()
    finally:
        try:
            flush()
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()


def _one_line_errors(batches):
    """The batches; a failure of the Ray job (an actor that cannot load the model, a lost node) as one
    PadimError line instead of Ray's traceback."""
    from ray.exceptions import RayError


    try:
        yield from batches
    except RayError as exc:
        cause = getattr(exc, "cause", None)
        raise PadimError(f"the Ray job failed: {one_line(cause if cause is not None else exc)}") from None
    except Exception as exc:  # Ray Data wraps errors of user code (the Scorer) in its own types
        if type(exc).__module__.startswith("ray."):
            cause = exc.__cause__ or getattr(exc, "cause", None) or exc
            raise PadimError(f"the Ray job failed: {one_line(cause)}") from None
        raise
