"""The machinery of the composition matrix (tests/test_composition.py): the models of every geometry
and mask, fitted once; their exports, made once per engine; the updated models; and the five
surfaces a cell scores through, each returning the same ``Rows``.

Everything expensive is made on first use and kept, failures included (a failure is re-raised to
every cell that needs the same thing, so that a broken export costs its time once). What each
surface is:

    predict  ``PaDiM.load(file).predict`` (torch) / ``ExportedModel.predict`` (the export, opened by
             ``open_scoring_model`` with the model file, as every surface opens an engine)
    cli      ``padim predict --model FILE --engine E --precision P [--export DIR]`` in this process
             (``padim.cli.main``), its JSON lines parsed
    serve    ``padim serve``'s app (``load_models`` + ``create_app``) under FastAPI's TestClient, one
             multipart request
    ray      ``padim.cluster.ray_scoring.score_files``, what each Ray actor runs, on the engine the
             actor opens (``open_scoring_model``); the loopback cluster itself runs in its own test
    update   ``padim update`` (a model fitted with its statistics kept, 4 more good images added),
             then ``predict`` of the updated file

Engines: torch is the model file; onnxruntime and openvino int8 are the model file's cached exports
(``PADIM_CACHE_DIR``, made on first use as ``--engine`` makes them; int8 with the model's training
folder, as ``padim test --precision int8`` makes it); openvino f32 runs the same ONNX export
(OpenVINO reads ONNX; its own IR format would cost a second export of every model for the same graph).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from padim.errors import PadimError

# torch engine's name and each engine's (engine, precision) as the library spells them
ENGINES = {"torch": ("torch", "f32"), "onnxruntime": ("onnxruntime", "f32"), "openvino": ("openvino", "f32"),
           "openvino_int8": ("openvino", "int8")}
SMALL = dict(backbone="resnet18", weights="random", layers=("layer1", "layer2"), n_features=8, batch_size=8,
             device="cpu")  # a small graph: every export traces it, the matrix's dearest step
GEOMETRIES = {
    "square": dict(image_size=64),
    "hxw": dict(image_size=(48, 80)),  # height x width
    # 1 x 2 tiles of 32 px overlapping by 8: Gaussians per position of every tile, or one set for both
    # (two tiles, not more: a tiled graph's export costs more with every tile)
    "tiles_position": dict(image_size=(32, 56), tile=32, tile_overlap=8),
    "tiles_shared": dict(image_size=(32, 56), tile=32, tile_overlap=8, tile_statistics="shared"),
}


class Crash(Exception):
    """Something failed with another exception than a one-line PadimError (a traceback for the user)."""


class Refused(Exception):
    """A step was refused (a PadimError, or the command's exit status 1): ``str`` is its message."""


@dataclass
class Rows:
    """What a surface said about N images: scores (N,) float64, labels ("anomalous"/"good"/None),
    the thresholds it reports, p-values (N,) (nan: none), and maps (N, H, W) where it gives them."""

    scores: np.ndarray
    labels: List[Optional[str]]
    thresholds: List[Optional[float]]
    p_values: np.ndarray
    maps: Optional[np.ndarray] = None


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def remembered(make: Callable):
    """``make(*key)`` once per key; its exception too (raised again, as it was, to the next caller)."""
    done: Dict[tuple, object] = {}

    def get(*key):
        if key not in done:
            try:
                done[key] = ("ok", make(*key))
            except Exception as exc:  # noqa: BLE001 - kept and raised again below
                done[key] = ("error", exc)
        kind, value = done[key]
        if kind == "error":
            raise value
        return value

    return get


def crash_or_refusal(exc: Exception) -> Exception:
    """A PadimError stays what it is (a one-line refusal); anything else becomes a ``Crash``."""
    if isinstance(exc, PadimError):
        return Refused(str(exc))
    first = (str(exc).strip().splitlines() or [""])[0]
    return Crash(f"{type(exc).__name__}: {first[:300]}")


@dataclass
class Target:
    """A model file a cell scores with (the fitted one, or the one ``padim update`` wrote) and its
    torch model in memory."""

    key: tuple  # (geometry, mask, "fitted" or "updated")
    path: Path
    torch_model: object


class Matrix:
    """The models, exports and engines of the matrix, each made once (see the module's docstring)."""

    def __init__(self, data: dict, work: Path):
        self.data, self.work = data, work
        self.target = remembered(self._target)  # (geometry, mask, which) -> Target
        self.export = remembered(self._export)  # (target key, engine) -> export folder or None
        self.scoring = remembered(self._open)  # (target key, engine) -> a ScoringModel
        self.reference = remembered(self._reference)  # target key -> torch scores (N,) of ``images``
        self.alone = remembered(self._alone)  # (target key, engine) -> the clean picture's score, alone

    @property
    def images(self) -> List[Path]:
        """The fit's held-out pictures (its seeded split, redone here), then clean, inside, outside."""
        from padim.core import calibration as cal

        n = len(self.data["train"])
        _, held = cal.split_indices(n, cal.calibration_size(n, cal.DEFAULT_CALIBRATION_FRACTION), 0)
        return [self.data["train"][i] for i in held] + [self.data[k] for k in ("clean", "inside", "outside")]

    def _reference(self, geometry: str, mask: str, which: str) -> np.ndarray:
        return self.target(geometry, mask, which).torch_model.predict(self.images).scores.astype(np.float64)

    def _alone(self, key: tuple, engine: str) -> float:
        """The clean picture scored alone (a batch of one) by the engine's ``predict``."""
        return float(self.scoring(key, engine).predict([self.data["clean"]]).scores[0])

    # ------------------------------------------------------------------ models
    def _target(self, geometry: str, mask: str, which: str) -> Target:
        return self._fit(geometry, mask) if which == "fitted" else self._update(geometry, mask)

    def _fit(self, geometry: str, mask: str) -> Target:
        from padim import PaDiM

        ignore = self.data["ignore"] if mask == "mask" else None
        model = PaDiM(**SMALL, **GEOMETRIES[geometry], ignore_mask=ignore).fit(self.data["train"], keep_statistics=True)
        path = self.work / f"{geometry}-{mask}.safetensors"
        model.save(path)
        model.statistics_.save(path.with_suffix(".stats"))
        return Target((geometry, mask, "fitted"), path, model)

    def _update(self, geometry: str, mask: str) -> Target:
        """``padim update`` of the fitted model with the 4 more pictures; Refused on exit status 1."""
        import contextlib
        import io

        from padim import PaDiM
        from padim.cli import main

        source = self.target(geometry, mask, "fitted")
        output = self.work / f"{geometry}-{mask}-updated.safetensors"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["update", "--model", str(source.path), "--statistics", str(source.path.with_suffix(".stats")),
                         "--add", str(self.data["more"][0].parent), "--output", str(output), "--device", "cpu"])
        if code != 0:
            raise Refused(err.getvalue().strip())
        return Target((geometry, mask, "updated"), output, PaDiM.load(output, device="cpu"))

    # ------------------------------------------------------------------ engines
    def _export(self, key: tuple, engine: str) -> Optional[Path]:
        """The export folder ``engine`` runs (None for torch), made as ``--engine`` makes it on first
        use: the model file's cached ONNX export (also what openvino f32 runs), or its cached int8
        export, quantised and calibrated on the category's training folder (``padim test
        --precision int8 --data-root D --category part``). Refused / Crash when it cannot be made."""
        from padim.pipeline.engines import open_engine

        kind, precision = ENGINES[engine]
        target = self.target(*key)
        if kind == "torch":
            return None
        try:
            if precision == "int8":
                return open_engine("openvino", "int8", model_path=target.path, model=target.torch_model,
                                   train_images=self.data["train"]).folder
            return open_engine("onnxruntime", "f32", model_path=target.path, model=target.torch_model).folder
        except Exception as exc:  # noqa: BLE001
            raise crash_or_refusal(exc) from None

    def _open(self, key: tuple, engine: str):
        """The engine as a surface opens it (``open_scoring_model``): a loaded PaDiM, or an ExportedModel."""
        from padim.pipeline.engines import open_scoring_model

        kind, precision = ENGINES[engine]
        folder = self.export(key, engine)
        return open_scoring_model(kind, precision, self.target(*key).path, folder if engine == "openvino" else None,
                                  device="cpu")

    # ------------------------------------------------------------------ surfaces
    def rows(self, surface: str, target: Target, engine: str, images: List[Path], threshold: Optional[float] = None,
             capsys=None) -> Rows:
        run = self._predict if surface in ("predict", "update") else getattr(self, f"_{surface}")
        return run(target, engine, images, threshold, capsys)

    def _predict(self, target, engine, images, threshold, capsys) -> Rows:
        result = self.scoring(target.key, engine).predict(images, image_threshold=threshold)
        labels = [None] * len(images) if result.labels is None else \
            ["anomalous" if flag else "good" for flag in result.labels]
        p_values = np.full(len(images), np.nan) if result.p_values is None else result.p_values
        return Rows(result.scores.astype(np.float64), labels, [result.image_threshold] * len(images),
                    np.asarray(p_values, dtype=np.float64), np.asarray(result.maps))

    def _cli(self, target, engine, images, threshold, capsys) -> Rows:
        from padim.cli import main

        kind, precision = ENGINES[engine]
        argv = ["predict", "--model", str(target.path), "--engine", kind, "--precision", precision, "--device", "cpu"]
        if engine == "openvino":
            argv += ["--export", str(self.export(target.key, engine))]
        if threshold is not None:
            argv += ["--image-threshold", repr(float(threshold))]
        capsys.readouterr()
        code = main(argv + [str(p) for p in images])
        out, err = capsys.readouterr()
        if code != 0:
            raise Refused(err.strip())
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["path"] for r in records] == [str(p) for p in images], out
        return Rows(_floats(r["score"] for r in records), [r["label"] for r in records],
                    [r["threshold"] for r in records], _floats(r["p_value"] for r in records))

    def _serve(self, target, engine, images, threshold, capsys) -> Rows:
        from fastapi.testclient import TestClient

        from padim.serve import ServeSettings, create_app, load_models

        kind, precision = ENGINES[engine]
        served = self.export(target.key, engine) if engine == "openvino" else target.path  # see the module docstring
        models = load_models([served], device="cpu", engine=kind, precision=precision)
        (name,) = models
        settings = ServeSettings(max_batch=8, max_files=len(images), drift_seed=0)
        query = "" if threshold is None else f"?threshold={float(threshold)!r}"
        with TestClient(create_app(models, settings)) as client:
            wait_ready(client)
            answer = client.post(f"/models/{name}/predict{query}",
                                 files=[("files", (p.name, p.read_bytes(), "image/png")) for p in images])
        if answer.status_code != 200:
            raise Refused(f"{answer.status_code}: {answer.text}")
        results = answer.json()["results"]
        assert [r["file"] for r in results] == [p.name for p in images] and not any(r["error"] for r in results)
        return Rows(_floats(r["score"] for r in results), [r["label"] for r in results],
                    [r["threshold"] for r in results], _floats(r["p_value"] for r in results))

    def _ray(self, target, engine, images, threshold, capsys) -> Rows:
        from padim.cluster.ray_scoring import score_files

        model = self.scoring(target.key, engine)  # what an actor opens: open_scoring_model(engine, precision, file)
        point = model.operating_point(image_threshold=threshold)
        table = score_files(model, [str(p) for p in images], [str(p) for p in images], point).to_pylist()
        assert [r["path"] for r in table] == [str(p) for p in images] and not any(r["error"] for r in table)
        return Rows(_floats(r["score"] for r in table), [r["label"] for r in table], [r["threshold"] for r in table],
                    _floats(r["p_value"] for r in table))


def wait_ready(client, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get("/health")
        if answer.status_code == 200:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"the service was not ready after {timeout} s: {answer.json()}")
