"""The machinery of the composition matrix (tests/test_composition.py): the models of every geometry
and mask, fitted once; their exports, made once per engine; the updated models; and the five
surfaces a cell scores through, each answering with the same ``Rows``.

Everything expensive is made on first use and kept, failures included: a failure is raised again to
every cell that needs the same thing, so that a broken export costs its time once. The surfaces:

    predict  ``PaDiM.predict`` of the model file loaded (torch), ``ExportedModel.predict`` (the other
             engines), each opened by ``open_scoring_model`` as every surface opens an engine
    cli      ``padim predict --model FILE --engine E --precision P [--export DIR]`` in this process
             (``padim.cli.main``), its JSON lines parsed
    serve    ``padim serve``'s app (``load_models`` + ``create_app``) under FastAPI's TestClient,
             one multipart request per call
    ray      ``padim.cluster.ray_scoring.score_files``, what each Ray actor runs, with the engine an
             actor opens (``open_scoring_model``); the loopback cluster runs in a test of its own
    update   ``padim update`` (the fitted model's kept statistics + 4 more good pictures), then
             ``predict`` of the file it wrote

The engines: torch is the model file itself; onnxruntime and openvino int8 run the model file's
cached exports (``PADIM_CACHE_DIR``), made on first use as ``--engine`` makes them (int8 with the
model's training folder, as ``padim test --engine openvino --precision int8`` makes it); openvino f32
runs the ONNX export (OpenVINO reads ONNX; its IR would cost a second export of every model for the
same graph), given as ``--export DIR`` or served as the export folder.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from padim.errors import PadimError

# each engine column's (engine, precision) as the library spells them
ENGINES = {"torch": ("torch", "f32"), "onnxruntime": ("onnxruntime", "f32"), "openvino": ("openvino", "f32"),
           "openvino_int8": ("openvino", "int8")}
# a small graph (every export traces it: the matrix's dearest step) on layer1's grid
SMALL = dict(backbone="resnet18", weights="random", layers=("layer1", "layer2"), n_features=8, batch_size=8,
             device="cpu")
GEOMETRIES = {
    "square": dict(image_size=64),
    "hxw": dict(image_size=(48, 80)),  # height x width
    # 1 x 2 tiles of 32 px overlapping by 8, with Gaussians per position of every tile or one set for
    # both (two tiles, not more: a tiled graph's export grows with its tiles)
    "tiles_position": dict(image_size=(32, 56), tile=32, tile_overlap=8),
    "tiles_shared": dict(image_size=(32, 56), tile=32, tile_overlap=8, tile_statistics="shared"),
}
MASKS = ("nomask", "mask")
SEED = 0  # the fits' seed (PaDiM's default): their held-out split is split_indices(40, 20, SEED)


class Crash(Exception):
    """A step failed with another exception than a one-line PadimError: a traceback for the user."""


class Refused(Exception):
    """A step was refused (a PadimError, or a command's exit status 1); ``str`` is what it said."""


@dataclass
class Rows:
    """What a surface said about N pictures: scores (N,) float64, labels ("anomalous", "good" or None),
    the thresholds it reports, p-values (N,) (nan: none), and maps (N, H, W) where it gives them."""

    scores: np.ndarray
    labels: List[Optional[str]]
    thresholds: List[Optional[float]]
    p_values: np.ndarray
    maps: Optional[np.ndarray] = None


Request = Tuple[Sequence[Path], Optional[float]]  # pictures, and an image threshold (None: the model's)


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def remembered(make: Callable):
    """``make(*key)`` once per key, its exception included (raised again to every later caller)."""
    done: Dict[tuple, tuple] = {}

    def get(*key):
        if key not in done:
            try:
                done[key] = (True, make(*key))
            except Exception as exc:  # noqa: BLE001 - kept, and raised again below
                done[key] = (False, exc)
        ok, value = done[key]
        if not ok:
            raise value
        return value

    return get


def crash_or_refusal(exc: Exception) -> Exception:
    """A PadimError is a one-line refusal (``Refused``); anything else a ``Crash`` (its first line)."""
    if isinstance(exc, PadimError):
        return Refused(str(exc))
    first = (str(exc).strip().splitlines() or [""])[0]
    return Crash(f"{type(exc).__name__}: {first[:300]}")


@dataclass
class Target:
    """A model file a cell scores with: the fitted one, or the one ``padim update`` wrote."""

    key: tuple  # (geometry, mask, "fitted" or "updated")
    path: Path
    torch_model: object  # the file loaded (PaDiM), or the fitted estimator itself


class Matrix:
    """The models, exports and engines of the matrix, each made once (see the module's docstring)."""

    def __init__(self, data: dict, work: Path):
        self.data, self.work = data, work
        self.target = remembered(self._target)  # (geometry, mask, which) -> Target
        self.export = remembered(self._export)  # (target key, engine) -> export folder (None: torch)
        self.scoring = remembered(self._open)  # (target key, engine) -> a ScoringModel
        self.reference = remembered(self._reference)  # target key -> torch scores (N,) of ``images``
        self.alone = remembered(self._alone)  # (target key, engine) -> the clean picture's score, alone
        self.fresh = remembered(self._fresh)  # (geometry, mask) -> a fit on what the updated model holds

    @property
    def images(self) -> List[Path]:
        """The fit's 20 held-out pictures (its seeded split, redone here), then clean, inside, outside."""
        from padim.settings import calibration as cal

        n = len(self.data["train"])
        _, held = cal.split_indices(n, cal.calibration_size(n, cal.DEFAULT_CALIBRATION_FRACTION), SEED)
        return [self.data["train"][i] for i in held] + [self.data[k] for k in ("clean", "inside", "outside")]

    # ------------------------------------------------------------------ models
    def _target(self, geometry: str, mask: str, which: str) -> Target:
        return self._fit(geometry, mask) if which == "fitted" else self._update(geometry, mask)

    def _estimator(self, geometry: str, mask: str, **options):
        from padim import PaDiM

        ignore = self.data["ignore"] if mask == "mask" else None
        return PaDiM(**SMALL, **GEOMETRIES[geometry], ignore_mask=ignore, seed=SEED, **options)

    def _fit(self, geometry: str, mask: str) -> Target:
        model = self._estimator(geometry, mask).fit(self.data["train"], keep_statistics=True)
        path = self.work / f"{geometry}-{mask}.safetensors"
        model.save(path)
        model.statistics_.save(path.with_suffix(".stats"))
        return Target((geometry, mask, "fitted"), path, model)

    def _update(self, geometry: str, mask: str) -> Target:
        """``padim update`` of the fitted model with the 4 more pictures; Refused on exit status 1."""
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

    def _fresh(self, geometry: str, mask: str):
        """A fit, without calibration, on the pictures the updated model holds (the fit's 20 + the 4
        added): what ``padim update`` must equal."""
        held = set(self.images[:-3])
        fitted = [p for p in self.data["train"] if p not in held]
        return self._estimator(geometry, mask, calibration_fraction=0.0).fit(fitted + list(self.data["more"]))

    def _reference(self, geometry: str, mask: str, which: str) -> np.ndarray:
        return self.target(geometry, mask, which).torch_model.predict(self.images).scores.astype(np.float64)

    # ------------------------------------------------------------------ engines
    def _export(self, key: tuple, engine: str) -> Optional[Path]:
        """The export folder ``engine`` runs (None for torch), made as ``--engine`` makes it on first
        use: the model file's cached ONNX export (what openvino f32 runs too), or its cached int8
        export, quantised and calibrated on the category's training folder (``padim test --engine
        openvino --precision int8 --data-root D --category part``). Refused or Crash if it cannot."""
        from padim.deploy.engines import open_engine

        kind, precision = ENGINES[engine]
        if kind == "torch":
            return None
        target = self.target(*key)
        try:
            if precision == "int8":
                return open_engine("openvino", "int8", model_path=target.path, model=target.torch_model,
                                   train_images=self.data["train"]).folder
            return open_engine("onnxruntime", "f32", model_path=target.path, model=target.torch_model).folder
        except Exception as exc:  # noqa: BLE001
            raise crash_or_refusal(exc) from None

    def _open(self, key: tuple, engine: str):
        """The engine as the surfaces open it (``open_scoring_model``): a loaded PaDiM, or an ExportedModel."""
        from padim.deploy.engines import open_scoring_model

        kind, precision = ENGINES[engine]
        folder = self.export(key, engine)
        return open_scoring_model(kind, precision, self.target(*key).path, folder if engine == "openvino" else None,
                                  device="cpu")

    def _alone(self, key: tuple, engine: str) -> float:
        """The clean picture scored alone (a batch of one) by the engine's ``predict``."""
        return float(self.scoring(key, engine).predict([self.data["clean"]]).scores[0])

    # ------------------------------------------------------------------ surfaces
    def rows(self, surface: str, target: Target, engine: str, requests: Sequence[Request], capsys=None) -> List[Rows]:
        """Each request's ``Rows`` from ``surface`` (the update surface: ``predict`` of the updated file)."""
        if surface == "serve":
            return self._serve(target, engine, requests)
        one = {"predict": self._predict, "update": self._predict, "cli": self._cli, "ray": self._ray}[surface]
        return [one(target, engine, images, threshold, capsys) for images, threshold in requests]

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
        records = [json.loads(line) for line in out.splitlines()]  # one JSON line per picture, nothing else
        assert [r["path"] for r in records] == [str(p) for p in images], out
        return Rows(_floats(r["score"] for r in records), [r["label"] for r in records],
                    [r["threshold"] for r in records], _floats(r["p_value"] for r in records))

    def _serve(self, target, engine, requests) -> List[Rows]:
        from fastapi.testclient import TestClient

        from padim.serve import ServeSettings, create_app, load_models

        kind, precision = ENGINES[engine]
        served = self.export(target.key, engine) if engine == "openvino" else target.path  # see the docstring
        models = load_models([served], device="cpu", engine=kind, precision=precision)
        (name,) = models
        settings = ServeSettings(max_batch=8, max_files=max(len(images) for images, _ in requests), drift_seed=0)
        answers = []
        with TestClient(create_app(models, settings)) as client:
            wait_ready(client)
            for images, threshold in requests:
                query = "" if threshold is None else f"?threshold={float(threshold)!r}"
                answer = client.post(f"/models/{name}/predict{query}",
                                     files=[("files", (p.name, p.read_bytes(), "image/png")) for p in images])
                if answer.status_code != 200:
                    raise Refused(f"{answer.status_code}: {answer.text}")
                results = answer.json()["results"]
                assert [r["file"] for r in results] == [p.name for p in images] and not any(r["error"] for r in results)
                answers.append(Rows(_floats(r["score"] for r in results), [r["label"] for r in results],
                                    [r["threshold"] for r in results], _floats(r["p_value"] for r in results)))
        return answers

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
