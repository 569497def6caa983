"""The exported graphs of model files, made on first use and cached (what ``--engine onnxruntime|
openvino`` runs when given a model file), and ``export_file`` behind ``padim export``.

The cache (``cache_dir``): one folder per (graph, format), named by ``padim.deploy.export.graph_key``: the
SHA-256 of the model file's tensors, configuration and backbone identity. Not the whole file's hash:
``padim test`` rewrites the thresholds into the model file, and the graph does not depend on them.
The thresholds used to decide are always the model file's current ones. Folders appear whole (built
aside, then renamed), so concurrent first uses at worst both build it. A cached folder is verified on
every use like any export folder (checksums and header, ``padim.deploy.exported.read_export``); a
damaged one is rebuilt, with one line saying so.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from padim.errors import PadimError
from padim.deploy.exported import EngineError, read_export

ENGINE_FORMATS = {"onnxruntime": "onnx", "openvino": "openvino"}
CACHE_ENV = "PADIM_CACHE_DIR"


def cache_dir() -> Path:
    """``$PADIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/padim/exports``, else ``~/.cache/padim/exports``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "padim" / "exports"


def export_file(model_path, fmt: str, output, weights: Optional[str] = None, model=None) -> Path:
    """Exports the model file ``model_path`` to the folder ``output`` (see ``padim export``): the
    graph, and beside it the file's header verbatim, with the graph's key. ``model``: the same file
    already loaded (saves rebuilding its backbone)."""
    from padim.deploy.export import export_model, file_metadata, graph_key
    from padim.core.estimator import PaDiM

    metadata, key = file_metadata(model_path), graph_key(model_path)  # both before the slow part
    if model is None:
        model = PaDiM.load(model_path, device="cpu", weights=weights)
    return export_model(model, output, fmt, metadata=metadata, key=key)


def cached_export_record(model_path, fmt: str, weights: Optional[str], model, note) -> Tuple[Path, dict]:
    """The cached export of ``model_path`` in ``fmt``, made now if there is none -> its folder and its
    verified ``padim.json`` record (hashed once per use).

    The cached folder is verified on every use as any export is (``read_export``: checksums of
    padim.json and of every graph file, the header's checks) and must be of this model's graph (its
    ``graph_key``); one that is not (damaged, edited, replaced) is rebuilt, and ``note`` (default:
    stderr) is told so in one line."""
    from padim.deploy.export import graph_key

    key = graph_key(model_path)
    return _cached(model_path, key, fmt, "f32", lambda work: export_file(model_path, fmt, work, weights, model), note)


def cached_int8_record(model_path, weights: Optional[str], model, note,
                       train_images: Optional[Sequence]) -> Tuple[Path, dict]:
    """The cached int8 export of ``model_path`` (``padim.deploy.quantize``; keyed by its graph and
    the precision) and its record. With ``train_images`` (the model's training folder), one
    calibrated on other images is remade on these; without them, one must be cached already."""
    from padim.deploy.export import graph_key
    from padim.deploy.quantize import QUANTIZATION_KEY, export_int8, images_digest, int8_graph_key

    key = int8_graph_key(graph_key(model_path))
    digest = None if train_images is None else images_digest(train_images)

    def calibrated_here(record: dict) -> bool:
        return digest is None or (record.get(QUANTIZATION_KEY) or {}).get("training_images_sha256") == digest

    def build(work: Path) -> None:
        if train_images is None:
            raise EngineError(f"`precision` int8: {model_path} has no int8 export yet, and making one needs its "
                              "training images: 'padim test --engine openvino --precision int8' with its data caches "
                              "one, or 'padim export --precision int8 --data-root D --category C' makes one for "
                              "`export` DIR")
        export_int8(model_path, train_images, work, weights, model)

    return _cached(model_path, key, "openvino", "int8", build, note, calibrated_here)


def _cached(model_path, key: str, fmt: str, precision: str, build: Callable[[Path], None], note,
            accept: Callable[[dict], bool] = lambda record: True) -> Tuple[Path, dict]:
    """The cache folder of graph ``key`` in ``fmt`` and ``precision``, verified, and its record;
    made by ``build(folder)`` when absent, damaged or not ``accept``ed (then replaced)."""
    root = cache_dir()
    target = root / (f"{key[:40]}-{fmt}" + ("" if precision == "f32" else f"-{precision}"))
    record, problem = _verified_export_of(target, key, fmt, precision)
    if record is not None and accept(record):
        return target, record
    if record is not None:
        problem = "replaced"  # sound, but not what was asked for (an int8 export calibrated on other images)
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
    except OSError as exc:
        raise PadimError(f"cannot write the export cache {root} ({exc.strerror or exc}); set {CACHE_ENV} to a "
                         "writable folder, or export once with 'padim export' and pass `export` DIR") from None
    try:
        build(work)
        for attempt in range(3):
            try:
                os.rename(work, target)  # replaces an empty folder, fails on a full one
                break
            except OSError:
                record, _ = _verified_export_of(target, key, fmt, precision)
                if record is not None and accept(record):  # another process finished first: keep its folder
                    return target, record
                if attempt == 2:
                    raise
                _discard(target, root)  # damaged, incomplete or replaced: out of the way, then try again
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record, problem_after = _verified_export_of(target, key, fmt, precision)
    if record is None:
        raise EngineError(f"the export cache {root} does not keep what is written to it ({problem_after}); set "
                          f"{CACHE_ENV} to another folder")
    if problem == "replaced":
        (note or _stderr)(f"note: the cached {precision} export of {model_path} was calibrated on other training "
                          "images: made again on these")
    elif problem != "absent":
        (note or _stderr)(f"warning: the cached export of {model_path} was damaged: rebuilt")
    return target, record


def _verified_export_of(folder: Path, key: str, fmt: str, precision: str = "f32") -> Tuple[Optional[dict], str]:
    """(the verified padim.json record, "") when ``folder`` is a sound export of the graph ``key`` in
    ``fmt`` and ``precision``; else (None, why): "absent", or the reason it cannot be used."""
    if not folder.exists():
        return None, "absent"
    try:
        record = read_export(folder)
    except EngineError as exc:
        return None, str(exc)
    if record.get("graph_key") != key or record.get("graph_format") != fmt or record.get("precision", "f32") != precision:
        return None, f"{folder} holds the export of another graph"
    return record, ""


def _discard(folder: Path, root: Path) -> None:
    """Moves ``folder`` aside (one rename: never half-removed under its name) and removes it."""
    aside = Path(tempfile.mkdtemp(prefix=".discarded-", dir=root)) / "old"
    try:
        os.rename(folder, aside)
    except OSError:
        pass  # gone already, or not ours to move: the rename after it will say
    shutil.rmtree(aside.parent, ignore_errors=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
