"""Shared fixtures: small synthetic categories generated in code (nothing shipped as files)."""

import os
import shutil

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


@pytest.fixture(scope="session")
def ray_address():
    """The address of a real Ray cluster on 127.0.0.1 (2 CPUs), started once and stopped at the end."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from ray_cluster import LocalCluster

    cluster = LocalCluster(num_cpus=2)
    yield cluster.address
    cluster.stop()
