"""Fit on Ray vs local fit: wall time and peak memory per process (``benchmarks/scale.py fit``).

Each run is a fresh ``padim fit`` process (under /usr/bin/time for the driver's peak RSS); Ray runs get
a fresh loopback cluster each (tests/ray_cluster.py), whose processes are sampled every 0.2 s for
their resident memory, so the workers' peaks are this run's. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from ray_cluster import LocalCluster, loopback_env  # noqa: E402


def _rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else 0.0


def _kind(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    if "default_worker.py" in cmdline or comm.startswith("ray::"):
        return "worker"
    return comm


class Sampler(threading.Thread):
    """Largest resident memory seen per Ray process (worker processes only) while running."""

    def __init__(self, cluster: LocalCluster):
        super().__init__(daemon=True)
        self.cluster, self.peaks, self.running = cluster, {}, True

    def run(self):
        # Workers rename themselves (ray::...), so their command lines no longer name the cluster's folder:
        # every Ray worker of the machine is sampled (benchmarks run with no other cluster).
        while self.running:
            for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
                if _kind(pid) == "worker":
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), _rss_mb(pid))
            time.sleep(0.2)


def _timed_fit(argv, env) -> tuple:
    """-> (seconds, driver peak RSS MB, stderr) of one ``padim fit`` process."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "padim.cli", *argv], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return seconds, peak, done.stderr


def measure_fit(data_root: Path, category: str, image_size: int, repeats: int, shards: int, out: Path) -> dict:
    common = ["fit", "--data-root", str(data_root), "--category", category, "--backbone", "efficientnet_lite0",
              "--image-size", str(image_size), "--device", "cpu"]
    env = {**loopback_env(), "PYTHONPATH": str(HERE.parent)}
    local, ray_runs = [], []
    for repeat in range(repeats):
        seconds, peak, _ = _timed_fit([*common, "--output", str(out / f"local{repeat}.safetensors")], env)
        local.append((seconds, peak))
        print(f"local fit {repeat}: {seconds:.1f} s, peak {peak:.0f} MB", file=sys.stderr)
        cluster = LocalCluster(num_cpus=2)
        sampler = Sampler(cluster)
        sampler.start()
        try:
            seconds, peak, log = _timed_fit([*common, "--output", str(out / f"ray{repeat}.safetensors"),
                                             "--ray", cluster.address, "--shards", str(shards)], env)
        finally:
            sampler.running = False
            sampler.join()
            cluster.stop()
        statistics_s = [float(m) for m in re.findall(r"statistics done \((\d+\.\d+) s\)", log)]
        factored_s = [float(m) for m in re.findall(r"\((\d+\.\d+) s in all\)", log)]
        phases = {"statistics": statistics_s[0] if statistics_s else None,
                  "factored": factored_s[0] if factored_s else None}
        worker_peak = max(sampler.peaks.values(), default=0.0)
        ray_runs.append((seconds, peak, worker_peak, phases.get("statistics"), phases.get("factored")))
        print(f"ray fit {repeat}: {seconds:.1f} s, driver peak {peak:.0f} MB, worker peak {worker_peak:.0f} MB, "
              f"phases {phases}", file=sys.stderr)
    n_images = len(list((data_root / category / "train" / "good").iterdir()))
    med = lambda values: statistics.median(values)  # noqa: E731
    return {"n_train_files": n_images, "image_size": image_size, "shards": shards, "repeats": repeats,
            "local_s": med([r[0] for r in local]), "local_peak_mb": med([r[1] for r in local]),
            "ray_s": med([r[0] for r in ray_runs]), "ray_driver_peak_mb": med([r[1] for r in ray_runs]),
            "ray_worker_peak_mb": med([r[2] for r in ray_runs]),
            "ray_statistics_s": med([r[3] for r in ray_runs if r[3] is not None] or [float("nan")]),
            "ray_merge_factor_s": med([r[4] for r in ray_runs if r[4] is not None] or [float("nan")])}


def fit_table(result: dict) -> str:
    r = result
    return "\n".join([
        f"magnetic_tile train/good ({r['n_train_files']} files, 10% held out for calibration), efficientnet_lite0, "
        f"{r['image_size']} px, 2 CPUs; medians of {r['repeats']} runs",
        "",
        "| fit | wall s | driver peak MB | worker peak MB |",
        "|---|---|---|---|",
        f"| local `padim fit` (2 threads) | {r['local_s']:.1f} | {r['local_peak_mb']:.0f} | - |",
        f"| `padim fit --ray` ({r['shards']} shards, 2 workers) | {r['ray_s']:.1f} | {r['ray_driver_peak_mb']:.0f} "
        f"| {r['ray_worker_peak_mb']:.0f} |",
        "",
        f"Ray phases (medians): shard statistics done at {r['ray_statistics_s']:.1f} s, merged and factored at "
        f"{r['ray_merge_factor_s']:.1f} s after the shards started.",
    ])
