"""``padim serve`` as a real process: the README's command starts it, and SIGTERM stops it without
losing a request it accepted."""

import http.client
import io
import re
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("python_multipart", reason="the serve extra is not installed")

from conftest import FAST  # noqa: E402
from padim import PaDiM  # noqa: E402
from serve_process import Server, get  # noqa: E402


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, synthetic_root):
    path = tmp_path_factory.mktemp("model") / "fabric.safetensors"
    PaDiM(**FAST).fit(sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))).save(path)
    return path


def post_image(port: int, data: bytes, timeout: float = 60.0):
    """One multipart POST on its own connection -> (status, body)."""
    boundary = "padimtest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/models/fabric/predict", body,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def in_flight(url: str) -> int:
    """Requests in flight, not counting the /metrics request asking."""
    text = get(url + "/metrics")[1]
    return int(float(re.search(r"^padim_requests_in_flight (\S+)$", text, re.M).group(1))) - 1


def test_sigterm_answers_every_accepted_request_and_exits_0(model_file, tmp_path):
    # A batch waits up to 3 s for more images: requests stay in flight long enough to be killed mid-way.
    server = Server([model_file, "--max-wait-ms", "3000", "--max-batch", "64"], tmp_path)
    with server:
        assert get(server.url + "/models")[1][0]["name"] == "fabric"
        answers, errors = [], []

        def client(seed):
            try:
                answers.append(post_image(server.port, png_bytes(seed)))
            except OSError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while in_flight(server.url) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(server.url) == 6  # all six accepted and waiting for their batch
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None  # still finishing the accepted requests ...
        with pytest.raises(ConnectionRefusedError):  # ... while refusing new connections
            post_image(server.port, png_bytes(99), timeout=5)
        for t in threads:
            t.join(60)
        assert server.process.wait(60) == 0
    assert errors == []
    assert [status for status, _ in answers] == [200] * 6
    answered, accepted = map(int, re.search(r"stopped: (\d+) of (\d+) accepted requests answered", server.log()).groups())
    assert answered == accepted >= 6 + 2  # the server's own count: nothing it accepted went unanswered


def test_readme_command_serves_health_models_page_and_docs(model_file, tmp_path):
    with Server([model_file], tmp_path) as server:
        status, health = get(server.url + "/health")
        assert status == 200 and health["status"] == "ready" and health["models"] == ["fabric"]
        assert get(server.url + "/models")[0] == 200
        assert get(server.url + "/docs")[0] == 200
        status, page = get(server.url + "/")
        assert status == 200 and "<title>padim inspection</title>" in page
        status, body = post_image(server.port, png_bytes(0))
        assert status == 200 and b'"score"' in body
        assert server.stop() == 0
    assert "ready: fabric on http://127.0.0.1" in server.log()
