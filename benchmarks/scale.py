"""Scaling padim out on Ray: batch scoring (``score``) and the distributed fit (``fit``).

    pip install ".[ray]"
    python benchmarks/scale.py score                      # 2,000 generated images, throughput table
    python benchmarks/scale.py score --images 10000 --memory   # one run, memory sampled every second
    python benchmarks/scale.py fit                        # magnetic_tile: padim fit --ray vs padim fit
                                                          # (see benchmarks/scale_fit.py)

Both start their own Ray cluster on 127.0.0.1 (tests/ray_cluster.py: --cpus CPUs, no dashboard, no
usage report) and stop it at the end. ``score`` generates --images pictures (smooth random textures,
--size px JPEGs), fits a small model on 40 others (--backbone, --weights, --image-size), then runs
each command as a user would, as a subprocess, --repeats times, alternating:

- local: ``padim predict`` pinned to one core with one torch thread (the single-threaded reference);
- local, all cores: ``padim predict`` as it runs by default;
- Ray, 1 actor / 2 actors: ``padim predict --ray ADDRESS --actors K --actor-threads 1`` into a fresh
  Parquet folder each time.

Figures (medians): end to end (the command's wall time, start-up and model loading included) and
steady (images/s between the command's first and last output: JSON lines for local predict, the
progress lines of Parquet parts for Ray; start-up left out on both sides). Ray's overhead per image
= (Ray 1-actor time - local single-thread time) / N, end to end and steady. The target: 2 actors
>= 1.7 x 1 actor (steady).

``--memory``: instead, one Ray run on every CPU of the cluster with the driver's and each actor's
resident memory (VmRSS from /proc) sampled every second, printed against the rows written: flat
memory means the last samples are no higher than those after the first parts.
The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # ray_cluster: the loopback cluster of the tests
sys.path.insert(0, str(ROOT / "benchmarks"))  # scale_fit

from ray_cluster import LocalCluster, loopback_env  # noqa: E402

FIT_IMAGES = 40


# ----------------------------------------------------------------------------------------- data
def generate(folder: Path, n: int, size: int, seed: int) -> List[Path]:
    """n smooth random pictures (size x size JPEGs): coarse noise upsampled, as the tests draw them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def fit_model(work: Path, args) -> Path:
    from padim import PaDiM

    model_file = work / "model.safetensors"
    if not model_file.exists():
        train = generate(work / "train", FIT_IMAGES, args.size, seed=1)
        PaDiM(backbone=args.backbone, weights=args.weights, image_size=args.image_size, device="cpu",
              calibration_fraction=0.0).fit(train).save(model_file)
    return model_file


# ----------------------------------------------------------------------------------------- runs
class Run:
    """A command's wall time and the times of its output lines that mark progress."""

    def __init__(self, command: List[str], env: dict, count, cpu: Optional[int] = None, sample=None):
        self.marks: List[tuple] = []  # (seconds since start, images done)
        started = time.perf_counter()
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=preexec)
        errors: List[str] = []
        reader = threading.Thread(target=lambda: errors.extend(self._read(process.stderr, count, started)))
        reader.start()
        stop = threading.Event()
        sampler = None
        if sample is not None:
            sampler = threading.Thread(target=sample, args=(process.pid, stop, self))
            sampler.start()
        out = self._read(process.stdout, count, started)
        process.wait()
        self.seconds = time.perf_counter() - started
        stop.set()
        reader.join()
        if sampler is not None:
            sampler.join()
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command[:6])} ... failed ({process.returncode}):\n" + "".join(errors[-20:]))
        self.stdout = out

    def _read(self, stream, count, started) -> List[str]:
        lines = []
        for line in stream:
            done = count(line)
            if done is not None:
                self.marks.append((time.perf_counter() - started, done))
            lines.append(line)
        return lines

    def steady(self) -> Optional[float]:
        """Images/s between the first and the last progress mark."""
        if len(self.marks) < 2 or self.marks[-1][0] <= self.marks[0][0]:
            return None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def json_lines():
    """Counts ``padim predict``'s JSON lines (one per image)."""
    seen = 0

    def count(line: str):
        nonlocal seen
        if line.startswith("{"):
            seen += 1
            return seen
        return None

    return count


def progress_lines(line: str):
    """``padim predict --ray``'s progress: 'DONE/TOTAL images (E errors)'."""
    head = line.split(" ", 1)[0]
    if "/" in head and line.rstrip().endswith("errors)"):
        return int(head.split("/")[0])
    return None


def predict_command(model_file: Path, folder: Path, batch_size: int) -> List[str]:
    return [sys.executable, "-m", "padim", "predict", "--model", str(model_file), "--batch-size", str(batch_size),
            "--device", "cpu", str(folder)]


def local_env(threads: Optional[int]) -> dict:
    env = loopback_env()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# ----------------------------------------------------------------------------------------- memory
def _rss_kb(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _children() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _actors(cluster: LocalCluster) -> List[int]:
    """The cluster's scoring actors: processes below its raylet whose title names the Scorer."""
    tree, found, todo = _children(), [], list(cluster.processes())
    while todo:
        pid = todo.pop()
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "Scorer" in title:
            found.append(pid)
        todo += tree.get(pid, [])
    return sorted(set(found))


def sampler(cluster: LocalCluster, output: Path, samples: List[dict]):
    def sample(driver: int, stop: threading.Event, run: Run) -> None:
        import pyarrow.parquet as pq

        started = time.perf_counter()
        while not stop.wait(1.0):
            rows = 0
            for part in sorted(output.glob("part-*.parquet")):
                try:
                    rows += pq.ParquetFile(part).metadata.num_rows
                except Exception:
                    pass
            actors = {pid: _rss_kb(pid) for pid in _actors(cluster)}
            samples.append({"s": round(time.perf_counter() - started, 1), "rows": rows,
                            "driver_mb": (_rss_kb(driver) or 0) / 1024,
                            "actors_mb": [round(kb / 1024, 1) for kb in actors.values() if kb]})
    return sample


# ----------------------------------------------------------------------------------------- commands
def score(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="padim-scale-"))
    print(f"work folder {work}: generating {args.images} images of {args.size} px ...", file=sys.stderr)
    folder = work / f"images-{args.images}"
    generate(folder, args.images, args.size, seed=0)
    model_file = fit_model(work, args)
    cluster = LocalCluster(num_cpus=args.cpus)
    try:
        if args.memory:
            result = memory_run(cluster, model_file, folder, work, args)
        else:
            result = throughput(cluster, model_file, folder, work, args)
    finally:
        cluster.stop()
    print(json.dumps(result))


def ray_command(model_file, folder, output, address, actors, batch_size) -> List[str]:
    return [sys.executable, "-m", "padim", "predict", "--model", str(model_file), "--batch-size", str(batch_size),
            "--ray", address, "--actors", str(actors), "--actor-threads", "1", "--output", str(output), str(folder)]


def throughput(cluster: LocalCluster, model_file: Path, folder: Path, work: Path, args) -> dict:
    n = args.images
    runs: Dict[str, List[Run]] = {"local, 1 core": [], "local, all cores": [], "Ray, 1 actor": [], "Ray, 2 actors": []}
    for repeat in range(args.repeats):
        for name in runs:
            if name.startswith("local"):
                one = name == "local, 1 core"
                run = Run(predict_command(model_file, folder, args.batch_size), local_env(1 if one else None),
                          json_lines(), cpu=min(os.sched_getaffinity(0)) if one else None)
            else:
                actors = 1 if "1 actor" in name else 2
                output = work / f"results-{actors}-{repeat}.parquet"
                run = Run(ray_command(model_file, folder, output, cluster.address, actors, args.batch_size),
                          local_env(None), progress_lines)
            runs[name].append(run)
            print(f"{name}, run {repeat + 1}: {run.seconds:.1f} s", file=sys.stderr)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    table = {name: {"seconds": median([r.seconds for r in rs]), "steady": median([r.steady() for r in rs])}
             for name, rs in runs.items()}
    one, two, local = table["Ray, 1 actor"], table["Ray, 2 actors"], table["local, 1 core"]
    print(f"\n{n} images ({args.size} px) -> {args.backbone} ({args.weights}) at {args.image_size} px, batch "
          f"{args.batch_size}; medians of {args.repeats}\n")
    print("| run | end to end s | images/s end to end | images/s steady | x Ray 1 actor (steady) |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        ratio = "" if not (row["steady"] and one["steady"]) else f"{row['steady'] / one['steady']:.2f}"
        steady = "n/a" if row["steady"] is None else f"{row['steady']:.1f}"
        print(f"| {name} | {row['seconds']:.1f} | {n / row['seconds']:.1f} | {steady} | {ratio} |")
    overhead = (one["seconds"] - local["seconds"]) / n * 1000
    steady_overhead = None
    if one["steady"] and local["steady"]:
        steady_overhead = (1 / one["steady"] - 1 / local["steady"]) * 1000
    speedup = two["steady"] / one["steady"] if two["steady"] and one["steady"] else None
    print(f"\nRay's overhead per image over local single-threaded predict: {overhead:.2f} ms end to end "
          f"(start-up of the cluster connection and actors included)"
          + ("" if steady_overhead is None else f", {steady_overhead:.2f} ms steady"))
    if speedup is not None:
        print(f"2 actors / 1 actor (steady): {speedup:.2f}x (target >= 1.7x): {'met' if speedup >= 1.7 else 'NOT met'}")
    return {"images": n, "table": table, "overhead_ms_per_image": overhead,
            "steady_overhead_ms_per_image": steady_overhead, "speedup_2_over_1": speedup}


def memory_run(cluster: LocalCluster, model_file: Path, folder: Path, work: Path, args) -> dict:
    output = work / f"results-memory-{args.images}.parquet"
    samples: List[dict] = []
    run = Run(ray_command(model_file, folder, output, cluster.address, args.cpus, args.batch_size), local_env(None),
              progress_lines, sample=sampler(cluster, output, samples))
    print(f"\n{args.images} images on {args.cpus} actor(s): {run.seconds:.1f} s end to end, "
          f"{run.steady() or 0:.1f} images/s steady\n")
    print("| s | rows written | driver RSS MB | actors RSS MB |")
    print("|---|---|---|---|")
    step = max(1, len(samples) // 20)
    for sample in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        print(f"| {sample['s']} | {sample['rows']} | {sample['driver_mb']:.0f} | "
              f"{', '.join(f'{mb:.0f}' for mb in sample['actors_mb'])} |")
    peak_driver = max((s["driver_mb"] for s in samples), default=0.0)
    peak_actor = max((max(s["actors_mb"]) for s in samples if s["actors_mb"]), default=0.0)
    settled = [s for s in samples if s["rows"] >= 0.1 * args.images]  # after the first parts
    growth = None
    if len(settled) >= 2:
        first, last = settled[0], settled[-1]
        growth = {"driver_mb": last["driver_mb"] - first["driver_mb"],
                  "actor_mb": (max(last["actors_mb"], default=0) - max(first["actors_mb"], default=0))}
    print(f"\npeak RSS: driver {peak_driver:.0f} MB, largest actor {peak_actor:.0f} MB; from 10 % of the rows to "
          f"the end: {growth}")
    return {"images": args.images, "seconds": run.seconds, "steady": run.steady(), "peak_driver_mb": peak_driver,
            "peak_actor_mb": peak_actor, "growth_after_10_percent": growth, "samples": samples}


def fit(args) -> None:
    """``padim fit --ray`` (fresh loopback cluster per run) vs ``padim fit`` on a real category."""
    from scale_fit import fit_table, measure_fit

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="padim-scale-fit-"))
    work.mkdir(parents=True, exist_ok=True)
    result = measure_fit(Path(args.data_root), args.category, args.image_size, args.repeats, args.shards, work)
    print(fit_table(result))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("score", help="Ray Data batch scoring vs local padim predict")
    run.add_argument("--images", type=int, default=2000, help="generated images to score (default: 2000)")
    run.add_argument("--size", type=int, default=256, help="their side in pixels (default: 256)")
    run.add_argument("--backbone", default="resnet18")
    run.add_argument("--weights", default="random", help="random (timing only), imagenet or a file (default: random)")
    run.add_argument("--image-size", type=int, default=128, help="the model's input (default: 128)")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray cluster (default: 2)")
    run.add_argument("--memory", action="store_true",
                     help="one run on --cpus actors with memory sampled every second, instead of the throughput runs")
    run.add_argument("--work", default=None, help="folder for the images, model and results (default: a new "
                                                  "temporary folder; reused when given)")
    run.set_defaults(job=score)
    fit_parser = commands.add_parser("fit", help="padim fit --ray vs a local fit: time, peak memory per process")
    fit_parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    fit_parser.add_argument("--category", default="magnetic_tile")
    fit_parser.add_argument("--image-size", type=int, default=128, help="(default: 128)")
    fit_parser.add_argument("--shards", type=int, default=2, help="(default: 2, one per CPU)")
    fit_parser.add_argument("--repeats", type=int, default=3)
    fit_parser.add_argument("--work", default=None, help="folder for the model files (default: a new temporary one)")
    fit_parser.set_defaults(job=fit)
    args = parser.parse_args()
    args.job(args)


if __name__ == "__main__":
    main()
