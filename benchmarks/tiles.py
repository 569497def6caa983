"""The geometry grid of issue 22: how a picture reaches the backbone (squeezed, aspect kept, tiles at
native or half resolution, per-position or shared tile statistics), measured with real ``padim fit``
and ``padim test`` processes: image/pixel AUROC, AUPRO, fit time and peak memory (the fit process's
maximum resident set), test ms/image.

    python benchmarks/tiles.py --data-root ../shared/datasets --category kolektorsdd \\
        --backbone efficientnet_lite0 --results benchmarks/tiles_kolektorsdd.json
    python benchmarks/tiles.py --report benchmarks/tiles_kolektorsdd.json      # the markdown table

Each cell is one fit and one test (accuracy does not depend on the machine; the times do: run it on
a quiet machine for them, and write the load average beside the figures). Cells already in the
results file are skipped (a killed run resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> padim fit options (the geometry); the picture is 500 x 1253-1263 (W x H) for kolektorsdd
CELLS = {
    "squeezed 256": ["--image-size", "256"],
    "aspect kept 512x200": ["--image-size", "512x200"],
    "tiles 128 at half (632x250), position": ["--image-size", "632x250", "--tile", "128", "--tile-statistics",
                                               "position"],
    "tiles 128 at half (632x250), shared": ["--image-size", "632x250", "--tile", "128", "--tile-statistics", "shared"],
    "tiles 256 at native (1264x500), shared": ["--image-size", "1264x500", "--tile", "256", "--tile-statistics",
                                                "shared"],
}
KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def _run(command) -> tuple:
    """(seconds, peak resident MB of this child alone (``os.wait4``), stdout) of one padim command."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "padim", *command], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        if status != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {err.read().strip().splitlines()[-1:]}")
        return seconds, usage.ru_maxrss / 1024, out.read()


def run_cell(args, name: str, options, work: Path) -> dict:
    model = work / "model.safetensors"
    fit_s, fit_mb, _ = _run(["fit", "--data-root", str(args.data_root), "--category", args.category, "--backbone",
                             args.backbone, "--batch-size", str(args.batch_size), *options, "--output", str(model)])
    _, _, out = _run(["test", "--model", str(model), "--data-root", str(args.data_root), "--category", args.category,
                      "--output", str(work / "test"), "--batch-size", str(args.batch_size)])
    metrics = json.loads((work / "test" / "metrics.json").read_text())
    return {"options": options, "fit_s": fit_s, "fit_peak_mb": fit_mb,
            "test_ms_per_image": metrics.get("test_ms_per_image"),
            "model_mb": model.stat().st_size / 1e6, **{key: metrics.get(key) for key in KEYS},
            "load_average": os.getloadavg()[0]}


def report(path: Path) -> None:
    results = json.loads(path.read_text())
    print("| geometry | image AUROC | pixel AUROC | AUPRO | fit s | fit peak GB | test ms/image | model MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["cells"].items():
        print(f"| {name} | {row['image_AUROC']:.3f} | {row['pixel_AUROC']:.3f} | {row['pixel_AUPRO']:.3f} | "
              f"{row['fit_s']:.0f} | {row['fit_peak_mb'] / 1024:.2f} | {row['test_ms_per_image']:.0f} | "
              f"{row['model_mb']:.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--category", default="kolektorsdd")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cell names (default: all)")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {"cells": {}}
    results.update(category=args.category, backbone=args.backbone, cpu=_cpu())
    for name in [c.strip() for c in args.cells.split(",") if c.strip()]:
        if name in results["cells"]:
            continue
        with tempfile.TemporaryDirectory(prefix="padim-tiles-") as work:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results["cells"][name] = run_cell(args, name, CELLS[name], Path(work))
        args.results.write_text(json.dumps(results, indent=2) + "\n")
    report(args.results)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
