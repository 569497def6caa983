"""Engines for ``padim predict/test/benchmark --engine``: the exported graph of a model file, built on
first use and cached, or read from an export folder, run by ``padim.runtime``.

An engine replaces ``padim.scoring.score_batches``: it gets the same decoded pixels
(``padim.images.load_pixels``) in the same batches and yields the same (scores (B,), maps (B, H, W),
original sizes) per batch; ``as_torch`` gives them as CPU tensors for the code that expects
``PaDiM.iter_predict``'s (``padim.evaluate``).

The cache (``cache_dir``): one folder per (graph, format), named by ``padim.export.graph_key``: the
SHA-256 of the model file's tensors, configuration and backbone identity. Not the whole file's hash:
``padim test`` rewrites the thresholds into the model file, and the graph does not depend on them.
The thresholds used to decide are always the model file's current ones. Folders appear whole (built
aside, then renamed), so concurrent first uses at worst both build it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .errors import PadimError
from .runtime import ENGINES, PRECISIONS, EngineError, ExportedModel

ENGINE_FORMATS = {"onnxruntime": "onnx", "openvino": "openvino"}
CACHE_ENV = "PADIM_CACHE_DIR"


def cache_dir() -> Path:
    """``$PADIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/padim/exports``, else ``~/.cache/padim/exports``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "padim" / "exports"


def check_engine_options(engine: str, precision: str = "f32") -> None:
    """Refuses an engine/precision pair that cannot work, before any work."""
    if engine not in ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "f32" and engine != "openvino":
        raise EngineError(f"--precision {precision} is an OpenVINO option (--engine openvino); "
                          f"--engine {engine} computes in f32")


def export_file(model_path, fmt: str, output, weights: Optional[str] = None, model=None) -> Path:
    """Exports the model file ``model_path`` to the folder ``output`` (see ``padim export``): the
    graph, and beside it the file's header verbatim, with the graph's key. ``model``: the same file
    already loaded (saves rebuilding its backbone)."""
    from .export import export_model, file_metadata, graph_key
    from .model import PaDiM

    metadata, key = file_metadata(model_path), graph_key(model_path)  # both before the slow part
    if model is None:
        model = PaDiM.load(model_path, device="cpu", weights=weights)
    return export_model(model, output, fmt, metadata=metadata, key=key)


def cached_export(model_path, fmt: str, weights: Optional[str] = None, model=None) -> Path:
    """The cached export of ``model_path`` in ``fmt``, made now if there is none; returns its folder."""
    from .export import METADATA_FILE, graph_key

    key = graph_key(model_path)
    root = cache_dir()
    target = root / f"{key[:40]}-{fmt}"
    if _is_export_of(target, key):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
    except OSError as exc:
        raise PadimError(f"cannot write the export cache {root} ({exc.strerror or exc}); set {CACHE_ENV} to a "
                         "writable folder, or export once with 'padim export' and pass --export DIR") from None
    try:
        export_file(model_path, fmt, work, weights=weights, model=model)
        if target.exists() and not (target / METADATA_FILE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a leftover without its description: incomplete
        try:
            os.rename(work, target)
        except OSError:  # another process finished first: keep its folder
            if not _is_export_of(target, key):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _is_export_of(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / "padim.json").read_text()).get("graph_key") == key
    except (OSError, ValueError, AttributeError):
        return False


def open_engine(engine: str, precision: str = "f32", model_path=None, export=None, weights: Optional[str] = None,
                batch_size: int = 32, workers: int = 2, progress: Optional[bool] = False,
                threads: Optional[int] = None, model=None) -> ExportedModel:
    """The ``ExportedModel`` for ``--engine ENGINE``: from ``export`` (a folder), else from the cache
    of ``model_path`` (built on first use). With a model file, its current header (thresholds,
    calibration) is the one decisions use, and a given export must be of that model's graph."""
    check_engine_options(engine, precision)
    if engine == "torch":
        raise EngineError("the torch engine is PaDiM itself, not an export")
    metadata = None
    if model_path is not None:
        from .export import file_metadata, graph_key

        if export is None:
            export = cached_export(model_path, ENGINE_FORMATS[engine], weights=weights, model=model)
        else:
            made_from = _read_key(export)
            if made_from is not None and made_from != graph_key(model_path):
                raise EngineError(f"export {export} was made from another model than {model_path} "
                                  "(its graph key differs): export this model again")
        metadata = file_metadata(model_path)
    elif export is None:
        raise EngineError(f"--engine {engine} needs --model (exported and cached on first use) or --export DIR")
    return ExportedModel(export, engine, precision, batch_size=batch_size, workers=workers, progress=progress,
                         threads=threads, metadata=metadata)


def _read_key(folder) -> Optional[str]:
    from .runtime import read_export

    return read_export(folder).get("graph_key")


def as_torch(iter_predict: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Wraps an ``ExportedModel.iter_predict`` so that it yields CPU tensors like ``PaDiM.iter_predict``."""
    import torch

    def wrapped(images: Sequence, desc: str = "predict"):
        for scores, maps, sizes in iter_predict(images, desc=desc):
            yield torch.from_numpy(scores), torch.from_numpy(maps), sizes

    return wrapped
