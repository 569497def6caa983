"""Shows that the test suite catches deliberate breakages of the estimator's wiring.

Each mutation below is one plausible mistake (the seven from issue 9 and any added since). For each,
the package and tests are copied to a temporary folder, the mistake is written into the copy, and
pytest runs there (``-x``: the first failing test is enough). A mutation that no test catches is a
hole in the suite; one whose text no longer appears in the code means this script needs updating.

    python tools/check_mutations.py              # the wiring tests first, then the rest of the suite
    python tools/check_mutations.py --only sigma # one mutation

Exit status 0 only when every mutation applied and was caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, [(exact text, replacement), ...])
MUTATIONS = {
    "sigma 4 -> 2 (default blur)": ("padim/core/estimator.py", [("sigma: float = 4.0,", "sigma: float = 2.0,")]),
    "epsilon x 100": ("padim/settings/config.py", [("COVARIANCE_EPSILON = 0.01", "COVARIANCE_EPSILON = 1.0")]),
    "resnet18 default layers without layer3": ("padim/settings/backbone_table.py", [
        ('"resnet18": BackboneEntry(_RESNET_BASIC, _RESNET_LAYERS, 100)',
         '"resnet18": BackboneEntry(_RESNET_BASIC, ("layer1", "layer2"), 100)')]),
    "BatchNorm dropped instead of folded": ("padim/core/backbones.py", [
        ("model.conv1, model.bn1 = fuse_conv_bn_eval(model.conv1, model.bn1), nn.Identity()",
         "model.conv1, model.bn1 = model.conv1, nn.Identity()"),
        ('fused = fuse_conv_bn_eval(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))',
         'fused = getattr(block, f"conv{i}")'),
        ("block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])",
         "block.downsample = block.downsample[0]")]),
    "predict().labels inverted": ("padim/settings/calibration.py", [
        ("return None if threshold is None else at_least(scores, threshold)",
         "return None if threshold is None else ~at_least(scores, threshold)")]),
    "original-resolution maps resized with nearest": ("padim/pipeline/resolution.py", [
        ("return values[low] * (1 - frac)[:, None] + values[high] * frac[:, None]", "return values[low]")]),
    "no ImageNet normalisation": ("padim/core/embedding.py", [
        ("x = (pixels.to(torch.float32) * self.scale + self.shift).permute(0, 3, 1, 2)",
         "x = (pixels.to(torch.float32) / 255.0).permute(0, 3, 1, 2)")]),
    "tile maps stitched without their weights": ("padim/core/tiling.py", [
        ("maps = (maps * window).unflatten(0, (-1, n_boxes))", "maps = maps.unflatten(0, (-1, n_boxes))")]),
}


def run_pytest(tree: Path, tests) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def check(name: str, tests) -> str:
    file, edits = MUTATIONS[name]
    with tempfile.TemporaryDirectory(prefix="padim-mutant-") as tmp:
        tree = Path(tmp)
        for folder in ("padim", "tests"):
            shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
        target = tree / file
        text = target.read_text()
        for old, new in edits:
            if text.count(old) != 1:
                return "NOT APPLIED (the code changed: update this script)"
            text = text.replace(old, new)
        target.write_text(text)
        for group in tests:  # cheapest first; stop at the first group that fails
            code = run_pytest(tree, group)
            if code == 1:
                return f"caught by {' '.join(group)}"
            if code != 0:
                return f"ERROR (pytest exit {code})"
        return "SURVIVED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run the mutations whose name contains this text")
    parser.add_argument("--tests", default=None,
                        help="comma-separated pytest targets (default: tests/test_wiring.py, then all of tests/)")
    args = parser.parse_args()
    tests = [args.tests.split(",")] if args.tests else [["tests/test_wiring.py"], ["tests"]]
    names = [name for name in MUTATIONS if args.only is None or args.only in name]
    if run_pytest(ROOT, tests[0]) != 0:
        print("the unmutated code fails its tests: fix that first")
        return 2
    failures = 0
    for name in names:
        started = time.perf_counter()
        outcome = check(name, tests)
        failures += not outcome.startswith("caught")
        print(f"{name:<48} {outcome}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"{len(names) - failures} of {len(names)} mutations caught")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
