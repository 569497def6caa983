"""padim serve as a real process on a line for months (issue 23): model files replaced under load
(every answer names the version that scored it, none fails), and the decision log after kill -9
under load (every line whole JSON, every acknowledged decision in it).

References: hashlib for the versions' SHA-256, ``PaDiM.load(version).predict`` for their scores, the
request ids the clients saw answered, and a strict JSON parser.
"""

import hashlib
import http.client
import json
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from conftest import FAST  # noqa: E402
from padim import PaDiM  # noqa: E402
from padim.monitor import DecisionLog  # noqa: E402
from serve_process import Server, get  # noqa: E402


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def post(port: int, files, model: str = "m", timeout: float = 60.0):
    """One multipart POST on its own connection -> (status, parsed body)."""
    boundary = "padimline"
    body = b"".join((f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                     "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n" for name, data in files)
    body += f"--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"/models/{model}/predict", body,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


class Clients:
    """``n`` threads posting ``files`` in turn until ``stop``; every answer or error is kept."""

    def __init__(self, port: int, files, n: int, per_request: int = 1, model: str = "m"):
        self.answers, self.errors, self._stop = [], [], threading.Event()
        self._lock = threading.Lock()

        def work(k):
            i = k
            while not self._stop.is_set():
                chosen = [files[(i + j) % len(files)] for j in range(per_request)]
                i += n
                try:
                    status, body = post(port, chosen, model)
                    with self._lock:
                        self.answers.append((status, body, [name for name, _ in chosen]))
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    with self._lock:
                        self.errors.append(exc)

        self.threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n)]
        for thread in self.threads:
            thread.start()

    def count(self) -> int:
        return len(self.answers)

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(120)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture(scope="module")
def versions(tmp_path_factory, synthetic_root):
    """Six fits of one category (seeds 0..5: other channels, other scores) and four test images."""
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    folder = tmp_path_factory.mktemp("versions")
    paths = []
    for seed in range(6):
        PaDiM(**FAST, seed=seed).fit(train).save(folder / f"v{seed}.safetensors")
        paths.append(folder / f"v{seed}.safetensors")
    images = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:4]
    files = [(f"{i}-{p.name}", p.read_bytes()) for i, p in enumerate(images)]
    scores = {sha256(p): dict(zip([name for name, _ in files], PaDiM.load(p, device="cpu").predict(images).scores))
              for p in paths}
    assert len(scores) == 6
    return paths, files, scores


def test_five_swaps_under_load_fail_no_request_and_every_answer_names_its_version(versions, tmp_path):
    paths, files, scores = versions
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.safetensors").write_bytes(paths[0].read_bytes())
    with Server(["--models", folder, "--reload-interval", "0.3", "--max-batch", "4", "--max-wait-ms", "5"],
                tmp_path) as server:
        clients = Clients(server.port, files, n=6)
        try:
            for k in range(1, 6):
                before = clients.count()
                wait_for(lambda: clients.count() >= before + 6, 60, "answers before the swap")
                (folder / ".m.safetensors.incoming.tmp").write_bytes(paths[k].read_bytes())
                os.replace(folder / ".m.safetensors.incoming.tmp", folder / "m.safetensors")  # atomic, as a deploy
                wanted = sha256(paths[k])
                wait_for(lambda: get(server.url + "/models/m")[1]["sha256"] == wanted, 120, f"swap {k}")
            named = lambda: sum(body.get("model_sha256") == wanted for _, body, _ in list(clients.answers))  # noqa: E731
            wait_for(lambda: named() >= 6, 60, "answers of the last version")
        finally:
            clients.stop()
        listed = get(server.url + "/models/m")[1]
        log = server.log()
        assert server.stop() == 0
    assert clients.errors == [] and clients.answers
    assert [status for status, _, _ in clients.answers] == [200] * len(clients.answers), \
        [body for status, body, _ in clients.answers if status != 200][:3]
    seen = set()
    for _, body, (name,) in clients.answers:
        sha = body["model_sha256"]
        seen.add(sha)
        assert body["results"][0]["score"] == pytest.approx(scores[sha][name], rel=1e-5), (sha[:12], name)
    assert seen == set(scores)  # all six versions answered, each with its own scores
    assert [v["sha256"] for v in listed["versions"]] == [sha256(p) for p in reversed(paths)]
    assert [v["state"] for v in listed["versions"]][0] == "serving"
    assert log.count("now serving version") == 5 and "refused" not in log


def test_the_decision_log_holds_whole_json_lines_after_kill_9_under_load(versions, tmp_path):
    paths, files, _ = versions
    log_dir = tmp_path / "log"
    acknowledged, torn_seen = {}, 0
    for _ in range(3):
        with Server([paths[0], "--log-decisions", log_dir, "--log-max-mb", "0.02", "--max-batch", "4"],
                    tmp_path) as server:
            clients = Clients(server.port, files, n=4, per_request=2, model="v0")
            start = clients.count()
            wait_for(lambda: clients.count() >= start + 15, 60, "answers before the kill")
            server.process.kill()  # SIGKILL: no handler runs, writes in progress are cut
            server.process.wait(30)
            clients.stop()
        assert {status for status, _, _ in clients.answers} == {200}
        for _, body, _ in clients.answers:
            acknowledged[body["request_id"]] = len(body["results"])
        # before any reopen: every line is JSON but perhaps the last of the newest file (a torn batch)
        logs = sorted(log_dir.glob("decisions-*.jsonl"))
        for i, path in enumerate(logs):
            data = path.read_bytes()
            lines = data.split(b"\n")
            whole, tail = lines[:-1], lines[-1]
            for line in whole:
                json.loads(line)
            if tail:
                assert i == len(logs) - 1, f"{path.name} ends in a partial line but is not the newest file"
                torn_seen += 1
    DecisionLog(log_dir).close()  # what the next start does: cuts a torn tail
    records = []
    for path in sorted(log_dir.glob("decisions-*.jsonl")):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n")
        records += [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the log"))
                    for line in data.splitlines()]
    assert len(sorted(log_dir.glob("decisions-*.jsonl"))) > 1  # rotated across the kills
    logged = {}
    for record in records:
        logged[record["request_id"]] = logged.get(record["request_id"], 0) + 1
    missing = [rid for rid, n in acknowledged.items() if logged.get(rid) != n]
    assert len(acknowledged) >= 45 and missing == []  # every answered decision was on disk first
    assert all(set(r) >= {"time", "request_id", "model", "sha256", "engine", "file", "bytes", "score", "p_value",
                          "threshold", "threshold_source", "label", "drift_log10"} for r in records)
    assert {r["sha256"] for r in records} == {sha256(paths[0])}
    print(f"{len(records)} lines, {torn_seen} torn tails cut, {len(acknowledged)} acknowledged requests")
