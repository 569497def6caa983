"""padim serve on a line for months (issue 23), in process (FastAPI's TestClient): the drift alarm on
real pictures, its gauges, log line, webhook, banner and reset; the decision log, feedback and
flagged images; a corrupt model file refused while the old version serves, new and removed files.

References are independent of the service: hashlib for SHA-256, ``PaDiM.load(file).predict`` for
scores, a ``DriftMonitor`` fed by hand (the core's guarantee is tested against simulation in
tests/test_drift.py), counts kept by the test for the override rate, and the pictures' ground
truth (a rotation is a change, held-out good pictures are not).
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("python_multipart", reason="the serve extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import FAST  # noqa: E402
from padim import PaDiM  # noqa: E402
from padim.monitor.drift import DriftMonitor  # noqa: E402
from padim.serve import ServeSettings, create_app, load_models  # noqa: E402
from padim.serve.versions import ModelSource  # noqa: E402

TILES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile" / "train" / "good"
SEED = 7


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (labels in any order)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if found == labels:
                return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels}")


def wait_ready(client):
    for _ in range(3000):
        if client.get("/health").status_code == 200:
            return
        threading.Event().wait(0.02)
    raise AssertionError("not ready")


def post(client, name, images, query="", headers=None):
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    answer = client.post(f"/models/{name}/predict{query}", files=files, headers=headers or {})
    assert answer.status_code == 200, answer.json()
    return answer.json()


class Logged(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def logged():
    handler = Logged()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """A model of 120 magnetic_tile good pictures (36 held out to calibrate), 40 other good pictures
    of the same line as they are, and 60 more rotated by 10 degrees (a camera bumped)."""
    if not TILES.is_dir():
        pytest.skip(f"{TILES} is not there")
    paths = sorted(TILES.glob("*.jpg"))
    order = np.random.default_rng(0).permutation(len(paths))
    folder = tmp_path_factory.mktemp("tiles")
    model = PaDiM(**{**FAST, "batch_size": 32}, calibration_fraction=0.3).fit([paths[i] for i in order[:120]])
    assert model.n_calibration_images_ == 36
    model.save(folder / "tile.safetensors")
    calm = [Image.open(paths[i]).convert("RGB") for i in order[120:160]]
    rotated = [Image.open(paths[i]).convert("RGB").rotate(10) for i in order[160:220]]
    return {"file": folder / "tile.safetensors", "calm": [png(im) for im in calm],
            "rotated": [png(im) for im in rotated]}


@pytest.fixture
def webhook():
    """A loopback HTTP server recording the JSON bodies POSTed to it."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook/secret-token", received
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------------- drift
def test_the_drift_alarm_fires_on_rotated_pictures_and_not_on_good_ones(tiles, webhook, logged, synthetic_root,
                                                                        tmp_path):
    url, received = webhook
    plain = tmp_path / "plain.safetensors"  # no calibration: no drift alarm
    PaDiM(**FAST).fit(sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))).save(plain)
    models = load_models([tiles["file"], plain], device="cpu")
    settings = ServeSettings(drift_seed=SEED, webhook=url, max_batch=4, api_key="k")
    key = {"Authorization": "Bearer k"}
    reference = PaDiM.load(tiles["file"], device="cpu")
    expected = DriftMonitor(reference.calibration_.image_scores, 0.01, reference.target_fpr_, seed=SEED)
    with TestClient(create_app(models, settings)) as client:
        wait_ready(client)
        drift, scores = [], []
        for i, data in enumerate(tiles["calm"] + tiles["rotated"]):  # one image per request: a known order
            body = post(client, "tile", [data], headers=key)
            assert body["model_sha256"] == sha256(tiles["file"]) and body["fit_date"] == reference.fit_date_
            drift.append(body["results"][0]["drift_log10"])
            scores.append(body["results"][0]["score"])
            if i == len(tiles["calm"]) - 1:
                calm_state = client.get("/models/tile/drift", headers=key).json()
        assert client.post("/models/tile/drift/reset").status_code == 401  # guarded like every route
        state = client.get("/models/tile/drift", headers=key).json()
        text = client.get("/metrics", headers=key).text
        listed = {m["name"]: m for m in client.get("/models", headers=key).json()}
        page = client.get("/").text
        reset = client.post("/models/tile/drift/reset", headers=key).json()
        after_reset = client.get("/metrics", headers=key).text
        no_calibration = client.get("/models/plain/drift", headers=key)
        plain_drift = post(client, "plain", tiles["calm"][:1], headers=key)["results"][0]["drift_log10"]
    # the service scores as the library does, and feeds each image once, in order
    np.testing.assert_allclose(scores[:8], reference.predict([Image.open(io.BytesIO(d)) for d in
                                                              tiles["calm"][:8]]).scores, rtol=1e-5)
    by_hand = [expected.update([s])["streams"]["all"]["martingale"]["log10"] for s in scores]
    np.testing.assert_allclose(drift, by_hand, rtol=1e-9, atol=1e-12)
    # 40 held-out good pictures: no alarm; rotated ones: both streams alarm within 60 pictures
    assert calm_state["images_seen"] == 40 and not calm_state["alarm"]
    assert max(drift[:40]) < 2.0 and max(drift[40:]) >= 2.0
    for stream in ("all", "good"):
        since = state["streams"][stream]["alarm_since"]
        assert state["streams"][stream]["alarm"] and 40 <= since["image"] < 100, (stream, since)
        assert metric(text, "padim_drift_alarm", model="tile", stream=stream) == 1.0
        assert metric(text, "padim_drift_alarms_total", model="tile", stream=stream) == 1.0
        assert metric(text, "padim_drift_martingale_log10", model="tile", stream=stream) == pytest.approx(
            state["streams"][stream]["martingale"]["log10"])
        assert metric(after_reset, "padim_drift_alarm", model="tile", stream=stream) == 0.0
        assert metric(after_reset, "padim_drift_alarms_total", model="tile", stream=stream) == 1.0  # a counter
        alarm_lines = [line for line in logged if "drift alarm:" in line and f"stream {stream}:" in line]
        assert len(alarm_lines) == 1 and "model tile" in alarm_lines[0] and "\n" not in alarm_lines[0]
    assert state["streams"]["all"]["alarm_since"]["image"] <= state["streams"]["good"]["alarm_since"]["image"]
    assert listed["tile"]["drift"]["alarm"] and listed["tile"]["drift"]["streams_alarmed"] == ["all", "good"]
    assert listed["plain"]["drift"] is None and 'id="drift-banner"' in page
    assert reset["alarm"] is False and reset["images_seen"] == 0 and reset["streams"]["all"]["martingale"]["log10"] == 0
    assert no_calibration.status_code == 409 and "calibration" in no_calibration.json()["detail"]
    assert plain_drift is None
    # the webhook got each alarm, as JSON, after the client stopped (close sends what is queued)
    assert sorted(r["stream"] for r in received) == ["all", "good"]
    for message in received:
        assert message["model"] == "tile" and message["sha256"] == sha256(tiles["file"])
        assert message["image"] == state["streams"][message["stream"]]["alarm_since"]["image"]
        assert message["martingale_log10"] >= 2.0 and message["delta"] == 0.01


def test_a_failing_webhook_is_one_log_line_and_serving_goes_on(tiles, logged):
    models = load_models([tiles["file"]], device="cpu")
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now: connection refused
    settings = ServeSettings(drift_seed=SEED, webhook=f"http://127.0.0.1:{port}/x?token=secret", drift_delta=0.2,
                             webhook_timeout_s=2)
    with TestClient(create_app(models, settings)) as client:
        wait_ready(client)
        for data in tiles["rotated"][:20]:
            post(client, "tile", [data])
    failures = [line for line in logged if "webhook" in line]
    assert failures and all(line.count("\n") == 0 and "failed" in line for line in failures)
    assert all("secret" not in line for line in failures)  # the URL's path and query are not logged


# ----------------------------------------------------------------------------------------- decisions
def test_decision_log_feedback_and_flagged_images(tiles, tmp_path):
    log_dir, flagged_dir = tmp_path / "log", tmp_path / "flagged"
    sizes = [len(d) for d in tiles["calm"]]
    limit_gb = (2 * max(sizes) + 2 * 4000) / 1e9  # room for any one flagged image and its sidecar, not for six
    settings = ServeSettings(log_decisions=str(log_dir), keep_flagged=str(flagged_dir), keep_max_gb=limit_gb,
                             drift_seed=SEED)
    models = load_models([tiles["file"]], device="cpu")
    threshold = float(np.median(PaDiM.load(tiles["file"], device="cpu").predict(
        [Image.open(io.BytesIO(d)) for d in tiles["calm"][:12]]).scores))
    answers = []
    with TestClient(create_app(models, settings)) as client:
        wait_ready(client)
        for start in range(0, 12, 3):
            answers.append(post(client, "tile", tiles["calm"][start:start + 3], f"?threshold={threshold}"))
        ids = [a["request_id"] for a in answers]
        assert len(set(ids)) == 4
        labels = [(a["request_id"], r["index"], r["label"]) for a in answers for r in a["results"]]
        anomalous = [x for x in labels if x[2] == "anomalous"]
        good = [x for x in labels if x[2] == "good"]
        assert len(anomalous) >= 4 and len(good) >= 4
        # the operator: two false alarms, one confirmed defect, one missed defect; one verdict given twice
        verdicts = [(anomalous[0], "good"), (anomalous[1], "good"), (anomalous[2], "defect"), (good[0], "defect"),
                    (good[1], "defect"), (good[1], "good")]
        for (request_id, index, _), truth in verdicts:
            done = client.post("/models/tile/feedback", json={"request_id": request_id, "index": index, "truth": truth})
            assert done.status_code == 200, done.json()
        answer = done.json()
        text = client.get("/metrics").text
        unknown = client.post("/models/tile/feedback", json={"request_id": "nope", "index": 0, "truth": "good"})
        bad_truth = client.post("/models/tile/feedback", json={"request_id": ids[0], "index": 0, "truth": "maybe"})
        bad_index = client.post("/models/tile/feedback", json={"request_id": ids[0], "index": 3, "truth": "good"})
    # by hand: 5 images given feedback, 3 overrides (2 false alarms + 1 missed defect)
    assert answer["feedback"] == 5 and answer["overrides"] == 3 and answer["override_rate"] == pytest.approx(0.6)
    assert metric(text, "padim_override_rate", model="tile") == pytest.approx(0.6)
    assert metric(text, "padim_feedback_images", model="tile", verdict="anomalous", truth="good") == 2
    assert metric(text, "padim_feedback_images", model="tile", verdict="good", truth="defect") == 1
    assert unknown.status_code == 404 and bad_truth.status_code == 422 and bad_index.status_code == 422
    # the log: one line per image, as answered, then one per feedback; every line JSON
    lines = [json.loads(line) for path in sorted(log_dir.glob("decisions-*.jsonl"))
             for line in path.read_text().splitlines()]
    decisions = [line for line in lines if line["kind"] == "decision"]
    assert len(decisions) == 12 and len([line for line in lines if line["kind"] == "feedback"]) == 6
    for line, (answer_, result) in zip(decisions, [(a, r) for a in answers for r in a["results"]]):
        assert line["request_id"] == answer_["request_id"] and line["index"] == result["index"]
        assert line["score"] == result["score"] and line["label"] == result["label"]
        assert line["sha256"] == sha256(tiles["file"]) and line["engine"] == "torch"
        assert line["threshold"] == threshold and line["threshold_source"] == "manual"
        assert line["drift_log10"] == result["drift_log10"] and line["p_value"] == result["p_value"]
    assert [line["bytes"] for line in decisions] == sizes[:12]
    # flagged: only anomalous images, the newest first kept, within the limit
    kept = sorted(p for p in flagged_dir.iterdir() if not p.name.endswith(".json") and not p.name.startswith("."))
    total = sum(p.stat().st_size for p in flagged_dir.iterdir() if not p.name.startswith("."))
    assert 1 <= len(kept) < len(anomalous) and total <= limit_gb * 1e9
    newest = [json.loads((p.parent / (p.name + ".json")).read_text()) for p in kept]
    flagged_ids = [(r["request_id"], r["index"]) for r in newest]
    assert flagged_ids == [(request_id, index) for request_id, index, _ in anomalous[-len(kept):]]
    assert all(p.read_bytes() == tiles["calm"][ids.index(r["request_id"]) * 3 + r["index"]]
               for p, r in zip(kept, newest))


# ----------------------------------------------------------------------------------------- versions
def test_a_corrupt_replacement_keeps_the_old_version_serving_and_says_why(synthetic_root, tmp_path, logged):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    images = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:3]
    fits = tmp_path / "fits"
    fits.mkdir()
    for seed in (0, 1):
        PaDiM(**FAST, seed=seed).fit(train).save(fits / f"v{seed}.safetensors")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(fits / "v0.safetensors", folder / "m.safetensors")
    expected = {sha256(fits / f"v{s}.safetensors"): PaDiM.load(fits / f"v{s}.safetensors", device="cpu").predict(
        images).scores for s in (0, 1)}
    assert len(expected) == 2

    def replace(data: bytes, name="m.safetensors"):
        (folder / ".incoming.tmp").write_bytes(data)
        os.replace(folder / ".incoming.tmp", folder / name)

    def scores(client, name="m"):
        body = post(client, name, [p.read_bytes() for p in images], headers=key)
        return body["model_sha256"], [r["score"] for r in body["results"]]

    source = ModelSource(folder=folder, device="cpu")
    settings = ServeSettings(reload_interval=0, api_key="k")
    key = {"Authorization": "Bearer k"}
    good = (fits / "v1.safetensors").read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    with TestClient(create_app(load_models(source.scan()[0].values(), device="cpu"), settings, source=source)) as client:
        wait_ready(client)
        assert client.post("/admin/reload").status_code == 401
        old = sha256(folder / "m.safetensors")
        for damaged, words in ((bytes(flipped), "corrupted"), (good[: len(good) // 2], "")):
            replace(damaged)
            summary = client.post("/admin/reload", headers=key).json()
            assert [r["name"] for r in summary["refused"]] == ["m"] and words in summary["refused"][0]["error"]
            info = client.get("/models/m", headers=key).json()
            assert info["sha256"] == old and info["last_reload_error"]["sha256"] == sha256(folder / "m.safetensors")
            assert words in info["last_reload_error"]["error"]
            got_sha, got = scores(client)
            assert got_sha == old
            np.testing.assert_allclose(got, expected[old], rtol=1e-5)
        refusals = [line for line in logged if "refused" in line]
        assert len(refusals) == 2 and all("keeps serving" in line and "\n" not in line for line in refusals)
        assert client.post("/admin/reload", headers=key).json()["refused"] == []  # not tried again unchanged
        replace(good)
        summary = client.post("/admin/reload", headers=key).json()
        assert [r["sha256"] for r in summary["loaded"]] == [sha256(fits / "v1.safetensors")]
        got_sha, got = scores(client)
        assert got_sha == sha256(fits / "v1.safetensors")
        np.testing.assert_allclose(got, expected[got_sha], rtol=1e-5)
        info = client.get("/models/m", headers=key).json()
        assert info["last_reload_error"] is None
        assert [(v["sha256"], v["state"]) for v in info["versions"]][0] == (got_sha, "serving")
        assert info["versions"][1]["sha256"] == old and info["versions"][1]["state"] in ("draining", "retired")
        # a new file is served; a removed one is not
        shutil.copy(fits / "v0.safetensors", folder / "n.safetensors")
        assert client.post("/admin/reload", headers=key).json()["loaded"][0]["name"] == "n"
        assert scores(client, "n")[0] == old
        (folder / "n.safetensors").unlink()
        assert client.post("/admin/reload", headers=key).json()["removed"] == ["n"]
        gone = client.post("/models/n/predict", files=[("files", ("a.png", images[0].read_bytes(), "image/png"))],
                           headers=key)
        assert gone.status_code == 404
        assert sorted(client.get("/health").json()["models"]) == ["m"]
        text = client.get("/metrics", headers=key).text
    assert metric(text, "padim_model_reloads_total", model="m", result="refused") == 2
    assert metric(text, "padim_model_reloads_total", model="m", result="loaded") == 1


def test_a_request_in_flight_during_a_swap_finishes_on_the_old_version(synthetic_root, tmp_path, monkeypatch):
    """A request held between taking its version and scoring while the file is swapped: it is
    answered by the old version (its SHA-256, its scores), the old version is 'draining' until then
    and 'retired' after; requests that start after the swap get the new one."""
    import padim.serve.routes_predict as routes

    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    image = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[0]
    folder = tmp_path / "models"
    folder.mkdir()
    old_file, new_file = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    PaDiM(**FAST, seed=0).fit(train).save(old_file)
    PaDiM(**FAST, seed=1).fit(train).save(new_file)
    shutil.copy(old_file, folder / "m.safetensors")
    old_score = PaDiM.load(old_file, device="cpu").predict([image]).scores[0]
    new_score = PaDiM.load(new_file, device="cpu").predict([image]).scores[0]
    assert abs(old_score - new_score) > 1e-3 * abs(old_score)
    entered, release = threading.Event(), threading.Event()
    real = routes.decode_upload

    def held(upload, *args):
        if upload.filename == "held.png":
            entered.set()
            release.wait(60)
        return real(upload, *args)

    monkeypatch.setattr(routes, "decode_upload", held)
    source = ModelSource(folder=folder, device="cpu")
    with TestClient(create_app(load_models([folder / "m.safetensors"], device="cpu"),
                               ServeSettings(reload_interval=0), source=source)) as client:
        wait_ready(client)
        answer = {}
        worker = threading.Thread(target=lambda: answer.update(r=client.post(
            "/models/m/predict", files=[("files", ("held.png", image.read_bytes(), "image/png"))])))
        worker.start()
        assert entered.wait(60)
        shutil.copy(new_file, folder / ".m.tmp")
        os.replace(folder / ".m.tmp", folder / "m.safetensors")
        assert client.post("/admin/reload").json()["loaded"][0]["sha256"] == sha256(new_file)
        during = client.get("/models/m").json()["versions"]
        after_swap = post(client, "m", [image.read_bytes()])
        release.set()
        worker.join(60)
        for _ in range(500):
            versions = client.get("/models/m").json()["versions"]
            if versions[1]["state"] == "retired":
                break
            threading.Event().wait(0.02)
    assert [(v["sha256"], v["state"], v["requests_in_flight"]) for v in during] == [
        (sha256(new_file), "serving", 0), (sha256(old_file), "draining", 1)]
    held_answer = answer["r"]
    assert held_answer.status_code == 200, held_answer.json()
    assert held_answer.json()["model_sha256"] == sha256(old_file)
    assert held_answer.json()["results"][0]["score"] == pytest.approx(old_score, rel=1e-5)
    assert after_swap["model_sha256"] == sha256(new_file)
    assert after_swap["results"][0]["score"] == pytest.approx(new_score, rel=1e-5)
    assert [v["state"] for v in versions] == ["serving", "retired"]
