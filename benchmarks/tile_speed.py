"""Tiles at their floor (issue 30): test ms per picture of each KolektorSDD geometry against its floor,
T x (ms of one picture of the tile's size) + one decode, with the torch engine and the fastest exported
engine here (OpenVINO f32; ONNX Runtime beside it).

    PYTHONPATH=. python benchmarks/tile_speed.py --data-root /work/shared/datasets --json benchmarks/tile_speed.json

Each geometry is fitted on 24 training pictures (speed does not depend on how many; calibration off),
then the 80 test pictures are scored in this process with ``predict`` (decoding included, batches of
32 pictures; median of 3 runs after a warm-up). The floor's "one picture of the tile's size" is an
untiled model at that size scoring batches of 32 random pictures (median of 5), and the decode is
``read_image`` of each test picture at the geometry's size. Run on a quiet machine; the load average
is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from padim import PaDiM, find_category
from padim.files.decode import read_image
from padim.settings.tile_geometry import count_tiles, default_overlap

GEOMETRIES = {
    "squeezed 256 x 256 (the default)": dict(image_size=256),
    "aspect kept 640 x 256": dict(image_size=(640, 256)),
    "tiles of 128 at half size (632 x 250), shared": dict(image_size=(632, 250), tile=128, tile_statistics="shared"),
    "tiles of 256 at native size (1260 x 500), shared (--tile auto)": dict(image_size=(1260, 500), tile=256,
                                                                          tile_statistics="shared"),
}


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def unit_ms(side: int) -> float:
    """ms per side x side picture through efficientnet_lite0 and PaDiM's scoring (batches of 32)."""
    rng = np.random.default_rng(0)
    model = PaDiM(backbone="efficientnet_lite0", image_size=side, calibration_fraction=0, device="cpu").fit(
        [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(4)])
    batch = np.stack([rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(32)])
    return median_seconds(lambda: model.score_pixels(batch), 5) / len(batch) * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--json", default=None)
    parser.add_argument("--engines", default="torch,openvino,onnxruntime")
    args = parser.parse_args(argv)
    found = find_category(args.data_root, "kolektorsdd", need_test=True)
    test = [sample.path for sample in found.test]
    out = {"load_before": os.getloadavg(), "pictures": len(test), "rows": {}}
    units = {}
    for name, options in GEOMETRIES.items():
        size = options["image_size"]
        size = (size, size) if isinstance(size, int) else size
        tile = options.get("tile")
        side = tile or None
        tiles = 1 if tile is None else count_tiles(size, tile, default_overlap(tile))
        if tile is not None and tile not in units:
            units[tile] = unit_ms(tile)
        unit = units[tile] if tile is not None else None
        if unit is None:  # untiled: one pass at the geometry's own size
            key = f"{size[0]}x{size[1]}"
            if key not in units:
                rng = np.random.default_rng(0)
                model = PaDiM(backbone="efficientnet_lite0", image_size=size, calibration_fraction=0,
                              device="cpu").fit([rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(4)])
                batch = np.stack([rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(32)])
                units[key] = median_seconds(lambda: model.score_pixels(batch), 5) / len(batch) * 1000
            unit = units[key]
        decode_ms = float(np.median([median_seconds(lambda p=p: read_image(p, size), 1) for p in test[:20]])) * 1000
        model = PaDiM(backbone="efficientnet_lite0", device="cpu", calibration_fraction=0, **options).fit(found.train[:24])
        row = {"tiles": tiles, "unit_ms": unit, "decode_ms": decode_ms, "floor_ms": tiles * unit + decode_ms}
        row["torch_ms"] = median_seconds(lambda: model.predict(test), 3) / len(test) * 1000
        with tempfile.TemporaryDirectory() as scratch:
            for engine in args.engines.split(","):
                if engine == "torch":
                    continue
                from padim.deploy.export import export_model
                from padim.runtime import ExportedModel

                folder = export_model(model, Path(scratch) / engine, "openvino" if engine == "openvino" else "onnx")
                exported = ExportedModel(folder, engine)
                row[f"{engine}_ms"] = median_seconds(lambda: exported.predict(test), 3) / len(test) * 1000
        row["torch_x_floor"] = row["torch_ms"] / row["floor_ms"]
        out["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    out["load_after"] = os.getloadavg()
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def table(out: dict) -> str:
    engines = [k[:-3] for k in next(iter(out["rows"].values())) if k.endswith("_ms") and k[:-3] not in ("unit", "decode", "floor", "torch")]
    lines = ["| geometry | tiles T | floor: T x unit + decode (ms) | torch ms / picture | x floor | "
             + " | ".join(f"{e} ms (pictures/s)" for e in engines) + " |",
             "|" + " --- |" * (5 + len(engines))]
    for name, r in out["rows"].items():
        cells = [str(r["tiles"]), f"{r['tiles']} x {r['unit_ms']:.1f} + {r['decode_ms']:.1f} = {r['floor_ms']:.0f}",
                 f"{r['torch_ms']:.0f}", f"{r['torch_x_floor']:.2f}"]
        cells += [f"{r[e + '_ms']:.0f} ({1000 / r[e + '_ms']:.1f})" for e in engines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
