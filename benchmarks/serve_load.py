"""A bounded load test of ``padim serve`` on loopback, against offline ``padim predict``.

Starts ``padim serve MODEL`` on 127.0.0.1 (a free port), sends ``--clients`` concurrent clients x
``--requests`` requests of one image each (magnetic_tile test images, read into memory first), and
stops by itself. Reports requests/s, latency p50/p95/p99, errors, the mean backbone batch, and
served images/s over the images/s of ``padim predict --model MODEL`` on the same images on the same
machine (its rate between its first and its last batch, so start-up and model loading are left out
on both sides). Runs the service with micro-batching (``--max-batch``) and without (``--max-batch 1``).
The offline rate is measured before, between and after the two service runs, and each run is
compared with the mean of the offline runs on either side of it: on a machine shared with other
work, the speed drifts by minutes.

``--sigterm-after S`` also runs the service once more and sends it SIGTERM S seconds into the load:
every request it accepted must be answered (its own count, printed at exit), the others refused, and
it must exit 0.

    python benchmarks/serve_load.py --model tile.safetensors \
        --images ../shared/datasets/magnetic_tile/test --clients 8 --requests 50 --sigterm-after 5
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(name: str, data: bytes):
    boundary = "padimload"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Service:
    def __init__(self, model: Path, extra, log: Path):
        self.port = free_port()
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "padim.cli", "serve", str(model), "--port",
                                             str(self.port), *extra], stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"padim serve exited: {log.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    self.name = json.loads(self.get("/models")[1])[0]["name"]
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("padim serve was not ready after 300 s")

    def get(self, path):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
            return answer.status, answer.read().decode()
        finally:
            connection.close()

    def mean_batch(self) -> float:
        text = self.get("/metrics")[1]
        total = float(re.search(r"^padim_batch_size_sum\{[^}]*\} (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^padim_batch_size_count\{[^}]*\} (\S+)$", text, re.M).group(1))
        return total / count

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def load(port: int, name: str, images, clients: int, requests: int, new_connections: bool = False):
    """clients x requests POSTs of one image -> per-request records (status or error, latency s)."""
    records = [[] for _ in range(clients)]

    def client(k: int):
        connection = None
        for i in range(requests):
            path, data = images[(k * requests + i) % len(images)]
            body, headers = multipart(path.name, data)
            started = time.perf_counter()
            try:
                if connection is None or new_connections:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("POST", f"/models/{name}/predict", body, headers)
                answer = connection.getresponse()
                answer.read()
                outcome = answer.status
            except ConnectionRefusedError:
                outcome, connection = "refused", None
            except (OSError, http.client.HTTPException) as exc:  # reset or closed before any response byte
                outcome, connection = f"no response ({type(exc).__name__})", None
            records[k].append((outcome, time.perf_counter() - started))
            if new_connections and connection is not None:
                connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for rs in records for r in rs], time.perf_counter() - started


def summary(records, wall: float) -> dict:
    ok = [s for o, s in records if o == 200]
    latency = np.percentile(ok, [50, 95, 99]) * 1000 if ok else [float("nan")] * 3
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "p50_ms": latency[0], "p95_ms": latency[1], "p99_ms": latency[2]}


def offline_rate(model: Path, paths, batch_size: int) -> float:
    """images/s of ``padim predict`` between its first and last batch (start-up left out)."""
    process = subprocess.Popen([sys.executable, "-m", "padim.cli", "predict", "--model", str(model),
                                "--batch-size", str(batch_size), *map(str, paths)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, text=True)
    stamps = [time.perf_counter() for _ in process.stdout]
    if process.wait() != 0 or len(stamps) != len(paths):
        raise SystemExit("padim predict failed")
    return (len(paths) - batch_size) / (stamps[-1] - stamps[batch_size - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=8.0)
    parser.add_argument("--offline-batch-size", type=int, default=32, help="padim predict's --batch-size")
    parser.add_argument("--sigterm-after", type=float, default=None, help="also test SIGTERM this many s into a run")
    parser.add_argument("--log-dir", type=Path, default=Path("."), help="where the servers' stderr goes")
    args = parser.parse_args()

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    images = [(p, p.read_bytes()) for p in paths]
    n = args.clients * args.requests
    used = [images[i % len(images)][0] for i in range(n)]
    print(f"{n} requests ({args.clients} clients x {args.requests}) of single images from {args.images}, "
          f"{os.cpu_count()} CPUs")

    def offline_run() -> float:
        rate = offline_rate(args.model, used, args.offline_batch_size)
        print(f"offline padim predict: {rate:.1f} images/s (batch {args.offline_batch_size})", flush=True)
        return rate

    offline_rates = [offline_run()]
    rows = {}
    for label, extra in [("micro-batching", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]),
                         ("batching off", ["--max-batch", "1", "--max-wait-ms", "0"])]:
        service = Service(args.model, extra, args.log_dir / f"serve-{label.replace(' ', '-')}.log")
        load(service.port, service.name, images, args.clients, 2)  # warm the connections and caches
        records, wall = load(service.port, service.name, images, args.clients, args.requests)
        row = summary(records, wall)
        row["mean_batch"] = service.mean_batch()
        row["exit"] = service.stop()
        offline_rates.append(offline_run())
        offline = row["offline_images_per_s"] = float(np.mean(offline_rates[-2:]))
        row["served_over_offline"] = row["requests_per_s"] / offline
        rows[label] = row
        print(f"{label}: {row['requests_per_s']:.1f} requests/s = images/s, p50 {row['p50_ms']:.0f} ms, p95 "
              f"{row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, errors {row['errors']}, mean batch "
              f"{row['mean_batch']:.2f}, served/offline {row['served_over_offline']:.3f} (offline {offline:.1f} "
              f"images/s around it), exit {row['exit']}", flush=True)

    if args.sigterm_after is not None:
        service = Service(args.model, ["--max-batch", str(args.max_batch)], args.log_dir / "serve-sigterm.log")
        threading.Timer(args.sigterm_after, lambda: service.process.send_signal(signal.SIGTERM)).start()
        records, wall = load(service.port, service.name, images, args.clients, args.requests, new_connections=True)
        code = service.process.wait(120)
        outcomes = {}
        for outcome, _ in records:
            outcomes[str(outcome)] = outcomes.get(str(outcome), 0) + 1
        stopped = re.search(r"stopped: (\d+) of (\d+) accepted requests answered", service.log.read_text())
        print(f"SIGTERM after {args.sigterm_after} s: client outcomes {outcomes}; server: "
              f"{stopped.group(0) if stopped else 'no stop line'}; exit {code}")
        rows["sigterm"] = {"outcomes": outcomes, "exit": code, "server": stopped.group(0) if stopped else None}
    print(json.dumps({"offline_images_per_s": offline_rates, **rows}, default=float))


if __name__ == "__main__":
    main()
