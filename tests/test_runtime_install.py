"""The torch-free runtime as a user installs it: a clean virtualenv, requirements-runtime.txt and
``pip install --no-deps .`` (README, "Without PyTorch"); under 300 MB on disk; it predicts from an
export what PyTorch predicts, and torch is not importable in it.

Needs the package index (PyPI or a local mirror/cache): skipped when the install cannot be done.
Takes ~30 s with a warm pip cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxscript", reason='pip install "padim-inspect[export]"')

from padim import PaDiM  # noqa: E402
from padim.data import find_category  # noqa: E402
from padim.deploy.cache import export_file  # noqa: E402

from conftest import FAST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE_LIMIT_MB = 300  # the target for the runtime install


def _disk_mb(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total / 1e6


def test_runtime_installs_without_torch_and_predicts_like_torch(synthetic_root, tmp_path):
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    if subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, timeout=300).returncode:
        pytest.skip("cannot create a virtualenv here")
    for args in (["-r", str(ROOT / "requirements-runtime.txt")], ["--no-deps", str(ROOT)]):
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                              env=env, timeout=600)
        if done.returncode:
            pytest.skip(f"cannot install the runtime (offline?): {done.stderr.strip().splitlines()[-1:]}")
    size = _disk_mb(venv)
    print(f"runtime virtualenv: {size:.0f} MB on disk")
    assert size < SIZE_LIMIT_MB

    category = find_category(synthetic_root, "fabric", need_test=True)
    model = PaDiM(**FAST).fit(category.train)
    model.save(tmp_path / "m.safetensors")
    export = export_file(tmp_path / "m.safetensors", "onnx", tmp_path / "export", model=model)
    images = [str(s.path) for s in category.test]
    reference = model.predict(images)

    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=env).returncode != 0
    done = subprocess.run([str(venv / "bin" / "padim"), "predict", "--engine", "onnxruntime", "--export", str(export),
                           *images], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in records] == images
    np.testing.assert_allclose([r["score"] for r in records], reference.scores, rtol=1e-4)
