"""Engines: what turns decoded pixels into scores and maps, chosen per model.

Every engine has one interface (``ScoringModel``): ``config_`` (the model's ``PadimConfig``),
``score_pixels((B, H, W, 3) uint8) -> (scores (B,), maps (B, H, W))`` float32 NumPy arrays, the
decisions' data (``operating_point``, ``p_values``, ``uses_random_weights``), and ``engine`` /
``precision`` naming it. The torch engine is ``PaDiM`` itself (``padim.core.scorer.PatchScorer``
on CPU or CUDA); ``onnxruntime`` and ``openvino`` run that module's exported graph
(``padim.deploy.exported.ExportedModel``, torch-free). ``open_scoring_model`` is how every
surface gets one: the CLI, the service and Ray's actors.

A new engine plugs in as another ``ExportedModel`` session (``padim.deploy.sessions``) or another
class with this interface.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Protocol, Sequence, Tuple

import numpy as np

from padim.deploy.exported import ENGINES, PRECISIONS, EngineError, ExportedModel


class ScoringModel(Protocol):
    """What the pipeline needs of an engine (``PaDiM`` and ``ExportedModel`` both are one)."""

    engine: str
    precision: str

    def score_pixels(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]: ...

    def operating_point(self, target_fpr=None, image_threshold=None, pixel_threshold=None, target_pixel_fpr=None): ...

    def p_values(self, scores) -> Optional[np.ndarray]: ...


def check_engine_options(engine: str, precision: str = "f32") -> None:
    """Refuses an engine/precision pair that cannot work, before any work."""
    if engine not in ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "f32" and engine != "openvino":
        raise EngineError(f"`precision` {precision} is an OpenVINO option (`engine` openvino); "
                          f"`engine` {engine} computes in f32")


def open_engine(engine: str, precision: str = "f32", model_path=None, export=None, weights: Optional[str] = None,
                batch_size: int = 32, workers: int = 2, progress: Optional[bool] = False,
                threads: Optional[int] = None, model=None, note: Optional[Callable[[str], None]] = None,
                train_images: Optional[Sequence] = None) -> ExportedModel:
    """The ``ExportedModel`` for engine ``engine``: from ``export`` (a folder), else from the cache
    of ``model_path`` (built on first use). With a model file, its current header (thresholds,
    calibration) is the one decisions use, and a given export must be of that model's graph. ``note``:
    where a rebuilt damaged cache entry is said (default: stderr).

    precision int8: the model's int8 export decides with its own thresholds (int8 scores of the
    held-out images), never the model file's f32 ones. ``train_images``: the training folder the model
    was fitted on; with it, the cached int8 export is made (or remade) calibrated on those images;
    without it, one must be cached already (``padim test --precision int8`` makes one)."""
    from padim.deploy.exported import read_export
    from padim.deploy.sessions import check_precision

    check_engine_options(engine, precision)
    if engine == "torch":
        raise EngineError("the torch engine is PaDiM itself, not an export")
    metadata = record = None
    if model_path is not None:
        from padim.deploy.cache import ENGINE_FORMATS, cached_export_record, cached_int8_record
        from padim.deploy.export import file_metadata, graph_key

        if export is None and precision == "int8":
            export, record = cached_int8_record(model_path, weights, model, note, train_images)
        elif export is None:
            export, record = cached_export_record(model_path, ENGINE_FORMATS[engine], weights, model, note)
        else:
            record = read_export(export)
            check_precision(export, record, precision)
            made_from, key = record.get("graph_key"), graph_key(model_path)
            if precision == "int8":
                from padim.deploy.quantize import int8_graph_key

                key = int8_graph_key(key)
            if made_from is not None and made_from != key:
                raise EngineError(f"export {export} was made from another model than {model_path} "
                                  "(its graph key differs): export this model again")
        metadata = None if precision == "int8" else file_metadata(model_path)
    elif export is None:
        raise EngineError(f"`engine` {engine} needs `model` (exported and cached on first use) or `export` DIR")
    return ExportedModel(export, engine, precision, batch_size=batch_size, workers=workers, progress=progress,
                         threads=threads, metadata=metadata, record=record)


F32_THRESHOLDS = "f32 scores (the model file's thresholds)"


def thresholds_from(model) -> str:
    """Which scores a model's thresholds were computed from: an int8 export's own ("int8 graph, 20
    held-out images"), else the model file's (f32), or "none"."""
    said = getattr(model, "thresholds_from_", None)
    if said:
        return said
    return "none" if model.image_threshold_ is None and model.pixel_threshold_ is None else F32_THRESHOLDS


def as_torch(iter_predict: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Wraps an ``ExportedModel.iter_predict`` so that it yields CPU tensors like ``PaDiM.iter_predict``."""
    import torch

    def wrapped(images: Sequence, desc: str = "predict"):
        for scores, maps, sizes in iter_predict(images, desc=desc):
            yield torch.from_numpy(scores), torch.from_numpy(maps), sizes

    return wrapped


def open_scoring_model(engine: str = "torch", precision: str = "f32", model_path=None, export=None,
                       weights: Optional[str] = None, device: Optional[str] = None, batch_size: int = 32,
                       workers: int = 2, progress: Optional[bool] = False, threads: Optional[int] = None):
    """The ``ScoringModel`` for a model file and/or an export folder: ``PaDiM.load`` for torch; for
    the other engines the export folder alone (no torch needed), or the model file's export (cached)."""
    check_engine_options(engine, precision)
    if engine == "torch":
        if model_path is None:
            raise EngineError("the torch engine needs a model file")
        if export is not None:
            raise EngineError("an export folder is for engine onnxruntime or openvino")
        from padim.core.estimator import PaDiM

        return PaDiM.load(model_path, device=device, batch_size=batch_size, workers=workers, progress=progress,
                          weights=weights)
    if device == "cuda":
        raise EngineError(f"engine {engine} runs on the CPU here; device cuda is for the torch engine")
    if model_path is None:
        if export is None:
            raise EngineError(f"engine {engine} needs a model file (exported and cached on first use) or an export folder")
        return ExportedModel(export, engine, precision, batch_size=batch_size, workers=workers, progress=progress,
                             threads=threads)
    return open_engine(engine, precision, model_path, export, weights, batch_size, workers, progress, threads)
