"""Features that compose (issue 26): int8 exports of masked and tiled models, int8 exports that prove
they were calibrated on the model's own held-out images, ``padim update`` of shared tile statistics,
and tile geometries counted before anything is built from them.

References: conformal thresholds recomputed by hand from the int8 graph's own scores of the held-out
images (found here by the fit's seeded split, not by padim's search), SHA-256 digests from hashlib,
the torch engine's f32 scores, a direct fit for the update, and tracemalloc for what was allocated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim import PaDiM
from padim.cli import main
from padim.settings import calibration as cal
from padim.data import find_category
from padim.data.synthetic import make_synthetic_category
from padim.errors import ModelFileError, PadimError
from padim.files import safetensors_io

from conftest import FAST

INT8_PACKAGES = ("onnx", "onnxscript", "openvino", "nncf")
needs_int8 = pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in INT8_PACKAGES),
                                reason='pip install "padim-inspect[int8]" (onnx, onnxscript, openvino, nncf)')
# int8 scores of good pictures against the torch engine's f32 scores, relative: measured here within
# 1 % (random resnet18 at 64 px); the bound leaves room for another CPU's int8 kernels
INT8_RTOL = 0.05
IGNORED_ROWS = 20  # the ignore mask: the top 20 rows of the 64 px pictures never count
TILED = dict(FAST, image_size=(64, 48), tile=32, tile_overlap=8, n_features=16)


def _run(capsys, *argv) -> tuple:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two synthetic categories of 40 good 64 px training images each (a fit holds 20 out), and an
    ignore mask of the top rows."""
    tmp = tmp_path_factory.mktemp("compose")
    for name, seed in (("own", 0), ("other", 1)):
        make_synthetic_category(tmp / "data", name=name, n_train=40, n_test_good=3, n_test_per_defect=1, size=64,
                                seed=seed)
    roi = np.zeros((64, 64), dtype=bool)
    roi[:IGNORED_ROWS] = True
    Image.fromarray(roi.astype(np.uint8) * 255).save(tmp / "roi.png")
    return {"tmp": tmp, "root": tmp / "data", "own": find_category(tmp / "data", "own", need_test=True),
            "roi": tmp / "roi.png"}


def _held_out(model, train) -> list:
    """The fit's held-out images, by its seeded split (``calibration.split_indices``)."""
    n_held = cal.calibration_size(len(train), model.calibration_fraction)
    return [train[i] for i in cal.split_indices(len(train), n_held, model.config_.seed)[1]]


def _defects(data):
    """A good test picture as the model sees it (64 x 64) and the same with a bright square painted
    inside the ignored rows, and outside them."""
    clean = np.asarray(Image.open(next(s.path for s in data["own"].test if s.defect == "good")).convert("RGB"))
    inside, outside = clean.copy(), clean.copy()
    inside[4:14, 20:30] = 255
    outside[40:50, 20:30] = 255
    return clean, inside, outside


def _check_int8_thresholds(export: Path, model, train) -> dict:
    """The export's thresholds are the split-conformal rank of the int8 graph's own scores of the
    model's held-out images, and its header names those images by their SHA-256."""
    from padim.deploy.quantize import SCORING_BATCH
    from padim.runtime import ExportedModel

    header = json.loads((export / "padim.json").read_text())["model"]
    held = _held_out(model, train)
    scores = np.sort(ExportedModel(export, "openvino", "int8", batch_size=SCORING_BATCH).predict(held).scores
                     .astype(np.float64))
    n, alpha = len(held), header["target_fpr"]
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    assert header["thresholds_from"] == f"int8 graph, {n} held-out images" and n == 20
    assert header["image_threshold"] == float(np.nextafter(scores[min(k, n) - 1], np.inf))
    assert header["calibration_images_sha256"] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in held]
    return header


# ----------------------------------------------------------------------------------------- int8 x mask
@needs_int8
def test_an_int8_export_of_a_masked_model_ignores_a_defect_inside_the_region(data):
    from padim.deploy.quantize import export_int8
    from padim.runtime import ExportedModel

    train = data["own"].train
    model = PaDiM(**FAST, n_features=16, ignore_mask=data["roi"]).fit(train)
    model.save(data["tmp"] / "masked.safetensors")
    export = export_int8(data["tmp"] / "masked.safetensors", train, data["tmp"] / "masked-int8", model=model)
    _check_int8_thresholds(export, model, train)
    clean, inside, outside = _defects(data)
    result = ExportedModel(export, "openvino", "int8", batch_size=1).predict([clean, inside, outside])
    assert result.scores[1] == pytest.approx(result.scores[0], rel=1e-6)  # the region never reaches the graph
    assert result.scores[2] > result.scores[0] * 1.05  # the same defect outside it does
    assert np.all(result.maps[:, :IGNORED_ROWS] == 0)
    np.testing.assert_allclose(result.scores[0], model.predict([clean]).scores[0], rtol=INT8_RTOL)


# ----------------------------------------------------------------------------------------- int8 x tiles
@needs_int8
@pytest.mark.parametrize("statistics", ["position", "shared"])
def test_int8_of_a_masked_tiled_model_through_the_cli(data, statistics, tmp_path, capsys, monkeypatch):
    """``padim export --precision int8`` then ``padim test --precision int8`` of a tiled model with
    an ignore mask: int8 scores near the f32 engine's, thresholds from int8 scores of the model's own
    held-out images, a defect inside the region changes nothing; another category's folder is
    refused in one line before any work (export and test's cached export alike)."""
    from padim.runtime import ExportedModel

    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path / "cache"))
    train, path = data["own"].train, tmp_path / "tiled.safetensors"
    model = PaDiM(**TILED, tile_statistics=statistics, ignore_mask=data["roi"]).fit(train)
    model.save(path)
    code, out, err = _run(capsys, "export", "--model", path, "--precision", "int8", "--data-root", data["root"],
                          "--category", "own", "--output", tmp_path / "int8")
    assert code == 0 and out.startswith("exported") and len(out.splitlines()) == 1, err
    _check_int8_thresholds(tmp_path / "int8", model, train)

    engine = ExportedModel(tmp_path / "int8", "openvino", "int8", batch_size=1)
    good = [s.path for s in data["own"].test if s.defect == "good"]
    np.testing.assert_allclose(engine.predict(good).scores, model.predict(good).scores, rtol=INT8_RTOL)
    clean, inside, _ = _defects(data)
    scores = engine.predict([np.asarray(Image.fromarray(p).resize((48, 64))) for p in (clean, inside)]).scores
    assert scores[1] == pytest.approx(scores[0], rel=1e-6)

    code, out, err = _run(capsys, "test", "--model", path, "--data-root", data["root"], "--category", "own",
                          "--engine", "openvino", "--precision", "int8", "--export", tmp_path / "int8",
                          "--output", tmp_path / "test")
    assert code == 0 and "thresholds from: int8 graph, 20 held-out images" in out, err

    for argv in (["export", "--model", path, "--precision", "int8", "--data-root", data["root"], "--category",
                  "other", "--output", tmp_path / "refused"],
                 ["test", "--model", path, "--data-root", data["root"], "--category", "other", "--engine", "openvino",
                  "--precision", "int8", "--output", tmp_path / "t2"]):
        code, out, err = _run(capsys, *argv)
        assert code == 1 and len(err.splitlines()) == 1, err
        assert "20 of the model's 20 held-out calibration images are not in it" in err
    assert not (tmp_path / "refused").exists() and not list((tmp_path / "cache").glob("*int8"))


@needs_int8
def test_a_model_file_without_held_out_hashes_is_refused_for_int8_and_still_loads(data, tmp_path):
    from padim.files.modelfile import TENSOR_RANKS
    from padim.deploy.quantize import export_int8

    train = data["own"].train
    model = PaDiM(**FAST, n_features=16).fit(train)
    model.save(tmp_path / "new.safetensors")
    tensors, meta = safetensors_io.load(tmp_path / "new.safetensors", {**TENSOR_RANKS})
    assert meta["calibration_images_sha256"] == [hashlib.sha256(Path(p).read_bytes()).hexdigest()
                                                 for p in _held_out(model, train)]
    del meta["calibration_images_sha256"]  # as padim wrote model files before it recorded them
    safetensors_io.save(tmp_path / "old.safetensors", tensors, meta)
    loaded = PaDiM.load(tmp_path / "old.safetensors", device="cpu")
    np.testing.assert_array_equal(loaded.predict(train[:2]).scores, model.predict(train[:2]).scores)
    with pytest.raises(PadimError, match="records no SHA-256 of its 20 held-out calibration images.*refit it"):
        export_int8(tmp_path / "old.safetensors", train, tmp_path / "int8", model=loaded)
    assert not (tmp_path / "int8").exists()


# ----------------------------------------------------------------------------------------- update x tiles
def test_update_adds_images_to_shared_tile_statistics(synthetic_root, tmp_path, capsys):
    """Shared tile statistics count tiles (6 per picture here), not pictures: ``padim update`` takes
    them, and fit on half + update with the other half equals a direct fit on all of them."""
    images = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    first, second = images[: len(images) // 2], images[len(images) // 2:]
    params = dict(TILED, tile_statistics="shared", calibration_fraction=0.0)
    model = PaDiM(**params).fit(first, keep_statistics=True)
    assert model.statistics_.count == 6 * len(first) and model.n_train_images_ == len(first)
    model.save(tmp_path / "half.safetensors")
    model.statistics_.save(tmp_path / "half.stats")
    code, out, err = _run(capsys, "update", "--model", tmp_path / "half.safetensors", "--statistics",
                          tmp_path / "half.stats", "--add", *second, "--output", tmp_path / "all.safetensors")
    assert code == 0, err
    updated = PaDiM.load(tmp_path / "all.safetensors", device="cpu")
    direct = PaDiM(**params).fit(images)
    assert updated.n_train_images_ == direct.n_train_images_ == len(images)
    torch.testing.assert_close(updated.mean_, direct.mean_, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(updated.precision_factor_, direct.precision_factor_, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------- geometry
HUGE = dict(image_size=8192, tile=32, tile_overlap=31)  # 8161 x 8161 = 66601921 tiles
HUGE_MESSAGE = r"make 66601921 tiles per picture, more than padim's limit of 4096"


def _refused_with_peak(error, call):
    """``call()`` raises ``error`` -> (the exception, the peak of Python allocations meanwhile)."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as refused:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return refused.value, peak


def test_a_huge_tile_geometry_is_refused_before_anything_is_allocated(synthetic_root, tmp_path, capsys):
    import padim.core.backbones  # noqa: F401  (imported before measuring: importing torch is not the check)

    model = PaDiM(**{**FAST, **HUGE}, tile_statistics="shared")
    error, peak = _refused_with_peak(PadimError, lambda: model.fit([np.zeros((64, 64, 3), np.uint8)] * 2))
    assert re.search(HUGE_MESSAGE, str(error)) and "\n" not in str(error)
    assert peak < (4 << 20)  # listing the tiles took 5 GB
    code, out, err = _run(capsys, "fit", "--data-root", synthetic_root, "--category", "fabric", "--weights", "random",
                          "--image-size", "8192", "--tile", "32", "--tile-overlap", "31", "--output", tmp_path / "m")
    assert code == 1 and len(err.splitlines()) == 1 and re.search(HUGE_MESSAGE, err), err


def test_a_model_file_declaring_a_huge_tile_geometry_is_refused_before_it_is_built(tmp_path, capsys):
    """A model file with a valid checksum whose config declares 66 million tiles per picture: loading
    it (``predict``, ``serve``) refuses it in one line, having allocated next to nothing."""
    from padim.files.modelfile import TENSOR_RANKS

    pictures = [np.random.default_rng(i).integers(0, 255, (64, 48, 3), dtype=np.uint8) for i in range(4)]
    PaDiM(**TILED, tile_statistics="shared", calibration_fraction=0.0).fit(pictures).save(tmp_path / "m.safetensors")
    tensors, meta = safetensors_io.load(tmp_path / "m.safetensors", {**TENSOR_RANKS})
    meta["config"].update(image_size=[8192, 8192], tile_overlap=31)
    safetensors_io.save(tmp_path / "huge.safetensors", tensors, meta)  # a valid checksum over the edited header

    error, peak = _refused_with_peak(ModelFileError, lambda: PaDiM.load(tmp_path / "huge.safetensors", device="cpu"))
    assert re.search("tile geometry: 8192x8192 pictures in tiles of 32 px.*" + HUGE_MESSAGE, str(error))
    assert peak < (64 << 20)  # the checksum's 16 MB read buffer; the tiles' boxes alone were 5 GB
    image = tmp_path / "x.png"
    Image.fromarray(pictures[0]).save(image)
    code, out, err = _run(capsys, "predict", "--model", tmp_path / "huge.safetensors", image)
    assert code == 1 and len(err.splitlines()) == 1 and "more than padim's limit of 4096" in err
