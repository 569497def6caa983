"""padim serve's API with FastAPI's TestClient: every route and every error, against the library.

The reference for every number is ``PaDiM.predict`` on the same files (the library is verified
elsewhere): the service must return the same scores, p-values, labels, thresholds and masks.
"""

import base64
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("python_multipart", reason="the serve extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import FAST  # noqa: E402
from imagefiles import png16_rgb, save, to8, upright  # noqa: E402
from padim import PaDiM  # noqa: E402
from padim.cli import main  # noqa: E402
from padim.data.synthetic import make_synthetic_category  # noqa: E402
from padim.jobs.runs import fit_category  # noqa: E402
from padim.serve import ServeSettings, create_app, load_models  # noqa: E402
from padim.serve.batcher import MicroBatcher, QueueFull  # noqa: E402
from padim.settings.calibration import at_least  # noqa: E402


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_root):
    """Two model files: 'tile' (44 training images: calibrated, category 'fabric') and 'plain'
    (the 12 images of the shared synthetic category: no calibration, no threshold)."""
    folder = tmp_path_factory.mktemp("served")
    big = tmp_path_factory.mktemp("big")
    make_synthetic_category(big, name="fabric", n_train=44, n_test_good=2, n_test_per_defect=1, size=64)
    tile = fit_category(big, "fabric", folder / "tile.safetensors", note=lambda _: None, **FAST)
    assert tile.calibration_ is not None
    plain = PaDiM(**FAST).fit(sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png")))
    assert plain.calibration_ is None
    plain.save(folder / "plain.safetensors")
    return folder


@pytest.fixture(scope="module")
def test_images(synthetic_root):
    return sorted((synthetic_root / "fabric" / "test").rglob("*.png"))


def reference(served, name):
    return PaDiM.load(served / f"{name}.safetensors", device="cpu")


def wait_ready(client, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get("/health")
        if answer.status_code == 200:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {answer.json()}")


def start(served, **settings):
    models = load_models([served / "tile.safetensors", served / "plain.safetensors"], device="cpu")
    return TestClient(create_app(models, ServeSettings(**settings)))


@pytest.fixture(scope="module")
def client(served):
    with start(served, max_upload_mb=0.5, max_files=4, queue=8, max_batch=4) as client:
        wait_ready(client)
        yield client


def files_of(paths):
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def decode_png(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_serving(client, paths):
    """The server still answers a good request correctly after an error."""
    answer = client.post("/models/plain/predict", files=files_of(paths[:1]))
    assert answer.status_code == 200 and answer.json()["results"][0]["score"] > 0


# ----------------------------------------------------------------------------------------- routes
def test_health_is_503_until_models_are_warmed(served, monkeypatch):
    release = threading.Event()
    import padim.serve.versions as app_module  # where each version's batcher finds warm_up and score_pixels

    real = app_module.warm_up
    monkeypatch.setattr(app_module, "warm_up", lambda model, n: (release.wait(30), real(model, n)))
    with start(served) as client:
        warming = client.get("/health")
        assert warming.status_code == 503 and warming.json()["status"] == "warming"
        assert warming.headers["retry-after"] == "1"
        early = client.post("/models/plain/predict", files=files_of([served / "plain.safetensors"]))
        assert early.status_code == 503 and "warming" in early.json()["detail"]
        release.set()
        ready = wait_ready(client)
        assert ready.json() == {"status": "ready", "models": ["plain", "tile"], "detail": None}


def test_models_lists_what_the_files_hold(client, served):
    listed = {m["name"]: m for m in client.get("/models").json()}
    assert set(listed) == {"tile", "plain"}
    for name, info in listed.items():
        model = reference(served, name)
        assert info["category"] == model.category_
        assert info["backbone"] == "resnet18" and info["n_features"] == model.config_.n_features
        assert info["image_size"] == [64, 64] and info["crop"] is None
        assert info["image_threshold"] == model.image_threshold_
        assert info["pixel_threshold"] == model.pixel_threshold_
        assert info["threshold_source"] == model.threshold_source_
        assert info["n_calibration_images"] == model.n_calibration_images_
        assert info["n_train_images"] == model.n_train_images_ and info["fit_date"] == model.fit_date_
        assert info["random_weights"] is True
    assert listed["tile"]["n_calibration_images"] == 20 and listed["tile"]["aliases"] == ["fabric"]
    assert listed["tile"]["calibration_method"] == "holdout"
    assert listed["plain"]["image_threshold"] is None and listed["plain"]["calibration_method"] is None
    assert client.get("/models/fabric").json()["name"] == "tile"  # the category reaches the same model


@pytest.mark.parametrize("name", ["tile", "plain"])
def test_predict_equals_the_library_on_the_same_files(client, served, test_images, name):
    model = reference(served, name)
    expected = model.predict(test_images[:4])
    answer = client.post(f"/models/{name}/predict", files=files_of(test_images[:4]))
    assert answer.status_code == 200
    body = answer.json()
    results = body["results"]
    assert [r["file"] for r in results] == [p.name for p in test_images[:4]]
    np.testing.assert_allclose([r["score"] for r in results], expected.scores, rtol=1e-6)
    assert all(r["width"] == 64 and r["height"] == 64 and r["heatmap"] is None for r in results)
    if name == "tile":
        np.testing.assert_array_equal([r["p_value"] for r in results], expected.p_values)
        assert [r["label"] == "anomalous" for r in results] == expected.labels.tolist()
        assert {r["threshold"] for r in results} == {expected.image_threshold}
        assert {r["threshold_source"] for r in results} == {expected.threshold_source}
        assert "calibration: target FPR 5% on 20 good images" == expected.threshold_source
    else:
        assert all(r["p_value"] is None and r["label"] is None and r["threshold"] is None for r in results)
    assert body["warnings"] == ["random backbone weights: the scores mean nothing (tests only)"]


def test_operating_point_per_request_never_changes_the_model(client, served, test_images):
    model = reference(served, "tile")
    before = client.get("/models/tile").json()
    for query, kwargs in [("target_fpr=0.2", dict(target_fpr=0.2)), ("threshold=9.5", dict(image_threshold=9.5)),
                          ("target_fpr=0.01", dict(target_fpr=0.01))]:
        expected = model.predict(test_images, **kwargs)
        results = client.post(f"/models/tile/predict?{query}", files=files_of(test_images[:4])).json()
        got = results["results"]
        assert [r["label"] == "anomalous" for r in got] == expected.labels[:4].tolist()
        assert {(r["threshold"], r["threshold_source"]) for r in got} == {(expected.image_threshold,
                                                                           expected.threshold_source)}
        if query == "target_fpr=0.01":  # 20 images cannot guarantee 1 %: said, never hidden
            assert "guarantee only 4.76%" in results["warnings"][0]
    def fixed(info):  # what a request may change: the drift alarm's state, not the model
        return {key: value for key, value in info.items() if key != "drift"}

    assert fixed(client.get("/models/tile").json()) == fixed(before)
    manual = client.post("/models/plain/predict?threshold=1e9", files=files_of(test_images[:1])).json()["results"][0]
    assert manual["label"] == "good" and manual["threshold_source"] == "manual"


def test_heatmap_overlay_mask_and_map_match_the_library(client, served, test_images):
    model = reference(served, "tile")
    expected = model.predict(test_images[:2])
    answer = client.post("/models/tile/predict?heatmap=true", files=files_of(test_images[:2])).json()
    for i, result in enumerate(answer["results"]):
        heat = result["heatmap"]
        overlay = decode_png(heat["overlay_png"])
        assert overlay.mode == "RGB" and overlay.size == (64, 64) == (heat["overlay_width"], heat["overlay_height"])
        mask = np.asarray(decode_png(heat["mask_png"]).convert("L")) > 0
        np.testing.assert_array_equal(mask, at_least(expected.maps[i], expected.pixel_threshold))  # same size: no resize
        grey = np.asarray(decode_png(heat["map_png"]), dtype=np.float64)
        values = heat["map_min"] + grey / 255 * (heat["map_max"] - heat["map_min"])
        step = (heat["map_max"] - heat["map_min"]) / 255
        assert np.abs(values - expected.maps[i]).max() <= step / 2 + 1e-6
        assert heat["map_max"] == pytest.approx(result["score"], rel=1e-6)  # the score is the map's maximum
        assert heat["covers"] == "image"
    plain = client.post("/models/plain/predict?heatmap=true", files=files_of(test_images[:1])).json()["results"][0]
    assert plain["heatmap"]["mask_png"] is None and plain["heatmap"]["overlay_png"]  # no pixel threshold: no mask


def test_images_are_read_as_padim_predict_reads_them(client, served, tmp_path):
    """EXIF orientation, 16-bit, grayscale JPEG and a big JPEG: the same scores as from files."""
    rng = np.random.default_rng(0)
    paths = []
    stored = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    save(Image.fromarray(stored), tmp_path / "rotated.jpg", orientation=6, quality=95)
    png16_rgb(rng.integers(0, 65536, (50, 30, 3), dtype=np.uint16), tmp_path / "deep.png")
    Image.fromarray(rng.integers(0, 256, (90, 60), dtype=np.uint8)).save(tmp_path / "grey.jpg")
    Image.fromarray(rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    paths = [tmp_path / n for n in ("rotated.jpg", "deep.png", "grey.jpg", "big.jpg")]
    expected = reference(served, "plain").predict(paths)
    results = client.post("/models/plain/predict", files=files_of(paths[:3])).json()["results"]
    results += client.post("/models/plain/predict", files=files_of(paths[3:])).json()["results"]
    np.testing.assert_allclose([r["score"] for r in results], expected.scores, rtol=1e-6)
    assert [(r["height"], r["width"]) for r in results] == [(70, 40), (50, 30), (90, 60), (600, 700)]
    assert upright(stored, 6).shape[:2] == (70, 40) and to8(np.array([65535]), 65535)[0] == 255


def test_metrics_in_prometheus_format(client, test_images):
    client.post("/models/plain/predict", files=files_of(test_images[:2]))
    client.get("/nowhere")
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert 'padim_requests_total{method="POST",route="/models/{name}/predict",status="200"}' in text
    assert 'padim_request_errors_total{route="other",status="404"}' in text
    assert 'padim_request_latency_seconds_bucket{le="+Inf",route="/models/{name}/predict"}' in text
    assert 'padim_batch_size_count{model="plain"}' in text
    images = float(text.split('padim_images_total{model="plain"} ')[1].split()[0])
    batch_sum = float(text.split('padim_batch_size_sum{model="plain"} ')[1].split()[0])
    assert images == batch_sum >= 2  # every image scored went through a batch
    assert "/nowhere" not in text  # raw paths never become labels


def test_docs_and_the_page_are_served(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/models/{name}/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"heatmap", "target_fpr", "threshold"} <= {p["name"] for p in predict["parameters"]}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="model"', 'id="files"', 'id="image-threshold"', 'id="pixel-threshold"', 'id="results"'):
        assert element in page.text
    assert "<script src" not in page.text and "http://" not in page.text and "https://" not in page.text


# ----------------------------------------------------------------------------------------- errors
def test_a_corrupt_image_fails_alone(client, served, test_images):
    files = files_of(test_images[:2])
    files.insert(1, ("files", ("broken.png", test_images[0].read_bytes()[:100], "image/png")))
    files.append(("files", ("notes.txt", b"not an image at all", "text/plain")))
    answer = client.post("/models/tile/predict", files=files)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert results[1]["score"] is None and "broken.png" in results[1]["error"]
    assert "/proc" not in results[1]["error"] and "notes.txt" in results[3]["error"]
    expected = reference(served, "tile").predict(test_images[:2]).scores
    np.testing.assert_allclose([results[0]["score"], results[2]["score"]], expected, rtol=1e-6)


def test_not_an_image_is_415_with_the_reason(client, test_images):
    answer = client.post("/models/plain/predict", files=[("files", ("a.png", b"GIF89a garbage", "image/png"))])
    assert answer.status_code == 415 and "a.png" in answer.json()["detail"]
    empty = client.post("/models/plain/predict", files=[("files", ("e.png", b"", "image/png"))])
    assert empty.status_code == 415 and "empty" in empty.json()["detail"]
    as_json = client.post("/models/plain/predict", json={"image": "abc"})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["detail"]
    assert_serving(client, test_images)


def test_malformed_requests_are_422_with_the_reason(client, test_images):
    no_files = client.post("/models/plain/predict", data={"note": "x"}, files=[("other", ("", b"", "text/plain"))])
    assert no_files.status_code == 422 and "no image" in no_files.json()["detail"]
    cut = client.post("/models/plain/predict", content=b"--xyz\r\nContent-Disposition: form-data; name=\"files\"",
                      headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert cut.status_code == 422 and "malformed" in cut.json()["detail"]
    for query, words in [("target_fpr=2", "target_fpr"), ("target_fpr=0.1&threshold=3", "not both"),
                         ("threshold=abc", "threshold"), ("threshold=nan", "finite")]:
        answer = client.post(f"/models/tile/predict?{query}", files=files_of(test_images[:1]))
        assert answer.status_code == 422 and words in answer.json()["detail"], (query, answer.json())
    uncalibrated = client.post("/models/plain/predict?target_fpr=0.1", files=files_of(test_images[:1]))
    assert uncalibrated.status_code == 422 and "no calibration" in uncalibrated.json()["detail"]
    assert_serving(client, test_images)


def test_too_large_and_too_many_are_413(client, test_images):
    noise = np.random.default_rng(1).integers(0, 256, (450, 450, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 0.5e6
    big = client.post("/models/plain/predict", files=[("files", ("big.png", buffer.getvalue(), "image/png"))])
    assert big.status_code == 413 and "MB" in big.json()["detail"]

    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
            + buffer.getvalue() + b"\r\n--b--\r\n")
    chunked = client.post("/models/plain/predict", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                          headers={"content-type": "multipart/form-data; boundary=b"})  # no Content-Length
    assert chunked.status_code == 413 and "MB" in chunked.json()["detail"]

    many = client.post("/models/plain/predict", files=files_of(test_images[:5]))
    assert many.status_code == 413 and "more than 4 files" in many.json()["detail"]
    assert_serving(client, test_images)


def test_unknown_model_is_404(client, test_images):
    answer = client.post("/models/nope/predict", files=files_of(test_images[:1]))
    assert answer.status_code == 404 and "nope" in answer.json()["detail"] and "plain" in answer.json()["detail"]
    assert client.get("/models/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert_serving(client, test_images)


def test_echoed_names_are_clipped(client, test_images):
    long = "a" * 5000
    for answer in (client.get(f"/models/{long}"),
                   client.post(f"/models/{long}/predict", files=files_of(test_images[:1]))):
        detail = answer.json()["detail"]
        assert answer.status_code == 404 and len(detail) < 200 and "a" * 80 + "..." in detail, len(detail)
    odd = client.post("/models/plain/predict", content=b"x", headers={"content-type": "text/" + "b" * 5000})
    assert odd.status_code == 415 and len(odd.json()["detail"]) < 200 and "..." in odd.json()["detail"]


def test_a_client_disconnect_mid_upload_is_one_log_line(client, test_images):
    """The ASGI app on its own, with a client that sends half a body and goes: no exception leaves the
    app (starlette's error middleware would log it as a 50-line traceback), one warning is logged."""
    import asyncio
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    messages = [{"type": "http.request", "body": b"--b\r\nContent-Disposition: form-data; name=\"files\"; "
                                                 b"filename=\"a.png\"\r\n\r\n" + b"x" * 1000, "more_body": True},
                {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/models/plain/predict", "raw_path": b"/models/plain/predict", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"500000")]}
    try:
        asyncio.run(client.app(scope, receive, send))
    finally:
        logger.removeHandler(handler)
    assert [line for line in lines if "disconnected" in line] == lines and len(lines) == 1, lines
    assert "127.0.0.1:40000" in lines[0] and "plain" in lines[0]
    assert sent[0]["status"] == 499
    assert_serving(client, test_images)


def test_a_refused_body_is_drained_within_bounds(monkeypatch):
    """What is left of a refused upload is read and dropped (so that a client still sending gets the
    answer), up to a byte and a time bound; a body declared larger than the bound is not read."""
    import asyncio

    from padim.serve import uploads

    monkeypatch.setattr(uploads, "DISCARD_BYTES", 10_000)
    read = []

    async def body(n_chunks, pause=0.0):
        for _ in range(n_chunks):
            read.append(1)
            await asyncio.sleep(pause)
            yield b"x" * 1000

    def discard(chunks, length=None, max_bytes=1000):
        read.clear()
        return asyncio.run(uploads.discard_rest(chunks, length, max_bytes))

    assert discard(body(8)) is True and len(read) == 8  # all of it: the connection can be kept
    assert discard(body(100)) is False and len(read) == 11  # stops just past the bound
    assert discard(body(15)) is False and discard(body(15), max_bytes=5000) is True  # 4 x max_bytes if more
    assert discard(body(100), str(10 ** 9)) is False and read == []  # declared too large: not read at all
    monkeypatch.setattr(uploads, "DISCARD_SECONDS", 0.2)
    assert discard(body(100, pause=0.05)) is False and len(read) < 10  # a slow sender is not waited for


def test_an_empty_api_key_is_refused(served):
    """An empty key would turn authentication off without a word (PADIM_API_KEY="")."""
    from padim.errors import PadimError

    models = load_models([served / "plain.safetensors"], device="cpu")
    for key in ("", "  ", "\t\n"):
        with pytest.raises(PadimError, match="empty") as caught:
            ServeSettings(api_key=key).check()
        assert "\n" not in str(caught.value)
        with pytest.raises(PadimError, match="empty"):
            create_app(models, ServeSettings(api_key=key))
    ServeSettings(api_key="k").check()
    ServeSettings(api_key=None).check()


def test_api_key_guards_every_route_but_health(served, test_images):
    with start(served, api_key="s3cret") as client:
        wait_ready(client)  # /health needs no key
        for method, path in [("get", "/models"), ("get", "/models/tile"), ("get", "/metrics"),
                             ("post", "/models/tile/predict")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                answer = getattr(client, method)(path, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert "Bearer" in answer.json()["detail"] and answer.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/models", headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        answer = client.post("/models/tile/predict", files=files_of(test_images[:1]), headers=good)
        assert answer.status_code == 200
        assert client.get("/").status_code == 200  # the page holds no data; it asks for the key


def test_full_queue_answers_503_with_retry_after(served, test_images, monkeypatch):
    import padim.serve.versions as app_module

    gate, entered = threading.Event(), threading.Event()
    real = app_module.score_pixels

    def held(model, pixels):
        entered.set()
        gate.wait(30)
        return real(model, pixels)

    with start(served, queue=2, max_files=2, max_batch=2, max_wait_ms=0) as client:
        wait_ready(client)
        monkeypatch.setattr(app_module, "score_pixels", held)  # batches wait until the gate opens
        first = {}
        worker = threading.Thread(target=lambda: first.update(r=client.post("/models/plain/predict",
                                                                             files=files_of(test_images[:2]))))
        worker.start()
        assert entered.wait(30)
        refused = client.post("/models/plain/predict", files=files_of(test_images[2:3]))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue holds 2" in refused.json()["detail"]
        gate.set()
        worker.join(30)
        assert first["r"].status_code == 200 and len(first["r"].json()["results"]) == 2
        assert client.post("/models/plain/predict", files=files_of(test_images[2:3])).status_code == 200
        assert 'padim_rejected_total{model="plain"} 1.0' in client.get("/metrics").text


def test_uploads_never_touch_the_disk(served, monkeypatch):
    """Starlette's own form parser spools files over 1 MB to a temporary file; ours keeps them in memory."""
    noise = np.random.default_rng(2).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 1.2e6
    with start(served, max_upload_mb=4) as client:
        wait_ready(client)

        def refuse(*args, **kwargs):
            raise AssertionError("a temporary file was created")

        for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "_mkstemp_inner"):
            monkeypatch.setattr(tempfile, name, refuse)
        answer = client.post("/models/plain/predict", files=[("files", ("../../up.png", buffer.getvalue(), "image/png"))])
    assert answer.status_code == 200, answer.json()
    assert answer.json()["results"][0]["file"] == "up.png"  # echoed as a bare name, never used as a path


# ----------------------------------------------------------------------------------------- batching
def test_concurrent_requests_share_a_batch(served, test_images):
    with start(served, max_wait_ms=500, max_batch=8) as client:
        wait_ready(client)
        answers = []
        threads = [threading.Thread(target=lambda p=p: answers.append(
            client.post("/models/plain/predict", files=files_of([p])))) for p in test_images[:4]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [a.status_code for a in answers] == [200] * 4
        text = client.get("/metrics").text
        batches = float(text.split('padim_batch_size_count{model="plain"} ')[1].split()[0])
        assert batches < 4  # 4 single-image requests, fewer backbone batches
        expected = reference(served, "plain").predict(test_images[:4]).scores
        got = sorted(r.json()["results"][0]["score"] for r in answers)
        np.testing.assert_allclose(got, sorted(expected), rtol=1e-6)


def test_batcher_gathers_caps_refuses_and_drains():
    seen = []

    def run(items):
        seen.append(list(items))
        time.sleep(0.05)
        return [x * 10 for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.3, max_queue=10).start()
    batcher.ready.wait(5)
    futures = batcher.submit([1]) + batcher.submit([2, 3]) + batcher.submit([4, 5, 6])  # arrive within the wait
    with pytest.raises(QueueFull):
        batcher.submit(list(range(5)))  # 6 pending + 5 > 10
    more = batcher.submit([7])
    batcher.close()  # drains: every accepted item is answered
    assert [f.result(0) for f in futures + more] == [10, 20, 30, 40, 50, 60, 70]
    assert seen[0] == [1, 2, 3, 4] and sum(map(len, seen)) == 7 and max(map(len, seen)) <= 4
    lone = MicroBatcher(lambda items: items, max_batch=8, max_wait_s=0.01, max_queue=8).start()
    started = time.monotonic()
    assert lone.submit(["x"])[0].result(5) == "x" and time.monotonic() - started < 1.0  # waits ~10 ms, not more
    lone.close()


def test_a_failing_batch_fails_its_requests_not_the_worker():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    batcher = MicroBatcher(run, max_batch=2, max_wait_s=0.0, max_queue=4).start()
    with pytest.raises(RuntimeError):
        batcher.submit([1])[0].result(5)
    assert batcher.submit([2])[0].result(5) == 2
    batcher.close()


# ----------------------------------------------------------------------------------------- command
def test_serve_command_errors_are_one_line(served, capsys, monkeypatch, tmp_path):
    assert main(["serve"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["serve", str(tmp_path / "missing.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path)]) == 1
    assert "no .safetensors" in capsys.readouterr().err
    assert main(["serve", str(served / "tile.safetensors"), "--queue", "2", "--max-files", "4"]) == 1
    assert "--queue" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # as if the extra were not installed
    assert main(["serve", str(served / "tile.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "padim-inspect[serve]"' in err


def test_a_cropped_model_draws_over_the_crop_it_saw(synthetic_root, test_images, tmp_path):
    path = tmp_path / "cropped.safetensors"
    model = PaDiM(**{**FAST, "crop": 48}).fit(sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png")))
    model.save(path)
    with TestClient(create_app(load_models([path], device="cpu"))) as client:
        wait_ready(client)
        answer = client.post("/models/cropped/predict?heatmap=true&pixel_threshold=9",
                             files=files_of(test_images[:2])).json()["results"]
    expected = PaDiM.load(path, device="cpu").predict(test_images[:2], pixel_threshold=9)
    np.testing.assert_allclose([r["score"] for r in answer], expected.scores, rtol=1e-6)
    for result, reference_mask in zip(answer, expected.masks):
        heat = result["heatmap"]
        assert heat["covers"] == "crop" and (heat["overlay_width"], heat["overlay_height"]) == (48, 48)
        assert (result["width"], result["height"]) == (64, 64)  # the picture's own size
        np.testing.assert_array_equal(np.asarray(decode_png(heat["mask_png"]).convert("L")) > 0, reference_mask)


# ----------------------------------------------------------------------------------------- engines
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_exported_engine_serves_the_scores_of_predict_with_that_engine(served, test_images, engine, tmp_path,
                                                                          monkeypatch, capsys):
    """padim serve --engine X: the scores of padim predict --engine X on the same files (1e-5), a
    corrupt file an ``error`` entry, and /models and the answer name the engine."""
    pytest.importorskip(engine, reason="pip install '.[export,openvino]'")
    pytest.importorskip("onnxscript", reason="pip install '.[export]'")
    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path / "cache"))
    model_file = served / "tile.safetensors"
    images = test_images[:5]
    capsys.readouterr()
    assert main(["predict", "--model", str(model_file), "--engine", engine, *map(str, images)]) == 0
    offline = [line["score"] for line in map(json.loads, capsys.readouterr().out.splitlines())]
    models = load_models([model_file], device="cpu", engine=engine)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
    files.append(("files", ("broken.png", b"\x89PNG\r\n\x1a\n nope", "image/png")))
    with TestClient(create_app(models, ServeSettings())) as client:
        wait_ready(client)
        assert client.get("/models").json()[0]["engine"] == engine
        answer = client.post("/models/tile/predict", files=files).json()
    assert answer["engine"] == engine
    results = answer["results"]
    assert "error" in results[-1] and results[-1]["score"] is None
    assert [r["score"] for r in results[:-1]] == pytest.approx(offline, rel=1e-5)


def test_an_export_folder_is_served_by_its_engine(served, test_images, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="pip install '.[export]'")
    pytest.importorskip("onnxscript", reason="pip install '.[export]'")
    folder = tmp_path / "tile-onnx"
    assert main(["export", "--model", str(served / "tile.safetensors"), "--output", str(folder)]) == 0
    models = load_models([folder], device="cpu")
    reference_scores = reference(served, "tile").predict(test_images[:3]).scores
    with TestClient(create_app(models, ServeSettings())) as client:
        wait_ready(client)
        described = client.get("/models").json()[0]
        answer = client.post("/models/tile-onnx/predict",
                             files=[("files", (p.name, p.read_bytes(), "image/png")) for p in test_images[:3]]).json()
    assert described["engine"] == "onnxruntime" and described["name"] == "tile-onnx"
    np.testing.assert_allclose([r["score"] for r in answer["results"]], reference_scores, rtol=1e-4)
