"""Export folders are checked, not trusted (issue 20): padim.json's own checksum and every graph
file's SHA-256, its header validated as a model file's, the graph's declared and actual input and
outputs against the model's input size, the engine cache verified on every use and rebuilt when
damaged, one-line errors from the engines, no NaN in the JSON padim writes.

One small export (random-weights ResNet-18, 64 x 64, d = 8) is built per module; every case edits a copy.
"""

import json
import math
import sys

import numpy as np
import pytest

pytest.importorskip("onnx", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxscript", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxruntime", reason='pip install "padim-inspect[export]"')

from export_helpers import copy_export, rewrite_json, tiny_model  # noqa: E402
from padim.cli import main  # noqa: E402
from padim.deploy.cache import export_file
from padim.deploy.engines import open_engine  # noqa: E402
from padim.errors import PadimError  # noqa: E402
from padim.deploy.export import ExportError, export_model  # noqa: E402
from padim.runtime import EngineError, ExportedModel, read_export  # noqa: E402

HAS_OPENVINO = __import__("importlib").util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def exports(tiny_exports, synthetic_root, tmp_path_factory):
    """The tiny model (as a file too) and its exports (conftest's, built once per run): ONNX with a
    calibration record, OpenVINO's; and this module's: ONNX straight from the model file (its header
    has the layout record), a 32 x 32 model's."""
    tmp = tmp_path_factory.mktemp("exports")
    return {**tiny_exports,
            "from_file": export_file(tiny_exports["path"], "onnx", tmp / "from_file", model=tiny_exports["model"]),
            "small": export_model(tiny_model(synthetic_root, image_size=32), tmp / "small", "onnx")}


def _refused(folder, match, engine="onnxruntime", **kwargs):
    """Opening ``folder`` (and scoring) must end in one line that matches ``match``."""
    with pytest.raises(PadimError) as caught:
        model = ExportedModel(folder, engine, **kwargs)
        model.score_pixels(np.zeros((2, *model.config_.input_size, 3), dtype=np.uint8))
    message = str(caught.value)
    assert isinstance(caught.value, (EngineError, ExportError)) and "\n" not in message, repr(message)
    assert match in message, message
    return message


def _flip(path, position, bit=0x10):
    data = bytearray(path.read_bytes())
    data[position] ^= bit
    path.write_bytes(bytes(data))


def test_a_sound_export_is_read_and_scores(exports):
    record = read_export(exports["onnx"])
    assert record["export_version"] == 2 and set(record["sha256"]) == {"model.onnx"}
    assert record["checksum"].startswith("sha256:") and list(record)[-1] == "checksum"
    assert np.isfinite(exports["scores"]).all()
    np.testing.assert_allclose(exports["scores"], exports["model"].predict(exports["images"]).scores, rtol=1e-4)


def test_a_flipped_byte_in_the_graph_is_refused(exports, tmp_path):
    folder = copy_export(exports["onnx"], tmp_path / "e")
    _flip(folder / "model.onnx", (folder / "model.onnx").stat().st_size // 2)  # in the weights: it would still load
    message = _refused(folder, "model.onnx does not match its checksum: damaged or replaced; export again")
    assert message.startswith(f"export {folder}: ")


def test_a_graph_swapped_for_another_models_is_refused(exports, tmp_path):
    folder = copy_export(exports["onnx"], tmp_path / "e")
    (folder / "model.onnx").write_bytes((exports["small"] / "model.onnx").read_bytes())
    _refused(folder, "model.onnx does not match its checksum")
    # with the digests recomputed (a deliberate swap): the open graph takes 32 x 32 pixels, not 64 x 64
    rewrite_json(folder, lambda record: None, digests=True)
    _refused(folder, "is not the scoring graph of a 64x64 model")


def test_an_edited_padim_json_is_refused(exports, tmp_path):
    folder = copy_export(exports["onnx"], tmp_path / "e")
    rewrite_json(folder, lambda record: record["model"].__setitem__("image_threshold", 2.5), checksum="keep")
    _refused(folder, "padim.json does not match its checksum: damaged or edited; export again")
    folder = copy_export(exports["onnx"], tmp_path / "f")
    _flip(folder / "padim.json", 40, 0x01)
    _refused(folder, "padim.json")


def _set(*keys, value):
    def edit(record):
        target = record
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _bigger_input(record):
    """An input size the graph does not have, consistent everywhere in padim.json."""
    record["model"]["config"]["image_size"] = [128, 128]
    record["model"]["feature_hw"] = [32, 32]
    record["input"]["shape"][1:3] = [128, 128]
    record["outputs"]["maps"]["shape"][1:3] = [128, 128]


# edits with the checksum recomputed, as a deliberate edit would: refused by the header's checks
EDITS = {
    "threshold as text": (_set("model", "image_threshold", value="2.0"), "image_threshold must be a number or null"),
    "NaN threshold": (_set("model", "pixel_threshold", value=float("nan")), "padim.json is damaged (not JSON"),
    "infinite threshold": ((_set("model", "image_threshold", value=123.0), lambda raw: raw.replace(b"123.0", b"1e400")),
                           "image_threshold must be a number or null"),
    "huge whole threshold": (_set("model", "image_threshold", value=10 ** 400), "image_threshold must be a number"),
    "source not text": (_set("model", "threshold_source", value=["manual"]), "threshold_source must be text or null"),
    "target_fpr out of range": (_set("model", "target_fpr", value=1.5), "target_fpr must be a number in [0, 1)"),
    "unknown backbone": (_set("model", "config", "backbone", value="resnet999"), "config backbone 'resnet999'"),
    "d too large": (_set("model", "config", "n_features", value=449), "config n_features must be 1..448"),
    "NaN sigma": (_set("model", "config", "sigma", value=float("nan")), "not JSON"),
    "feature grid": (_set("model", "feature_hw", value=[8, 8]), "feature grid (8, 8) does not match"),
    "calibration out of order": (_set("model", "calibration", "image_scores", value=[3.0, 1.0, 2.0]),
                                 "calibration data is damaged"),
    "calibration as text": (_set("model", "calibration", "pixel_quantiles", value=["0.25", "1.5", "4.0"]),
                            "calibration data is damaged"),
    "calibration lengths": (_set("model", "calibration", "pixel_levels", value=[0.0, 1.0]), "calibration data is damaged"),
    "calibration method": (_set("model", "calibration", "method", value="oracle"), "calibration data is damaged"),
    "declared input": (_set("input", "shape", value=["batch", 128, 128, 3]), "declares the graph's input as"),
    "declared outputs": (_set("outputs", "scores", "dtype", value="float64"), "declares the graph's outputs as"),
    "input size of another graph": (_bigger_input, "is not the scoring graph of a 128x128 model"),
    "a file outside the folder": (_set("files", value=["../model.safetensors"]), "does not describe the files"),
    "graph file of another format": (_set("graph", value="model.xml"), "does not describe the files"),
    "graph format not text": (_set("graph_format", value=["onnx"]), "does not describe the files"),
    "no digest": (lambda record: record.pop("sha256"), "does not describe the files"),
    "no header": (lambda record: record.pop("model"), "lacks the model's header"),
    "unknown precision": (_set("precision", value="int4"), "declares precision 'int4'"),
    "an int8 ONNX graph": (_set("precision", value="int8"), "declares precision 'int8'"),
    "thresholds_from not text": (_set("model", "thresholds_from", value=["int8"]), "thresholds_from must be text"),
    "a newer version": (_set("export_version", value=3), "upgrade padim"),
    "version 1 with a checksum": (_set("export_version", value=1), "has version 1; this padim reads version 2"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_padim_json_with_a_recomputed_checksum_is_validated(exports, tmp_path, case):
    edit, match = EDITS[case]
    edit, text = edit if isinstance(edit, tuple) else (edit, None)
    folder = copy_export(exports["onnx"], tmp_path / "e")
    rewrite_json(folder, edit, text=text)
    _refused(folder, match)


def test_an_export_from_before_the_checksums_is_refused_with_export_again(exports, tmp_path):
    folder = copy_export(exports["onnx"], tmp_path / "e")

    def version_1(record):  # what padim wrote before: no digests, no checksum
        record["export_version"] = 1
        del record["sha256"]

    rewrite_json(folder, version_1, checksum="drop")
    _refused(folder, "made by an older padim (export version 1, without checksums): export again")
    rewrite_json(folder, lambda record: record.__setitem__("export_version", 2), checksum="drop")
    _refused(folder, "padim.json does not match its checksum")


def test_another_backbone_contradicts_the_layout_of_a_model_files_header(exports, tmp_path):
    folder = copy_export(exports["from_file"], tmp_path / "e")
    ExportedModel(folder).predict(exports["images"][:1])  # the copy itself is sound
    rewrite_json(folder, _set("model", "config", "backbone", value="resnet50"))
    _refused(folder, "contradicts the layout it was saved with")


def test_padim_json_holds_no_nan_and_a_nan_threshold_is_not_exported(exports, tmp_path):
    def strict(name):
        raise ValueError(name)

    json.loads((exports["onnx"] / "padim.json").read_text(), parse_constant=strict)  # no NaN, Infinity
    model = exports["model"]
    saved = model.image_threshold_
    try:
        model.image_threshold_ = math.nan
        with pytest.raises(ExportError, match="image_threshold must be a number or null, got nan") as caught:
            export_model(model, tmp_path / "nan", "onnx")
        assert "\n" not in str(caught.value)
    finally:
        model.image_threshold_ = saved
    assert not (tmp_path / "nan" / "padim.json").exists()


@pytest.mark.skipif(not HAS_OPENVINO, reason='pip install "padim-inspect[openvino]"')
def test_a_truncated_openvino_bin_is_one_line(exports, tmp_path):
    folder = copy_export(exports["openvino"], tmp_path / "e")
    ExportedModel(folder, "openvino").predict(exports["images"][:1])
    with open(folder / "model.bin", "r+b") as handle:
        handle.truncate((folder / "model.bin").stat().st_size // 2)
    _refused(folder, "model.bin does not match its checksum", "openvino")
    rewrite_json(folder, lambda record: None, digests=True)  # past the checksums: OpenVINO's own error, one line
    _refused(folder, "openvino cannot load", "openvino")


def test_a_damaged_export_is_one_line_in_the_cli(exports, tmp_path, capsys):
    folder = copy_export(exports["onnx"], tmp_path / "e")
    _flip(folder / "model.onnx", 1000)
    capsys.readouterr()
    argv = ["predict", "--engine", "onnxruntime", "--export", str(folder), str(exports["images"][0])]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "model.onnx does not match its checksum" in err, err


def test_a_damaged_cached_export_is_rebuilt_and_said(exports, tmp_path, monkeypatch):
    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path / "cache"))
    notes = []
    first = open_engine("onnxruntime", model_path=exports["path"], model=exports["model"], note=notes.append)
    want = first.predict(exports["images"]).scores
    assert notes == []
    (cached,) = (tmp_path / "cache").iterdir()
    assert open_engine("onnxruntime", model_path=exports["path"], note=notes.append).folder == cached and notes == []

    for damage in ("graph", "padim.json"):
        if damage == "graph":
            _flip(cached / "model.onnx", (cached / "model.onnx").stat().st_size // 2)
        else:
            rewrite_json(cached, _set("model", "config", "n_features", value=9), checksum="keep")
        again = open_engine("onnxruntime", model_path=exports["path"], model=exports["model"], note=notes.append)
        assert notes == [f"warning: the cached export of {exports['path']} was damaged: rebuilt"], notes
        notes.clear()
        np.testing.assert_array_equal(again.predict(exports["images"]).scores, want)
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]  # nothing left aside


def test_a_damaged_cached_export_is_said_on_stderr_by_default(exports, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path / "cache"))
    open_engine("onnxruntime", model_path=exports["path"], model=exports["model"])
    (cached,) = (tmp_path / "cache").iterdir()
    (cached / "model.onnx").write_bytes((cached / "model.onnx").read_bytes()[:-10])
    capsys.readouterr()
    open_engine("onnxruntime", model_path=exports["path"], model=exports["model"])
    assert capsys.readouterr().err == f"warning: the cached export of {exports['path']} was damaged: rebuilt\n"


def test_an_export_checked_beside_its_model_file_is_hashed_once(exports, monkeypatch):
    """The checksums are computed once per use, not once per check (they cost a read of the graph)."""
    import padim.deploy.export_folder as runtime

    calls = []
    real = runtime.file_sha256
    monkeypatch.setattr(runtime, "file_sha256", lambda path: calls.append(path) or real(path))
    open_engine("onnxruntime", model_path=exports["path"], export=exports["from_file"])
    assert len(calls) == 1


def test_the_runtime_checks_without_torch(exports):
    """The header checks (padim.config, padim.headers) import no torch: an edited export is refused,
    a sound one scores, in an interpreter where torch cannot be imported."""
    import subprocess
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import sys
        for name in ("torch", "torchvision", "timm"):
            sys.modules[name] = None
        from padim.errors import PadimError
        from padim.deploy.exported import ExportedModel, check_model_record, read_export
        record = read_export(sys.argv[1])
        ExportedModel(sys.argv[1]).predict([sys.argv[2]])
        try:
            check_model_record({**record["model"], "image_threshold": "x"}, sys.argv[1])
        except PadimError as exc:
            print(exc)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
    """)
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script, str(exports["from_file"]), str(exports["images"][0])],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "image_threshold must be a number or null" in done.stdout
