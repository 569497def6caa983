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
temporary name and renamed into place (``padim.atomic``), so an interruption leaves whole parts and
at most a temporary (dot names: readers skip them); the driver's memory holds one open part. A rerun
reads the parts' paths and scores only the others, and the driver drops any row whose path it has
already written (Ray retries the batches of a lost actor), so no path is ever written twice.

On a cluster of several machines the actors read the model and the images, and write --heatmaps, at
the same paths as the driver sees them (a shared file system); the Parquet folder is written by the
driver alone.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .atomic import atomic_write, is_stale
from .calibration import OperatingPoint, labels_at
from .errors import PadimError
from .images import load_pixels  # torch-free, as this module

SCHEMA = pa.schema([("path", pa.string()), ("score", pa.float64()), ("p_value", pa.float64()),
                    ("label", pa.string()), ("threshold", pa.float64()), ("threshold_source", pa.string()),
                    ("error", pa.string())])
MANIFEST = "_padim.json"
PART = re.compile(r"part-(\d{5,})\.parquet")
ROWS_PER_PART = 256  # rows the driver holds before it writes a part ...
SECONDS_PER_PART = 30.0  # ... or seconds, whichever comes first (slow pictures still commit progress)


def describe_error(exc: BaseException) -> str:
    """One line for a row's ``error``: padim's own message (it names the file), else the type and the
    first line of the exception."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, PadimError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------- scoring
def score_files(model, paths: Sequence[str], files: Sequence[str], point: OperatingPoint,
                pictures: Optional[Callable] = None) -> pa.Table:
    """One batch -> a table of ``SCHEMA``, a row per file in order.

    model: a loaded ``PaDiM``; paths: as the user gave them (the ``path`` column); files: where to
    read them (absolute); point: the operating point that decides labels; pictures: called as
    ``pictures(file, anomaly_map (H, W), original (h, w))`` for each scored image (heatmaps), whose
    failure is the row's error while its score is kept.
    """
    n = len(files)
    errors: List[Optional[str]] = [None] * n
    decoded, where, sizes = [], [], []
    for i, file in enumerate(files):
        try:
            pixels, size = load_pixels(file, model.config_)  # (H, W, 3) uint8, (h, w)
        except Exception as exc:  # whatever stops one file from being read is that file's row
            errors[i] = describe_error(exc)
            continue
        decoded.append(pixels)
        where.append(i)
        sizes.append(size)
    scores = np.full(n, np.nan)
    if decoded:
        batch_scores, maps = model.score_pixels(np.stack(decoded))  # (B,), (B, H, W)
        del decoded
        scores[where] = batch_scores.numpy()
        if pictures is not None:
            for i, anomaly_map, size in zip(where, maps, sizes):
                try:
                    pictures(files[i], anomaly_map, size)
                except Exception as exc:
                    errors[i] = f"heatmap not written: {describe_error(exc)}"
    scored = np.zeros(n, dtype=bool)
    scored[where] = True
    p_values = np.full(n, np.nan)
    if scored.any() and model.calibration_ is not None:
        p_values[scored] = model.p_values(scores[scored])
    labels = labels_at(scores[scored], point.image_threshold)
    label_column: List[Optional[str]] = [None] * n
    if labels is not None:
        for i, anomalous in zip(where, labels.tolist()):
            label_column[i] = "anomalous" if anomalous else "good"
    return pa.table({
        "path": list(paths),
        "score": pa.array(scores, mask=~scored),
        "p_value": pa.array(p_values, mask=np.isnan(p_values)),
        "label": label_column,
        "threshold": [point.image_threshold] * n,
        "threshold_source": [point.source] * n,
        "error": errors,
    }, schema=SCHEMA)


class Scorer:
    """A Ray Data actor (``map_batches(Scorer, ...)``): loads the model once, scores batches of rows
    {path, file}. threads: torch threads (1: one actor per core); tune_malloc: the command's
    ``memory.tune_malloc_for_scoring`` in this actor's process, which only scores."""

    def __init__(self, model_path: str, point: OperatingPoint, weights: Optional[str] = None, batch_size: int = 32,
                 threads: int = 1, heatmaps: Optional[str] = None, common: Optional[str] = None,
                 tune_malloc: bool = False):
        import torch

        from .model import PaDiM

        torch.set_num_threads(threads)
        if tune_malloc:
            from .memory import tune_malloc_for_scoring

            tune_malloc_for_scoring()
        self.model = PaDiM.load(model_path, device="cpu", batch_size=batch_size, workers=1, weights=weights)
        self.point = point
        self.pictures = None
        if heatmaps is not None:
            from .visualize import save_prediction_pictures

            def pictures(file, anomaly_map, size):
                save_prediction_pictures(Path(file), anomaly_map, size, self.model.config_, point.pixel_threshold,
                                         Path(heatmaps), Path(common))

            self.pictures = pictures

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        return score_files(self.model, [str(p) for p in batch["path"]], [str(f) for f in batch["file"]], self.point,
                           self.pictures)


# ----------------------------------------------------------------------------------------- the folder
class ResultsFolder:
    """A Parquet dataset folder of result rows: ``part-NNNNN.parquet`` + ``MANIFEST``.

    identity: what the rows depend on (the model's checksum, the thresholds); a folder written with
    another identity is refused rather than mixed.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._next: Optional[int] = None  # number of the next part

    @staticmethod
    def check(folder: Path, option: str = "--output") -> None:
        """Refuses a file, or a folder that holds anything but results (before any work)."""
        folder = Path(folder)
        if os.path.lexists(folder) and not folder.is_dir():
            raise PadimError(f"{option} {folder} is a file; give a folder for the Parquet results, e.g. results.parquet")
        foreign = folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())
        if foreign and not (folder / MANIFEST).is_file():
            raise PadimError(f"{option} {folder} is a folder that does not hold padim predict --ray results "
                             f"(no {MANIFEST}): give a new folder, or that of an earlier run to resume it")

    def lock(self) -> None:
        """Takes the folder for this run (``.lock``: host and pid), or refuses when another live run
        holds it: two runs would write parts of the same numbers and score the same paths."""
        import socket

        self.folder.mkdir(parents=True, exist_ok=True)
        lock, mine = self.folder / ".lock", f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, _, pid = lock.read_text().partition(" ") if lock.is_file() else ("", "", "")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    lock.unlink(missing_ok=True)  # left by a run that was killed
                    continue
                raise PadimError(f"another run is writing to {self.folder} ({lock.name}: {host} pid {pid}); "
                                 "wait for it, or remove the lock if that run is gone") from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(mine)
            self._lock = lock
            return

    def unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.unlink(missing_ok=True)
            self._lock = None

    def parts(self) -> List[Path]:
        return sorted(p for p in self.folder.iterdir() if PART.fullmatch(p.name)) if self.folder.is_dir() else []

    def open(self, identity: dict) -> Set[str]:
        """Creates the folder (or checks an earlier run's identity) -> the keys (``path_key``) of the
        paths it holds rows for. Removes temporaries left by killed runs."""
        self.check(self.folder)
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                raise PadimError(f"cannot read {manifest}: {describe_error(exc)}") from None
            before = stored.get("identity", {}) if isinstance(stored, dict) else {}
            changed = [key for key in identity  # heatmaps may be asked for on a rerun, not at another threshold
                       if (key in before or key != "pixel threshold") and before.get(key) != identity[key]]
            if changed:
                was = ", ".join(f"{key} {before.get(key)!r}" for key in changed)
                raise PadimError(f"{self.folder} holds the results of another {' and '.join(changed)} ({was}): "
                                 "give a new --output folder, or the same model and options to resume")
            base = stored.get("working_directory") if isinstance(stored, dict) else None
        else:
            base = os.getcwd()
            record = {"padim": __version__, "columns": SCHEMA.names, "identity": identity, "working_directory": base}
            atomic_write(manifest, lambda handle: handle.write(json.dumps(record, indent=1).encode()), what="manifest")
        for temporary in self.folder.glob(".part-*.tmp"):  # parts a killed run was writing
            if is_stale(temporary):
                temporary.unlink(missing_ok=True)
        done: Set[str] = set()
        for part in self.parts():
            try:
                written = pq.read_table(part, columns=["path"]).column("path").to_pylist()
            except (OSError, pa.ArrowException) as exc:
                raise PadimError(f"cannot read {part} (remove it to score its images again): "
                                 f"{describe_error(exc)}") from None
            if base and os.path.realpath(base) != os.path.realpath(os.getcwd()) and \
                    any(not os.path.isabs(p) for p in written):
                # relative paths name other files from here: matching them would score everything twice
                raise PadimError(f"{self.folder} holds paths relative to {base}: resume from that folder")
            done.update(path_key(p) for p in written)
        return done

    def write(self, table: pa.Table) -> Path:
        """Writes ``table`` as the next part, atomically."""
        if self._next is None:
            self._next = 1 + max((int(PART.fullmatch(p.name).group(1)) for p in self.parts()), default=-1)
        path = self.folder / f"part-{self._next:05d}.parquet"
        atomic_write(path, lambda handle: pq.write_table(table, handle), what="Parquet part")
        self._next += 1
        return path


def path_key(path) -> str:
    """What a rerun matches paths by: absolute, normalised (relative paths: from the same folder)."""
    return os.path.abspath(str(path))


# ----------------------------------------------------------------------------------------- the job
@dataclass
class ScoringSummary:
    total: int  # paths asked for
    skipped: int  # already in the folder (an earlier run)
    scored: int  # rows written by this run with a score
    errors: int  # rows written by this run without one
    seconds: float
    output: Path


def model_identity(model_path, point: OperatingPoint, heatmaps: bool = False) -> dict:
    """What the rows depend on: the model file (its stored checksum, else its size and time) and the
    image threshold with its source; with heatmaps, the pixel threshold their masks are drawn at."""
    from .io import read_metadata

    checksum = read_metadata(model_path).get("checksum")
    if checksum is None:
        stat = Path(model_path).stat()
        checksum = f"size {stat.st_size}, modified {stat.st_mtime_ns}"
    identity = {"model": checksum, "threshold": point.image_threshold, "threshold source": point.source}
    if heatmaps:
        identity["pixel threshold"] = point.pixel_threshold
    return identity


def score_archive(ray, model_path, paths: Sequence[Path], output, point: OperatingPoint, *, actors: int,
                  batch_size: int = 32, threads: int = 1, weights: Optional[str] = None, heatmaps=None,
                  tune_malloc: bool = False, rows_per_part: int = ROWS_PER_PART,
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
                              weights, heatmaps, tune_malloc, rows_per_part, seconds_per_part, progress)
    finally:
        results.unlock()


def _score_archive(ray, results, model_path, paths, output, point, started, actors, batch_size, threads, weights,
                   heatmaps, tune_malloc, rows_per_part, seconds_per_part, progress) -> "ScoringSummary":
    done = results.open(model_identity(model_path, point, heatmaps is not None))
    todo = [p for p in paths if path_key(p) not in done]
    summary = ScoringSummary(len(paths), len(paths) - len(todo), 0, 0, 0.0, Path(output))
    if todo:
        common = None
        if heatmaps is not None:
            from .visualize import common_parent

            common = str(common_parent(paths))  # of all paths: a rerun names the pictures alike
        scorer = dict(model_path=str(Path(model_path).resolve()), point=point, weights=weights, batch_size=batch_size,
                      threads=threads, heatmaps=None if heatmaps is None else str(Path(heatmaps).resolve()),
                      common=common, tune_malloc=tune_malloc)
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

    from .cluster import one_line

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
