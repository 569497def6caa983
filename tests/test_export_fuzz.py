"""Fuzz test of export folders (issue 20), like ``test_model_file_fuzz`` for model files.

Every case ends in a score or a one-line ``EngineError``/``ExportError``: never another exception, a
hang, or a silently different score.

- seeded: single-bit flips anywhere in model.onnx and in padim.json, truncations of either, the graph
  swapped for another model's (with padim.json's digests stale, and recomputed), padim.json edits
  that leave its checksum stale, and flips and truncations of an OpenVINO export's model.xml and
  model.bin: always refused;
- Hypothesis: any JSON value put anywhere in padim.json (or a field deleted, or one added), with the
  checksum recomputed as a deliberate edit would: refused by the header's checks, or scored exactly
  as the original export scores (the graph computes; padim.json only decides and describes).
"""

import json
import os
import random
import time

import numpy as np
import pytest

pytest.importorskip("onnx", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxscript", reason='pip install "padim-inspect[export]"')
pytest.importorskip("onnxruntime", reason='pip install "padim-inspect[export]"')
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from export_helpers import copy_export, rewrite_json, tiny_model  # noqa: E402
from padim.errors import PadimError  # noqa: E402
from padim.deploy.export import ExportError, export_model  # noqa: E402
from padim.runtime import EngineError, ExportedModel  # noqa: E402

N_GRAPH_FLIPS, N_JSON_FLIPS, N_TRUNCATIONS, N_STALE_EDITS, N_OPENVINO = 60, 60, 20, 20, 20
# Hypothesis examples: 60 seeded ones; PADIM_FUZZ_EDITS=N runs N random ones instead (a longer hunt)
N_EDITS = int(os.environ.get("PADIM_FUZZ_EDITS", 60))
HAS_OPENVINO = __import__("importlib").util.find_spec("openvino") is not None
HOSTILE = [None, True, False, -1, 0, 1, 7, 2 ** 70, -(2 ** 70), 1e308, -1e-9, 0.5, float("nan"), float("inf"), "",
           "x", "resnet50", "layer4", [], {}, [1], [64, 64], [32, 32], [16, 16], ["batch", 64, 64, 3], [0.5, 0.5, 0.5],
           ["layer1"], {"a": 1}, "float16", "model.onnx", ["model.onnx", "model.onnx.data"], "openvino", "holdout",
           [3.0, 1.0, 2.0], ["1.0"], "sha256:" + "0" * 64]


@pytest.fixture(scope="module")
def original(tiny_exports, synthetic_root, tmp_path_factory):
    """The tiny model's exports (conftest's, built once per run), and another model's graph to swap in."""
    tmp = tmp_path_factory.mktemp("export_fuzz")
    return {"folder": tiny_exports["onnx"], "images": tiny_exports["images"], "scores": tiny_exports["scores"],
            "openvino": tiny_exports["openvino"],
            "other": export_model(tiny_model(synthetic_root, image_size=32, seed=3), tmp / "other", "onnx")}


def _outcome(folder, images, engine="onnxruntime"):
    """('refused', message) or ('scored', scores); anything else propagates and fails the test."""
    started = time.perf_counter()
    try:
        result = ("scored", ExportedModel(folder, engine).predict(images).scores)
    except PadimError as exc:
        message = str(exc)
        assert isinstance(exc, (EngineError, ExportError)), repr(exc)
        assert message and "\n" not in message, repr(message)
        result = ("refused", message)
    assert time.perf_counter() - started < 20, "a case took too long"
    return result


def _cases(rng, folder, names, n_flips, n_truncations):
    """(description, file name, damaged bytes) for random single-bit flips and truncations."""
    cases = []
    for i in range(n_flips):
        name = names[i % len(names)]
        data = bytearray((folder / name).read_bytes())
        position, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        data[position] ^= bit
        cases.append((f"{name}: bit {bit} at byte {position}", name, bytes(data)))
    for i in range(n_truncations):
        name = names[i % len(names)]
        data = (folder / name).read_bytes()
        cut = rng.randrange(len(data))
        cases.append((f"{name}: first {cut} bytes", name, data[:cut]))
    return cases


def _stale_edit(rng):
    key = rng.choice(["image_threshold", "pixel_threshold", "threshold_source", "category", "feature_hw", "config"])
    value = rng.choice(HOSTILE + [2.5, 1e-3, "manual"])
    return (lambda record: record["model"].__setitem__(key, value)), key


def test_damaged_exports_are_refused(original, tmp_path):
    rng = random.Random(20240620)
    source = original["folder"]
    cases = _cases(rng, source, ["model.onnx"], N_GRAPH_FLIPS, N_TRUNCATIONS // 2)
    cases += _cases(rng, source, ["padim.json"], N_JSON_FLIPS, N_TRUNCATIONS // 2)
    cases.append(("swapped graph", "model.onnx", (original["other"] / "model.onnx").read_bytes()))
    folder = tmp_path / "case"
    for what, name, content in cases:
        copy_export(source, folder)
        (folder / name).write_bytes(content)
        outcome, value = _outcome(folder, original["images"])
        assert outcome == "refused", f"{what} was scored"
    record = json.loads((source / "padim.json").read_text())
    for _ in range(N_STALE_EDITS):
        edit, key = _stale_edit(rng)
        edited = json.loads(json.dumps(record))
        edit(edited)
        if edited == record:
            continue  # the value it had: no edit
        copy_export(source, folder)
        rewrite_json(folder, edit, checksum="keep")
        outcome, _ = _outcome(folder, original["images"])
        assert outcome == "refused", f"a stale edit of {key} was scored"
    # the swapped graph with padim.json's digests recomputed: the open graph's shapes give it away
    copy_export(source, folder)
    (folder / "model.onnx").write_bytes((original["other"] / "model.onnx").read_bytes())
    rewrite_json(folder, lambda record: None, digests=True)
    outcome, message = _outcome(folder, original["images"])
    assert outcome == "refused" and "is not the scoring graph of a 64x64 model" in message, message


@pytest.mark.skipif(not HAS_OPENVINO, reason='pip install "padim-inspect[openvino]"')
def test_damaged_openvino_exports_are_refused(original, tmp_path):
    rng = random.Random(20240621)
    source = original["openvino"]
    cases = _cases(rng, source, ["model.xml", "model.bin"], N_OPENVINO * 3 // 4, N_OPENVINO // 4)
    folder = tmp_path / "case"
    for what, name, content in cases:
        copy_export(source, folder)
        (folder / name).write_bytes(content)
        outcome, _ = _outcome(folder, original["images"], "openvino")
        assert outcome == "refused", f"{what} was scored"


def _paths(value, prefix=()):
    """Every place in a JSON value (dict keys, the first 3 list items), as key paths."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            found += _paths(item, prefix + (index,))
    return found


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(HOSTILE),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


@st.composite
def json_edits(draw, record):
    """(description, edit) of one change to padim.json: a value replaced, a field deleted, or one added."""
    paths = [path for path in _paths(record) if path and path[-1] != "checksum"]
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    value = draw(JSON_VALUES)

    def edit(target):
        parent = target
        for key in path[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[path[-1]] = value
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"extra_{len(parent)}"] = value
        else:
            parent.append(value)

    return f"{action} {'.'.join(map(str, path))} = {value!r}", edit


def test_edited_padim_json_is_refused_or_scores_as_the_original(original, tmp_path_factory):
    source = original["folder"]
    record = json.loads((source / "padim.json").read_text())
    folder = tmp_path_factory.mktemp("edits") / "case"
    counts = {"refused": 0, "scored": 0}

    @settings(max_examples=N_EDITS, deadline=None, derandomize="PADIM_FUZZ_EDITS" not in os.environ, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(json_edits(record))
    def check(described_edit):
        what, edit = described_edit
        copy_export(source, folder)
        rewrite_json(folder, edit)
        outcome, value = _outcome(folder, original["images"])
        counts[outcome] += 1
        if outcome == "scored":
            assert np.isfinite(value).all(), what
            np.testing.assert_array_equal(value, original["scores"], err_msg=f"{what} scored differently")

    check()
    print(counts)
    assert counts["refused"] > 0
