"""What a server takes in, checked before any work: the API key before any body is read and bodies
bounded on every route; model files changed on disk become a new version or a refusal, never a
change under a served SHA-256 and never a crash.

References: hashlib for SHA-256, ``PaDiM.load(pristine copy).predict`` and scores answered before a
file changed, and the bytes the test itself sends (counted as the app pulls them, through httpx's
ASGI transport: FastAPI's TestClient reads a streamed body whole before the app runs).
"""

import asyncio
import hashlib
import logging
import os
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
httpx = pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("python_multipart", reason="the serve extra is not installed")

from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import FAST  # noqa: E402
from padim import PaDiM  # noqa: E402
from padim.serve import ServeSettings, create_app, load_models  # noqa: E402
from padim.serve.registry import open_model  # noqa: E402
from padim.serve.routes_admin import FEEDBACK_MAX_BYTES  # noqa: E402
from padim.serve.versions import ModelSource  # noqa: E402

KEY = {"Authorization": "Bearer k"}
CHUNK = 1 << 20
OPEN_ROUTES = {"/", "/health"}  # no key by design; they take no body either


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def images(synthetic_root):
    return sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:3]


@pytest.fixture(scope="module")
def fits(synthetic_root, tmp_path_factory):
    """Two model files of one configuration, fitted with different seeds."""
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    folder = tmp_path_factory.mktemp("fits")
    for seed in (0, 1):
        PaDiM(**FAST, seed=seed).fit(train).save(folder / f"v{seed}.safetensors")
    return folder / "v0.safetensors", folder / "v1.safetensors"


@pytest.fixture
def logged():
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def wait_ready(client):
    for _ in range(3000):
        if client.get("/health").status_code == 200:
            return
        threading.Event().wait(0.02)
    raise AssertionError("not ready")


# ----------------------------------------------------------------------------------------- bodies
def test_every_route_checks_the_key_before_reading_any_body(fits):
    """200 MB sent unauthenticated to every route: 401 (the open routes: their answer), and the app
    pulls nothing of the body (a route that parsed first would read it all)."""
    app = create_app(load_models([fits[0]], device="cpu"), ServeSettings(api_key="k", reload_interval=0))
    routes = [(method, route.path.replace("{name}", "v0")) for route in app.routes if isinstance(route, APIRoute)
              for method in sorted(route.methods)]
    assert ("POST", "/models/v0/feedback") in routes and ("POST", "/models/v0/predict") in routes

    async def send(method, path):
        pulled = {"bytes": 0}

        async def body():
            for _ in range(200):
                pulled["bytes"] += CHUNK
                yield b"{" * CHUNK

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            answer = await client.request(method, path, content=body(), headers={"content-type": "application/json"})
        return answer.status_code, pulled["bytes"]

    for method, path in routes:
        status, pulled = asyncio.run(send(method, path))
        if path not in OPEN_ROUTES:
            assert status == 401, (method, path, status)
        assert pulled <= CHUNK, (method, path, pulled)  # at most what the transport had ready


def test_feedback_bodies_are_bounded_and_checked(fits):
    app = create_app(load_models([fits[0]], device="cpu"), ServeSettings(api_key="k", reload_interval=0))
    big = b'{"request_id": "' + b"x" * (2 * FEEDBACK_MAX_BYTES) + b'", "index": 0, "truth": "good"}'
    with TestClient(app) as client:
        wait_ready(client)
        declared = client.post("/models/v0/feedback", content=big, headers={**KEY, "content-type": "application/json"})
        assert declared.status_code == 413 and f"{FEEDBACK_MAX_BYTES} bytes" in declared.json()["detail"]
        streamed = client.post("/models/v0/feedback", content=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]),
                               headers={**KEY, "content-type": "application/json"})  # no Content-Length
        assert streamed.status_code == 413
        unauthenticated = client.post("/models/v0/feedback", content=big)
        assert unauthenticated.status_code == 401
        broken = client.post("/models/v0/feedback", content=b'{"request_id": ', headers=KEY)
        assert broken.status_code == 422 and "body" in broken.json()["detail"]
        wrong = client.post("/models/v0/feedback", json={"request_id": "r", "index": -1, "truth": "maybe"},
                            headers=KEY)
        assert wrong.status_code == 422
        assert "body.index" in wrong.json()["detail"] and "body.truth" in wrong.json()["detail"]
        unknown = client.post("/models/v0/feedback", json={"request_id": "nope", "index": 0, "truth": "good"},
                              headers=KEY)
        assert unknown.status_code == 404 and "unknown request_id" in unknown.json()["detail"]
        no_model = client.post("/models/nope/feedback", json={"request_id": "r", "index": 0, "truth": "good"},
                               headers=KEY)
        assert no_model.status_code == 404
        schema = client.get("/openapi.json").json()["paths"]["/models/{name}/feedback"]["post"]["requestBody"]
        assert set(schema["content"]["application/json"]["schema"]["properties"]) == {"request_id", "index", "truth"}


# ----------------------------------------------------------------------------------------- model files
def scores_of(entry, images):
    from padim.files.images import load_pixels

    pixels = np.stack([load_pixels(p, entry.model.config_)[0] for p in images])
    return entry.model.score_pixels(pixels)[0]


def test_a_served_version_never_changes_under_its_sha256(fits, images, tmp_path):
    first, second = fits
    path = tmp_path / "m.safetensors"
    shutil.copy(first, path)
    entry = open_model(path, device="cpu")
    assert entry.sha256 == sha256(first.read_bytes())
    before = scores_of(entry, images)
    np.testing.assert_allclose(before, PaDiM.load(first, device="cpu").predict(images).scores, rtol=1e-6)
    with open(path, "r+b") as handle:  # another model written in place
        handle.write(second.read_bytes())
        handle.truncate()
    np.testing.assert_array_equal(scores_of(entry, images), before)
    os.truncate(path, 1000)
    np.testing.assert_array_equal(scores_of(entry, images), before)
    assert entry.sha256 == sha256(first.read_bytes())


def test_a_file_changed_in_place_is_a_new_version_or_a_refusal(fits, images, tmp_path, logged):
    first, second = fits
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "m.safetensors"
    shutil.copy(first, path)
    expected = {sha256(p.read_bytes()): PaDiM.load(p, device="cpu").predict(images).scores for p in fits}
    source = ModelSource(folder=folder, device="cpu")

    def answer(client):
        body = client.post("/models/m/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in images])
        assert body.status_code == 200, body.json()
        return body.json()["model_sha256"], np.array([r["score"] for r in body.json()["results"]], dtype=np.float32)

    def write_in_place(data: bytes):
        with open(path, "r+b") as handle:
            handle.write(data)
            handle.truncate()

    garbage = bytearray(second.read_bytes())
    garbage[len(garbage) // 2:] = b"\xff" * (len(garbage) - len(garbage) // 2)  # NaN where tensors were
    with TestClient(create_app(load_models([path], device="cpu"), ServeSettings(reload_interval=0),
                               source=source)) as client:
        wait_ready(client)
        old, before = answer(client)
        assert old == sha256(first.read_bytes())
        np.testing.assert_allclose(before, expected[old], rtol=1e-5)
        for damage, words in ((bytes(garbage), "checksum"), (second.read_bytes()[:5000], "truncated")):
            write_in_place(damage)
            summary = client.post("/admin/reload").json()
            assert [r["name"] for r in summary["refused"]] == ["m"] and words in summary["refused"][0]["error"]
            got_sha, got = answer(client)
            assert got_sha == old
            np.testing.assert_array_equal(got, before)
        refusals = [line for line in logged if "refused" in line]
        assert len(refusals) == 2 and all("\n" not in line and "keeps serving" in line for line in refusals)
        write_in_place(second.read_bytes())  # a whole new model, written in place: a new version
        summary = client.post("/admin/reload").json()
        new = sha256(second.read_bytes())
        assert [r["sha256"] for r in summary["loaded"]] == [new]
        got_sha, got = answer(client)
        assert got_sha == new
        np.testing.assert_allclose(got, expected[new], rtol=1e-5)
        os.truncate(path, 0)  # truncated under the version serving: refused, still served, no SIGBUS
        assert client.post("/admin/reload").json()["refused"][0]["name"] == "m"
        still_sha, still = answer(client)
        assert still_sha == new
        np.testing.assert_array_equal(still, got)
