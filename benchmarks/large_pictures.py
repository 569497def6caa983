"""Really large pictures (issue 30): a fit on 8 pictures of 20 megapixels (5472 x 3648) and `padim
predict --output` of one, with `--tile auto` (native size, 425 tiles of 256 px, shared statistics),
efficientnet_lite0 with its ImageNet weights: wall time and the peak resident memory of each `padim`
process (``os.wait4``), against the floor: 425 x the time of one 256 x 256 picture through the same
backbone (a 256 px model scoring a batch of 32, per picture) plus one decode of the 20 MP file.

    PYTHONPATH=. python benchmarks/large_pictures.py --json benchmarks/large_pictures.json

The pictures are generated (a smooth random texture with grain, JPEG quality 92): what is measured is
time and memory, which do not depend on what the pictures show. Run it on a quiet machine and write
the load average beside the figures.
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

import numpy as np
from PIL import Image

SIZE = (3648, 5472)  # height x width: 20 megapixels


def make_picture(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(90, 170, (SIZE[0] // 64, SIZE[1] // 64, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((SIZE[1], SIZE[0]), Image.BILINEAR), dtype=np.int16)
    grain = rng.integers(-12, 13, (*SIZE, 1), dtype=np.int16)
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=92)


def run(command) -> tuple:
    """(seconds, peak resident GB of this child, stdout + stderr) of one padim command."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "padim", *command], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read()
        if status != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {text[-2000:]}")
        return seconds, usage.ru_maxrss / 2 ** 20, text


def floor(picture: Path, repeats: int = 5) -> dict:
    """ms per 256 x 256 picture through the backbone and the scoring (batches of 32), and one decode."""
    import torch

    from padim import PaDiM
    from padim.files.decode import read_image

    rng = np.random.default_rng(0)
    train = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(8)]
    model = PaDiM(backbone="efficientnet_lite0", calibration_fraction=0, device="cpu").fit(train)
    batch = np.stack([rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(32)])
    model.score_pixels(batch)  # warm-up
    per_picture = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.score_pixels(batch)
        per_picture.append((time.perf_counter() - started) / len(batch) * 1000)
    decodes = []
    for _ in range(3):
        started = time.perf_counter()
        read_image(str(picture))
        decodes.append(time.perf_counter() - started)
    return {"ms_per_256_picture": float(np.median(per_picture)), "decode_s": float(np.median(decodes)),
            "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--train", type=int, default=8)
    args = parser.parse_args(argv)
    out = {"size": list(SIZE), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "data" / "large" / "train" / "good"
        folder.mkdir(parents=True)
        for i in range(args.train):
            make_picture(folder / f"{i}.jpg", i)
        test = root / "new"
        test.mkdir()
        make_picture(test / "new.jpg", 100)
        out["floor"] = floor(test / "new.jpg")
        tiles = 425
        out["floor"]["tiles"] = tiles
        out["floor"]["seconds"] = tiles * out["floor"]["ms_per_256_picture"] / 1000 + out["floor"]["decode_s"]
        model = root / "large.safetensors"
        seconds, peak, text = run(["fit", "--data-root", str(root / "data"), "--category", "large", "--backbone",
                                   "efficientnet_lite0", "--tile", "auto", "--device", "cpu", "--output", str(model)])
        out["fit"] = {"seconds": seconds, "peak_gb": peak, "pictures": args.train, "said": text.strip().splitlines()}
        print(json.dumps(out["fit"]), flush=True)
        times = []
        for repeat in range(3):
            seconds, peak, text = run(["predict", "--model", str(model), "--device", "cpu", "--output",
                                       str(root / f"pictures{repeat}"), str(test / "new.jpg")])
            times.append((seconds, peak))
        out["predict"] = {"seconds": float(np.median([t for t, _ in times])), "peak_gb": max(p for _, p in times),
                          "runs": times}
        out["predict"]["x_floor"] = out["predict"]["seconds"] / out["floor"]["seconds"]
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
