"""INT8 exports (issue 21): the backbone quantised by NNCF, the Gaussian part kept f32, and the
conformal thresholds recomputed from int8 scores of the model's own held-out images, checked here
against an independent recomputation; f32 thresholds are never paired with int8 scores; the CLI,
the cache, the service's /models and a torch-free run. The accuracy of int8 on real data
(Magnetic Tile) is measured in ``test_int8_accuracy_on_magnetic_tile``.

Skipped where openvino, nncf or the ONNX exporter are not installed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxscript", reason='pip install "padim-inspect[export]"')
pytest.importorskip("openvino", reason='pip install "padim-inspect[openvino]"')
pytest.importorskip("nncf", reason="pip install nncf")

from padim import PaDiM  # noqa: E402
from padim.cli import main  # noqa: E402
from padim.settings import calibration as cal  # noqa: E402
from padim.data import find_category  # noqa: E402
from padim.data.synthetic import make_synthetic_category  # noqa: E402
from padim.deploy.cache import export_file  # noqa: E402
from padim.deploy.engines import open_engine  # noqa: E402
from padim.deploy.quantize import SCORING_BATCH, export_int8  # noqa: E402
from padim.runtime import EngineError, ExportedModel  # noqa: E402

from conftest import FAST, every_third_test_image  # noqa: E402
from test_export import NO_TORCH  # noqa: E402


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """44 good training images (20 held out, seeded), a fitted model and its int8 export."""
    tmp = tmp_path_factory.mktemp("int8")
    folder = make_synthetic_category(tmp / "data", name="wide", n_train=44, n_test_good=4, n_test_per_defect=2,
                                     size=64)
    category = find_category(folder.parent, "wide", need_test=True)
    model = PaDiM(**FAST).fit(category.train)
    model.save(tmp / "m.safetensors")
    export = export_int8(tmp / "m.safetensors", category.train, tmp / "int8", model=model)
    return {"tmp": tmp, "root": folder.parent, "category": category, "model": model, "path": tmp / "m.safetensors",
            "export": export, "record": json.loads((export / "padim.json").read_text())}


def test_int8_thresholds_equal_a_recomputation_from_int8_scores_of_the_held_out_images(int8):
    category, model, header = int8["category"], int8["model"], int8["record"]["model"]
    n = len(category.train)
    n_held = cal.calibration_size(n, model.calibration_fraction)
    _, held = cal.split_indices(n, n_held, model.config_.seed)  # the fit's own seeded split, redone here
    assert n_held == 20 == header["n_calibration_images"]

    # the int8 graph run on its own, in the export's batches (OpenVINO's kernels, chosen by shape, move
    # the last bits with the batch size: batches of 1 agree to ~1e-7, checked below)
    held_out = [category.train[i] for i in held]
    scored = ExportedModel(int8["export"], "openvino", "int8", batch_size=SCORING_BATCH).predict(held_out)
    scores = np.sort(scored.scores.astype(np.float64))
    one_by_one = ExportedModel(int8["export"], "openvino", "int8", batch_size=1).predict(held_out)
    np.testing.assert_allclose(one_by_one.scores, scored.scores, rtol=1e-5)
    alpha, pixel_fpr = header["target_fpr"], header["target_pixel_fpr"]
    k = math.ceil((n_held + 1) * (1 - alpha) - 1e-9)  # the split-conformal rank, by hand
    assert header["image_threshold"] == float(np.nextafter(scores[min(k, n_held) - 1], np.inf))
    assert header["calibration"]["image_scores"] == scores.tolist()
    recomputed = cal.Calibration.from_scores(scored.scores, scored.maps)
    assert header["pixel_threshold"] == recomputed.pixel_threshold(pixel_fpr)
    assert header["calibration"]["pixel_quantiles"] == recomputed.pixel_quantiles.tolist()
    assert header["thresholds_from"] == "int8 graph, 20 held-out images"
    assert header["threshold_source"] == recomputed.describe(alpha)

    # int8 scores are not f32 ones: the f32 thresholds would be wrong here
    assert header["image_threshold"] != model.image_threshold_
    assert not np.allclose(scored.scores, model.predict([category.train[i] for i in held]).scores, rtol=1e-4)
    record = int8["record"]
    assert record["precision"] == "int8" and record["graph_format"] == "openvino"
    assert record["quantization"]["held_out"] == 20 and record["quantization"]["images"] == 24


def test_the_backbone_is_int8_and_the_gaussian_part_f32(int8):
    import openvino as ov

    model = ov.Core().read_model(str(int8["export"] / "model.xml"))
    kinds = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            sources = {i.get_source_output().get_node().get_type_name() for i in op.inputs()}
            kinds.setdefault(op.get_type_name(), []).append("FakeQuantize" in sources)
    assert sum(kinds["Convolution"]) >= 14  # resnet18's convolutions to layer3 (the pooled one is quantised before its pooling)
    assert not any(kinds["MatMul"])  # Mahalanobis and blur products read f32
    assert kinds["Convolution"][-1] is False  # the last layer's channel selection reads f32


def test_the_refitted_gaussians_are_those_of_the_shipped_graphs_own_features(int8, tmp_path):
    """The Gaussians are refitted on int8 features from a graph quantised apart (with the embeddings
    as an extra output); the shipped graph, quantised again on the same images, must compute the
    same features: its maps equal the maps of the first graph's embeddings under the new Gaussians."""
    import openvino as ov
    import torch

    from padim.core.scorer import PatchScorer
    from padim.deploy.export import export_onnx
    from padim.deploy.quantize import decoded, quantized_model, refit_gaussians
    from padim.deploy.sessions import openvino_config

    model, train = int8["model"], int8["category"].train[:24]
    pixels = decoded(train, model.config_)
    mean, factor = refit_gaussians(model, train, pixels, tmp_path)
    assert not torch.allclose(mean, model.mean_, rtol=1e-3)  # int8 features are not f32 ones
    c = model.config_
    scorer = PatchScorer(model.embedder_, mean, factor, model.feature_hw_, c.sigma).eval()
    core, test = ov.Core(), np.stack(decoded([s.path for s in int8["category"].test], c))
    outputs = []
    for onnx_path in (tmp_path / "deltas.onnx", export_onnx(scorer, tmp_path / "shipped.onnx")[0]):
        request = core.compile_model(quantized_model(onnx_path, pixels)[0], "CPU", openvino_config("int8"))
        outputs.append({p.get_any_name(): np.array(v) for p, v in request.create_infer_request().infer({0: test}).items()})
    embeddings = torch.from_numpy(outputs[0]["deltas"] + model.mean_.numpy()[:, None, :])
    distances = torch.linalg.vector_norm(torch.matmul(embeddings - mean[:, None], factor.transpose(1, 2)), dim=2).T
    maps = (scorer.rows @ distances.unflatten(1, model.feature_hw_) @ scorer.cols_t).numpy()
    np.testing.assert_allclose(outputs[1]["maps"], maps, rtol=1e-4, atol=1e-4 * maps.max())


def test_f32_thresholds_are_never_paired_with_int8_scores(int8, tmp_path):
    f32 = export_file(int8["path"], "openvino", tmp_path / "f32", model=int8["model"])
    with pytest.raises(EngineError, match="is an int8 graph"):
        ExportedModel(int8["export"], "openvino", "f32")
    with pytest.raises(EngineError, match="`precision` int8 needs an int8 export"):
        ExportedModel(f32, "openvino", "int8")
    with pytest.raises(EngineError, match="decides with its own thresholds"):
        ExportedModel(int8["export"], "openvino", "int8", metadata=json.loads((f32 / "padim.json").read_text())["model"])
    with pytest.raises(EngineError, match="is an OpenVINO option"):
        open_engine("onnxruntime", "int8", export=int8["export"])
    # beside the model file, the int8 export still decides with its own thresholds
    beside = open_engine("openvino", "int8", model_path=int8["path"], export=int8["export"])
    assert beside.image_threshold_ == int8["record"]["model"]["image_threshold"] != int8["model"].image_threshold_
    with pytest.raises(EngineError, match="needs an int8 export"):
        open_engine("openvino", "int8", model_path=int8["path"], export=f32)  # an f32 export of the same model


def test_an_int8_export_needs_the_folder_the_model_was_fitted_on(int8, tmp_path):
    train = int8["category"].train
    with pytest.raises(Exception, match=r"`data_root`/`category`: its 43 training images are not the ones"):
        export_int8(int8["path"], train[:-1], tmp_path / "x", model=int8["model"])
    cv = PaDiM(**FAST, calibration="cv").fit(train)
    cv.save(tmp_path / "cv.safetensors")
    with pytest.raises(Exception, match="cross-fitted"):
        export_int8(tmp_path / "cv.safetensors", train, tmp_path / "y", model=cv)


def test_cli_int8_test_caches_and_predict_serves_its_thresholds(int8, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path / "cache"))
    images = [str(s.path) for s in int8["category"].test]

    def run(*argv, code=0):
        capsys.readouterr()
        assert main(list(map(str, argv))) == code
        return capsys.readouterr()

    predict = ["predict", "--model", int8["path"], "--engine", "openvino", "--precision", "int8", images[0]]
    err = run(*predict, code=1).err
    assert "has no int8 export yet" in err and "--data-root" in err and len(err.splitlines()) == 1
    out = run("test", "--model", int8["path"], "--data-root", int8["root"], "--category", "wide", "--engine", "openvino",
              "--precision", "int8", "--output", tmp_path / "t").out
    assert "engine openvino int8" in out and "thresholds from: int8 graph, 20 held-out images" in out
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["precision"] == "int8" and metrics["thresholds_from"] == "int8 graph, 20 held-out images"
    assert metrics["calibrated_image_threshold"] == int8["record"]["model"]["image_threshold"]
    cached = list((tmp_path / "cache").iterdir())
    assert [p.name.endswith("-openvino-int8") for p in cached] == [True]
    built = (cached[0] / "padim.json").stat().st_mtime_ns

    records = [json.loads(line) for line in run(*predict[:-1], *images).out.splitlines()]
    assert {r["threshold"] for r in records} == {int8["record"]["model"]["image_threshold"]}
    assert (cached[0] / "padim.json").stat().st_mtime_ns == built  # the cached export, not a new one
    exported = [json.loads(line) for line in run("predict", "--export", int8["export"], "--engine", "openvino",
                                                 "--precision", "int8", *images).out.splitlines()]
    assert [r["score"] for r in exported] == [r["score"] for r in records]

    for argv, message in [
        (["test", "--model", int8["path"], "--data-root", int8["root"], "--category", "wide", "--engine", "openvino",
          "--precision", "int8", "--store-oracle-thresholds"], "--store-oracle-thresholds would store"),
        (["export", "--model", int8["path"], "--precision", "int8", "--output", tmp_path / "e"], "needs --data-root"),
        (["export", "--model", int8["path"], "--precision", "int8", "--format", "onnx", "--data-root", int8["root"],
          "--category", "wide", "--output", tmp_path / "e"], "--format openvino"),
        (["export", "--model", int8["path"], "--data-root", int8["root"], "--output", tmp_path / "e"],
         "are for --precision int8"),
        (["predict", "--export", int8["export"], "--engine", "openvino", images[0]], "--precision int8"),
    ]:
        err = run(*argv, code=1).err
        assert message in err and len(err.splitlines()) == 1, err


def test_cli_export_int8_writes_the_int8_thresholds(int8, tmp_path, capsys):
    assert main(["export", "--model", str(int8["path"]), "--precision", "int8", "--data-root", str(int8["root"]),
                 "--category", "wide", "--output", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported") and "openvino int8" in out and "int8 graph, 20 held-out images" in out
    assert len(out.splitlines()) == 1  # NNCF's progress went to stderr
    header = json.loads((tmp_path / "e" / "padim.json").read_text())["model"]
    assert header["image_threshold"] == int8["record"]["model"]["image_threshold"]  # the same graph, same numbers


def test_models_route_says_engine_precision_and_where_the_thresholds_come_from(int8):
    pytest.importorskip("pydantic")
    from padim.serve.registry import describe, load_models
    from padim.serve.schemas import ModelInfo

    served = load_models([int8["export"]], engine="openvino", precision="int8")
    info = ModelInfo(**describe(next(iter(served.values()))))
    assert (info.engine, info.precision, info.thresholds_from) == ("openvino", "int8", "int8 graph, 20 held-out images")
    assert info.image_threshold == int8["record"]["model"]["image_threshold"]
    torch_served = load_models([int8["path"]], device="cpu")
    assert describe(next(iter(torch_served.values())))["thresholds_from"] == "f32 scores (the model file's thresholds)"


def test_an_int8_export_scores_without_torch(int8):
    images = [str(s.path) for s in int8["category"].test]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = ["predict", "--engine", "openvino", "--precision", "int8", "--export", str(int8["export"])] + images
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    scores = [json.loads(line)["score"] for line in done.stdout.splitlines()]
    np.testing.assert_allclose(scores, ExportedModel(int8["export"], "openvino", "int8").predict(images).scores,
                               rtol=1e-6)


# ---------------------------------------------------------------------------- real data (accuracy)
# int8 - f32 on this subset, measured here (2-core AMD EPYC, AVX2 without VNNI or AVX-512, OpenVINO
# 2026.4, NNCF 3.4; efficientnet_lite0, 256 px, fitted on every 4th training image: 171 + 20 held out;
# every 3rd test image of each kind): f32 image AUROC 0.8932, pixel AUROC 0.7184, AUPRO 0.6169;
# int8 - f32: -0.0043, 0.0000, -0.0006 (quantised on all 171 fit images; on 48 of them, as below:
# -0.0038, +0.0024, -0.0042). On the whole set (685 + 76 held out, 583 test images):
# f32 0.9199 / 0.7312 / 0.6518, int8 - f32: -0.0020 / +0.0029 / -0.0086 (without the refitted
# Gaussians: -0.0276 / +0.0026 / -0.0176). The bound leaves room for another CPU's int8 kernels; it is
# not the 0.005 target (benchmarks/engines.py measures that on whole sets).
INT8_MEASURED = {"image_AUROC": -0.0038, "pixel_AUROC": 0.0024, "pixel_AUPRO": -0.0042}
INT8_BOUND = 0.015
# NNCF's activation ranges from 48 of the 171 fit images here (the command's default is 300, i.e. all
# 171): its two statistics passes over 171 images took about a third of this test
INT8_QUANTIZATION_IMAGES = 48


def test_int8_accuracy_on_magnetic_tile(magnetic_tile_model, tmp_path):
    from padim.jobs.evaluate import evaluate
    from padim.deploy.engines import as_torch

    category, model = magnetic_tile_model  # fitted once per run (conftest), on every 4th training image
    train = category.train[::4]
    category = every_third_test_image(category)
    model.save(tmp_path / "m.safetensors")
    f32 = export_file(tmp_path / "m.safetensors", "openvino", tmp_path / "f32", model=model)
    int8 = export_int8(tmp_path / "m.safetensors", train, tmp_path / "int8", model=model, n_images=INT8_QUANTIZATION_IMAGES)
    metrics = {}
    for name, folder, precision in (("f32", f32, "f32"), ("int8", int8, "int8")):
        engine = ExportedModel(folder, "openvino", precision)
        metrics[name] = evaluate(model, category, iter_predict=as_torch(engine.iter_predict)).metrics
    deltas = {key: metrics["int8"][key] - metrics["f32"][key] for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}
    print({"f32": {k: round(metrics["f32"][k], 4) for k in deltas}, "int8 - f32": {k: round(v, 4) for k, v in deltas.items()}})
    assert abs(deltas["image_AUROC"]) <= INT8_BOUND and abs(deltas["pixel_AUROC"]) <= INT8_BOUND
