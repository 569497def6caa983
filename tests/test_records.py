"""One record schema: the same images through ``padim predict`` (JSON lines), Ray's Parquet rows
(``score_files``), ``padim serve`` (API answers) and its decision log give the same decision fields
with the same values, and every label is the one decision rule's (``score >= threshold``), checked
here against the plain comparison in float64."""

import json
import time

import numpy as np
import pytest

from conftest import FAST
from padim import PaDiM
from padim.cli import main

FIELDS = ("score", "p_value", "threshold", "threshold_source", "label")


@pytest.fixture
def parquet():
    return pytest.importorskip("pyarrow", reason="the ray extra is not installed (pip install '.[ray]')")


@pytest.fixture
def service():
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
    pytest.importorskip("httpx", reason="httpx is not installed (FastAPI's TestClient needs it)")


@pytest.fixture(scope="module")
def case(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    model = PaDiM(**FAST, calibration_fraction=0).fit(train)
    images = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))
    scores = model.predict(images).scores
    threshold = float(np.median(scores))  # half of them anomalous
    model.set_operating_point(image_threshold=threshold)
    model.save(folder / "m.safetensors")
    return {"path": folder / "m.safetensors", "images": images, "threshold": threshold}


def _json_lines(case, capsys):
    assert main(["predict", "--model", str(case["path"]), *map(str, case["images"])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return {line["path"]: line for line in lines}


def _check_labels(records, threshold):
    for record in records.values():
        assert record["label"] == ("anomalous" if float(record["score"]) >= threshold else "good")


def test_json_lines_and_parquet_rows_hold_the_same_decisions(parquet, case, capsys):  # skips before fitting
    from padim.cluster.ray_scoring import score_files

    lines = _json_lines(case, capsys)
    model = PaDiM.load(case["path"], device="cpu")
    names = [str(p) for p in case["images"]]
    rows = {row["path"]: row for row in score_files(model, names, names, model.operating_point()).to_pylist()}
    assert set(rows) == set(lines) == set(names)
    for name in names:
        assert {f: rows[name][f] for f in FIELDS} == pytest.approx({f: lines[name][f] for f in FIELDS}, rel=1e-6)
        assert rows[name]["error"] is None
    _check_labels(lines, case["threshold"])
    assert {line["label"] for line in lines.values()} == {"good", "anomalous"}


def test_api_answers_and_decision_log_lines_hold_the_json_lines_decisions(service, case, capsys, tmp_path):
    from fastapi.testclient import TestClient

    from padim.serve import ServeSettings, create_app, load_models

    lines = _json_lines(case, capsys)
    settings = ServeSettings(log_decisions=str(tmp_path / "log"), reload_interval=0, drift_seed=0)
    with TestClient(create_app(load_models([case["path"]], device="cpu"), settings)) as client:
        sent, deadline = {}, time.monotonic() + 120
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:  # warming
            time.sleep(0.05)
        for start in range(0, len(case["images"]), 4):
            batch = case["images"][start : start + 4]
            files = [("files", (str(p), p.read_bytes(), "image/png")) for p in batch]
            answer = client.post("/models/m/predict", files=files)
            assert answer.status_code == 200, answer.text
            for result in answer.json()["results"]:  # the service echoes the file's name, not its path
                name = str(batch[result["index"]])
                sent[(answer.json()["request_id"], result["index"])] = name
                assert {f: result[f] for f in FIELDS} == pytest.approx({f: lines[name][f] for f in FIELDS}, rel=1e-5)
    logged = [json.loads(line) for path in sorted((tmp_path / "log").glob("decisions-*.jsonl"))
              for line in path.read_text().splitlines()]
    decisions = {sent[(line["request_id"], line["index"])]: line for line in logged if line.get("kind") == "decision"}
    assert set(decisions) == set(lines)
    for name, line in decisions.items():
        assert {f: line[f] for f in FIELDS} == pytest.approx({f: lines[name][f] for f in FIELDS}, rel=1e-5)
