"""A bounded load test of ``padim serve`` on loopback, against offline ``padim predict``.

Starts ``padim serve MODEL`` on 127.0.0.1 (a free port), sends ``--clients`` concurrent clients x
``--requests`` requests of one image each (magnetic_tile test images, read into memory first), and
stops by itself. Reports requests/s, latency p50/p95/p99, errors, the mean backbone batch, and
served images/s over the images/s of ``padim predict --model MODEL`` on the same images on the same
machine (its rate between its first and its last batch, so start-up and model loading are left out
on both sides). Runs the service with micro-batching (``--max-batch``) and without (``--max-batch 1``).
Both services stay up and the work is split in ``--rounds`` rounds of (offline, batched, unbatched)
on the same images: on a machine shared with other work the speed drifts by minutes, so each
round's served rate is compared with that round's offline rate, and the median ratio is reported.

``--sigterm-after S`` also runs the service once more and sends it SIGTERM S seconds into the load:
every request it accepted must be answered (its own count, printed at exit), the others refused, and
it must exit 0.

    python benchmarks/serve_load.py --model tile.safetensors \
        --images ../shared/datasets/magnetic_tile/test --clients 8 --requests 50 --rounds 5 --sigterm-after 5
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
    parser.add_argument("--requests", type=int, default=50, help="per client, over all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of offline, batched and unbatched runs")
    parser.add_argument("--offline-images", type=int, default=128, help="images per offline padim predict run")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=8.0)
    parser.add_argument("--offline-batch-size", type=int, default=32, help="padim predict's --batch-size")
    parser.add_argument("--sigterm-after", type=float, default=None, help="also test SIGTERM this many s into a run")
    parser.add_argument("--log-dir", type=Path, default=Path("."), help="where the servers' stderr goes")
    args = parser.parse_args()

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    images = [(p, p.read_bytes()) for p in paths]
    per_round = args.requests // args.rounds
    print(f"{args.clients} clients x {per_round * args.rounds} requests of single images from {args.images} in "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs", flush=True)
    modes = {"micro-batching": ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)],
             "batching off": ["--max-batch", "1", "--max-wait-ms", "0"]}
    services = {label: Service(args.model, extra, args.log_dir / f"serve-{label.replace(' ', '-')}.log")
                for label, extra in modes.items()}
    for service in services.values():
        load(service.port, service.name, images, args.clients, 2)  # warm the connections and caches
    records = {label: [] for label in modes}
    walls = {label: 0.0 for label in modes}
    ratios = {label: [] for label in modes}
    offline_rates = []
    for r in range(args.rounds):
        # each round: offline, then both services, on the same images (the machine's speed drifts)
        offset = r * args.clients * per_round
        used = [images[(offset + i) % len(images)][0] for i in range(args.offline_images)]
        offline_rates.append(offline_rate(args.model, used, args.offline_batch_size))
        line = f"round {r + 1}: offline {offline_rates[-1]:.1f} images/s"
        for label, service in services.items():
            batch, wall = load(service.port, service.name, images[offset:] + images[:offset], args.clients, per_round)
            records[label] += batch
            walls[label] += wall
            rate = sum(1 for outcome, _ in batch if outcome == 200) / wall
            ratios[label].append(rate / offline_rates[-1])
            line += f", {label} {rate:.1f} ({ratios[label][-1]:.2f}x)"
        print(line, flush=True)
    rows = {"offline_images_per_s": offline_rates}
    for label, service in services.items():
        row = summary(records[label], walls[label])
        row["mean_batch"] = service.mean_batch()
        row["served_over_offline_median"] = float(np.median(ratios[label]))
        row["served_over_offline_rounds"] = ratios[label]
        row["exit"] = service.stop()
        rows[label] = row
        print(f"{label}: {row['requests_per_s']:.1f} requests/s = images/s, p50 {row['p50_ms']:.0f} ms, p95 "
              f"{row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, errors {row['errors']}, mean batch "
              f"{row['mean_batch']:.2f}, served/offline median {row['served_over_offline_median']:.3f} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios[label])}), exit {row['exit']}", flush=True)
    print(f"offline padim predict: median {np.median(offline_rates):.1f} images/s (rounds: "
          f"{', '.join(f'{x:.1f}' for x in offline_rates)})")

    if args.sigterm_after is not None:
        service = Service(args.model, modes["micro-batching"], args.log_dir / "serve-sigterm.log")
        threading.Timer(args.sigterm_after, lambda: service.process.send_signal(signal.SIGTERM)).start()
        batch, _ = load(service.port, service.name, images, args.clients, args.requests, new_connections=True)
        code = service.process.wait(120)
        outcomes = {}
        for outcome, _ in batch:
            outcomes[str(outcome)] = outcomes.get(str(outcome), 0) + 1
        stopped = re.search(r"stopped: (\d+) of (\d+) accepted requests answered", service.log.read_text())
        print(f"SIGTERM after {args.sigterm_after} s: client outcomes {outcomes}; server: "
              f"{stopped.group(0) if stopped else 'no stop line'}; exit {code}")
        rows["sigterm"] = {"outcomes": outcomes, "exit": code, "server": stopped.group(0) if stopped else None}
    print(json.dumps(rows, default=float))


if __name__ == "__main__":
    main()
