"""The exported graphs of model files, made on first use and cached (what ``--engine onnxruntime|
openvino`` runs when given a model file), and ``export_file`` behind ``padim export``.

The cache (``cache_dir``): one folder per (graph, format), named by ``padim.pipeline.export.graph_key``: the
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
from typing import Optional

from padim.errors import PadimError

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
    from padim.pipeline.export import export_model, file_metadata, graph_key
    from padim.core.estimator import PaDiM

    metadata, key = file_metadata(model_path), graph_key(model_path)  # both before the slow part
    if model is None:
        model = PaDiM.load(model_path, device="cpu", weights=weights)
    return export_model(model, output, fmt, metadata=metadata, key=key)


def cached_export(model_path, fmt: str, weights: Optional[str] = None, model=None) -> Path:
    """The cached export of ``model_path`` in ``fmt``, made now if there is none; returns its folder."""
    from padim.pipeline.export import METADATA_FILE, graph_key

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
                         "writable folder, or export once with 'padim export' and pass `export` DIR") from None
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


def read_key(folder) -> Optional[str]:
    from padim.pipeline.exported import read_export

    return read_export(folder).get("graph_key")
