"""The learning line served (issue 28), in process (FastAPI's TestClient): ``POST /models/NAME/recalibrate``
takes the sampled pictures operators confirmed good, writes the recalibrated file (the previous kept
beside it) and swaps it in while requests keep arriving (none fails); live accuracy per version in
/models and /metrics. References: a by-hand split-conformal threshold from ``PaDiM.load(...).predict``
of the same pictures, counts kept by the test, SciPy's beta quantiles."""

import threading

import numpy as np
import pytest
from scipy.stats import beta

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("python_multipart", reason="the serve extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import FAST  # noqa: E402
from padim import PaDiM  # noqa: E402
from padim.serve import ServeSettings, create_app, load_models  # noqa: E402
from padim.serve.versions import ModelSource  # noqa: E402
from test_serve_line import metric, post, sha256, wait_ready  # noqa: E402


def test_recalibration_swaps_in_thresholds_from_confirmed_good_pictures_with_no_failed_request(synthetic_root, tmp_path):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    pictures = sorted((synthetic_root / "fabric" / "test").rglob("*.png")) + train  # 16 good, some defects
    folder, kept = tmp_path / "models", tmp_path / "kept"
    folder.mkdir()
    model = PaDiM(**FAST).fit(train)
    scores = model.predict(pictures).scores
    model.set_operating_point(image_threshold=float(np.median(scores)))  # a verdict for every picture
    model.save(folder / "m.safetensors")
    old = sha256(folder / "m.safetensors")
    settings = ServeSettings(reload_interval=0, keep_flagged=str(kept), keep_good_sample=100, max_batch=4)
    source = ModelSource(folder=folder, device="cpu")
    with TestClient(create_app(load_models(source.scan()[0].values(), device="cpu"), settings, source=source)) as client:
        wait_ready(client)
        assert client.post("/models/m/recalibrate", json={}).status_code == 409  # nothing sampled yet
        assert client.get("/models/m").json()["drift"] is None  # fitted without calibration: no drift alarm
        answers = [post(client, "m", [p.read_bytes()]) for p in pictures]
        labels = [a["results"][0]["label"] for a in answers]
        truths = ["defect" if "/good/" not in str(p) else "good" for p in pictures]
        truths[-1] = None  # no verdict
        for answer, truth in zip(answers, truths):
            if truth is not None:
                done = client.post("/models/m/feedback", json={"request_id": answer["request_id"], "index": 0,
                                                              "truth": truth})
                assert done.status_code == 200, done.json()
        statuses, stop = [], threading.Event()

        def keep_asking():
            while not stop.is_set():
                statuses.append(client.post("/models/m/predict", files=[
                    ("files", ("x.png", pictures[0].read_bytes(), "image/png"))]).status_code)

        asking = threading.Thread(target=keep_asking)
        asking.start()
        try:
            done = client.post("/models/m/recalibrate", json={"target_fpr": 0.2})
        finally:
            stop.set()
            asking.join(60)
        assert done.status_code == 200, done.json()
        info = client.get("/models/m").json()
        text = client.get("/metrics").text
        after = post(client, "m", [pictures[0].read_bytes()])
    answer = done.json()
    confirmed = [p for p, t in zip(pictures, truths) if t == "good"]
    assert answer["pictures"] == len(confirmed) == 15 and answer["counts"]["unconfirmed"] == 1
    assert answer["counts"]["defect"] == truths.count("defect") > 0
    ordered = np.sort(model.predict(confirmed).scores.astype(np.float64))  # by hand: k = ceil(16 * 0.8) = 13
    assert answer["image_threshold"]["after"] == float(np.nextafter(ordered[12], np.inf))
    assert answer["previous_sha256"] == old and answer["sha256"] == sha256(folder / "m.safetensors") != old
    assert sha256(folder / answer["kept_previous"]) == old
    assert statuses and set(statuses) == {200}, statuses  # the live swap failed no request
    assert info["sha256"] == answer["sha256"] and info["image_threshold"] == answer["image_threshold"]["after"]
    assert info["drift"] is not None and info["drift"]["images_seen"] == 0  # a drift alarm on the new reference
    assert after["model_sha256"] == answer["sha256"]
    recalibrated = PaDiM.load(folder / "m.safetensors", device="cpu")
    assert recalibrated.calibrated_by_ == "padim serve" and recalibrated.calibration_.n == 15
    np.testing.assert_array_equal(recalibrated.predict(pictures).scores, scores)  # the same Gaussians
    # live accuracy of the old version, by hand from the answers' labels and the verdicts
    good = [label for label, truth in zip(labels, truths) if truth == "good"]
    alarms = sum(label == "anomalous" for label in good)
    live = info["live_accuracy"][old]
    assert (live["false_alarms"]["errors"], live["false_alarms"]["of"]) == (alarms, len(good))
    expected = [0.0 if alarms == 0 else beta.ppf(0.025, alarms, len(good) - alarms + 1),
                1.0 if alarms == len(good) else beta.ppf(0.975, alarms + 1, len(good) - alarms)]
    np.testing.assert_allclose(live["false_alarms"]["interval"], expected, rtol=1e-9)
    assert metric(text, "padim_live_false_alarm_rate", model="m", version=old[:12], bound="estimate") == \
        pytest.approx(alarms / len(good))


def test_recalibration_needs_the_key_and_a_sample(synthetic_root, tmp_path):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    folder = tmp_path / "models"
    folder.mkdir()
    PaDiM(**FAST).fit(train).save(folder / "m.safetensors")
    source = ModelSource(folder=folder, device="cpu")
    with TestClient(create_app(load_models(source.scan()[0].values(), device="cpu"),
                               ServeSettings(reload_interval=0, api_key="k"), source=source)) as client:
        wait_ready(client)
        assert client.post("/models/m/recalibrate").status_code == 401  # the API key first
        refused = client.post("/models/m/recalibrate", headers={"Authorization": "Bearer k"})
    assert refused.status_code == 409 and "--keep-good-sample" in refused.json()["detail"]
