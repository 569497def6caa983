"""Nothing lost (issue 20): for any command and any choice of its paths among its own inputs, links
to them, hard links, folders and new names, no input file changes (the documented exception:
``padim test --store-oracle-thresholds`` writes its thresholds into --model). The reference is each
input's SHA-256 before and after the command, whatever the command answered."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from padim import PaDiM
from padim.cli import main

from conftest import FAST

POOL = ["model.safetensors", "stats.st", "link.safetensors", "hard.st", "data/fabric/train/good/000.png",
        "data/fabric", "imgs", "imgs/a.png", "new.safetensors", "new.st", "out"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, synthetic_root):
    """A model with its statistics, the data root, and two loose images: what commands read."""
    root = tmp_path_factory.mktemp("base")
    shutil.copytree(synthetic_root, root / "data")
    train = sorted((root / "data" / "fabric" / "train" / "good").glob("*.png"))
    model = PaDiM(**FAST, calibration_fraction=0).fit(train, keep_statistics=True)
    model.save(root / "model.safetensors")
    model.statistics_.save(root / "stats.st")
    (root / "imgs").mkdir()
    for name, source in zip(("a.png", "b.png"), train[:2]):
        shutil.copy(source, root / "imgs" / name)
    return root


def _world(base: Path, tmp: Path) -> Path:
    shutil.copytree(base, tmp, symlinks=True)
    os.symlink(tmp / "model.safetensors", tmp / "link.safetensors")
    os.link(tmp / "stats.st", tmp / "hard.st")
    return tmp


def _digests(paths):
    """SHA-256 of every file among ``paths`` (files, or folders and all their files), links followed."""
    files = set()
    for path in map(Path, paths):
        files.update(p.resolve() for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


# what each command reads: none of it may change
INPUTS = {"fit": ["data/fabric"], "update": ["link.safetensors", "hard.st", "imgs"],
          "predict": ["model.safetensors", "imgs", "data/fabric/test/good"], "test": ["data/fabric"]}

COMMANDS = {
    "fit": lambda w, a, b: ["fit", "--data-root", str(w / "data"), "--category", "fabric", "--weights", "random",
                            "--image-size", "64", "--output", a, "--keep-statistics", b],
    "update": lambda w, a, b: ["update", "--model", str(w / "link.safetensors"), "--statistics", str(w / "hard.st"),
                               "--add", str(w / "imgs"), "--output", a, "--keep-statistics", b],
    "predict": lambda w, a, b: ["predict", "--model", str(w / "model.safetensors"), str(w / "imgs"),
                                str(w / "data" / "fabric" / "test" / "good"), "--output", a],
    "test": lambda w, a, b: ["test", "--model", a, "--data-root", str(w / "data"), "--category", "fabric",
                             "--output", b],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_input_changes_whatever_the_paths(command, base, tmp_path_factory, capsys):
    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.sampled_from(POOL), st.sampled_from(POOL))
    def check(first, second):
        world = _world(base, tmp_path_factory.mktemp(command) / "w")
        inputs = [world / name for name in INPUTS[command]]
        before = _digests(inputs)
        main(COMMANDS[command](world, str(world / first), str(world / second)))
        capsys.readouterr()
        after = _digests(inputs)
        changed = [p for p in before if after.get(p) != before[p]]
        assert not changed, f"{command} {first} {second} changed {changed}"

    check()
