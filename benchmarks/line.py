"""Issue 23's service targets, measured on a real ``padim serve`` on loopback: (a) model files
replaced under load: failed requests, and whether every answer names the version that scored it;
(b) the decision log after repeated ``kill -9`` under load: partial lines, lines that are not JSON,
acknowledged decisions missing. Counts, not timings.

    python benchmarks/line.py --data-root ../shared/datasets --category magnetic_tile \\
        --backbone efficientnet_lite0 --weights imagenet --image-size 128 --train-images 150 \\
        --swaps 5 --clients 8 --kills 20 --work /tmp/padim-line --json benchmarks/line.json

(a) fits ``--swaps + 1`` models (seeds 0, 1, ...: other channels, other scores) on a seeded subset of
train/good, serves the first from ``--models DIR`` (``--reload-interval 0.5``), and while
``--clients`` threads post one test image each in a loop, replaces the file ``--swaps`` times
(write beside it, then ``os.replace``, as a deploy does), each once the previous version answered.
Every answer's score is checked against ``PaDiM.load(that version).predict`` on the same file.
(b) starts the service with ``--log-decisions`` ``--kills`` times on one folder; each time the
clients post 2-image requests until ``--answers`` were answered, plus a random 0-1 s, then SIGKILL.
Before each restart the files are read raw (a partial line may end only the newest file: a batch
the kernel cut mid-write, never acknowledged); at the end, after the cut a restart makes, every line
must be JSON and every acknowledged request's lines present.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return json.loads(answer.read())


def post(port: int, files, model: str, timeout: float = 120.0):
    body = b"".join((f"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\r\n").encode()
                    + data + b"\r\n" for name, data in files) + b"--b--\r\n"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"/models/{model}/predict", body,
                           {"Content-Type": "multipart/form-data; boundary=b"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


class Service:
    def __init__(self, args, log: Path):
        self.port = free_port()
        with open(log, "ab") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "padim.cli", "serve", *map(str, args), "--port",
                                             str(self.port)], stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"padim serve exited with {self.process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("padim serve was not ready after 300 s")


class Clients:
    def __init__(self, port, files, n, model, per_request=1):
        self.answers, self.errors, self.stop_event = [], [], threading.Event()
        self.lock = threading.Lock()

        def work(k):
            i = k
            while not self.stop_event.is_set():
                chosen = [files[(i + j) % len(files)] for j in range(per_request)]
                i += n
                try:
                    status, body = post(port, chosen, model)
                    with self.lock:
                        self.answers.append((status, body, [name for name, _ in chosen]))
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    with self.lock:
                        self.errors.append(repr(exc))

        self.threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(300)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise SystemExit(f"not within {timeout} s: {what}")


def fit_versions(args, work: Path):
    from padim import PaDiM

    paths = sorted((Path(args.data_root) / args.category / "train" / "good").glob("*"))
    order = np.random.default_rng(0).permutation(len(paths))
    train = [paths[i] for i in order[:args.train_images]]
    versions = []
    for seed in range(args.swaps + 1):
        out = work / f"v{seed}.safetensors"
        if not out.exists():
            PaDiM(backbone=args.backbone, weights=args.weights, image_size=args.image_size, seed=seed,
                  device="cpu").fit(train).save(out)
            print(f"  fitted {out}", flush=True)
        versions.append(out)
    return versions


def swaps(args, work: Path, versions, files) -> dict:
    from padim import PaDiM

    images = [name for name, _ in files]
    reference = {}
    for v in versions:
        scores = PaDiM.load(v, device="cpu").predict([work / "images" / n for n in images]).scores
        reference[sha256(v)] = dict(zip(images, scores.tolist()))
    folder = work / "models"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    shutil.copy(versions[0], folder / "m.safetensors")
    service = Service(["--models", folder, "--reload-interval", "0.5"], work / "serve-swaps.log")
    clients = Clients(service.port, files, args.clients, "m")
    noticed = []
    try:
        for k in range(1, args.swaps + 1):
            before = len(clients.answers)
            wait_for(lambda: len(clients.answers) >= before + 2 * args.clients, 300, "answers before a swap")
            shutil.copy(versions[k], folder / ".m.safetensors.incoming")
            started = time.monotonic()
            os.replace(folder / ".m.safetensors.incoming", folder / "m.safetensors")
            wanted = sha256(versions[k])
            wait_for(lambda: get(service.port, "/models/m")["sha256"] == wanted, 300, f"swap {k}")
            noticed.append(round(time.monotonic() - started, 2))
            print(f"  swap {k}: serving {wanted[:12]} after {noticed[-1]} s", flush=True)
        last = sha256(versions[-1])
        wait_for(lambda: sum(b.get("model_sha256") == last for _, b, _ in list(clients.answers)) >= args.clients, 300,
                 "answers of the last version")
    finally:
        clients.stop()
        listed = get(service.port, "/models/m")
        service.process.terminate()
        service.process.wait(120)
    failed = [status for status, _, _ in clients.answers if status != 200]
    named, wrong = {}, 0
    for status, body, (name,) in clients.answers:
        if status != 200:
            continue
        sha = body.get("model_sha256")
        named[sha] = named.get(sha, 0) + 1
        expected = reference.get(sha, {}).get(name)
        if expected is None or abs(body["results"][0]["score"] - expected) > 1e-4 * abs(expected):
            wrong += 1
    return {"requests": len(clients.answers) + len(clients.errors), "failed": len(failed) + len(clients.errors),
            "errors": clients.errors[:5], "answers_per_version": [named.get(sha256(v), 0) for v in versions],
            "answers_naming_an_unknown_version": sum(n for s, n in named.items() if s not in reference),
            "scores_not_of_the_version_named": wrong, "seconds_from_replace_to_serving": noticed,
            "versions_listed": [(v["sha256"][:12], v["state"]) for v in listed["versions"]],
            "exit_status": service.process.returncode}


def kills(args, work: Path, model: Path, files) -> dict:
    from padim.monitor import DecisionLog

    log_dir = work / "log"
    shutil.rmtree(log_dir, ignore_errors=True)
    rng = random.Random(0)
    acknowledged, partial_before_restart, partial_not_newest = {}, 0, 0
    for k in range(args.kills):
        service = Service([model, "--log-decisions", log_dir, "--log-max-mb", "1"], work / "serve-kills.log")
        clients = Clients(service.port, files, args.clients, model.stem, per_request=2)
        wait_for(lambda: len(clients.answers) >= args.answers, 300, "answers before a kill")
        time.sleep(rng.random())
        service.process.kill()
        service.process.wait(60)
        clients.stop()
        for status, body, _ in clients.answers:
            if status == 200:
                acknowledged[body["request_id"]] = len(body["results"])
        logs = sorted(log_dir.glob("decisions-*.jsonl"))
        for i, path in enumerate(logs):
            tail = path.read_bytes().rsplit(b"\n", 1)[-1]
            if tail:
                partial_before_restart += 1
                partial_not_newest += i != len(logs) - 1
        print(f"  kill {k + 1}: {len(acknowledged)} requests acknowledged so far", flush=True)
    DecisionLog(log_dir).close()  # what the next start does
    lines = bad = partial = 0
    logged = {}
    for path in sorted(log_dir.glob("decisions-*.jsonl")):
        data = path.read_bytes()
        partial += bool(data) and not data.endswith(b"\n")
        for line in data.splitlines():
            lines += 1
            try:
                record = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
                logged[record["request_id"]] = logged.get(record["request_id"], 0) + 1
            except ValueError:
                bad += 1
    missing = sum(1 for rid, n in acknowledged.items() if logged.get(rid, 0) < n)
    return {"kills": args.kills, "lines": lines, "files": len(list(log_dir.glob("decisions-*.jsonl"))),
            "lines_not_json": bad, "partial_lines_after_restart": partial,
            "partial_tails_before_restart": partial_before_restart, "partial_tail_in_an_older_file": partial_not_newest,
            "acknowledged_requests": len(acknowledged), "acknowledged_requests_missing": missing}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/datasets")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=150)
    parser.add_argument("--images", type=int, default=16, help="test images the clients send")
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--answers", type=int, default=20, help="answers before each kill (then 0-1 s more)")
    parser.add_argument("--work", default="/tmp/padim-line")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work)
    (work / "images").mkdir(parents=True, exist_ok=True)
    test = sorted((Path(args.data_root) / args.category / "test").rglob("*.jpg"))
    chosen = [test[i] for i in np.random.default_rng(1).permutation(len(test))[:args.images]]
    files = []
    for i, path in enumerate(chosen):
        name = f"{i:02d}-{path.name}"
        shutil.copy(path, work / "images" / name)
        files.append((name, path.read_bytes()))
    print(f"fitting {args.swaps + 1} versions ({args.backbone}, {args.image_size} px, {args.train_images} images)")
    versions = fit_versions(args, work)
    out = {"load": {"loadavg_at_start": os.getloadavg()}}
    print(f"(a) {args.swaps} swaps under {args.clients} clients")
    out["swaps"] = swaps(args, work, versions, files)
    print(json.dumps(out["swaps"], indent=1))
    print(f"(b) {args.kills} x kill -9 under {args.clients} clients")
    out["kills"] = kills(args, work, versions[0], files)
    out["load"]["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(out["kills"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
