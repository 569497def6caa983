"""Mergeable fit statistics (padim.core.statistics): exact merges against NumPy, files, refusals, and
incremental fits (partial_fit, padim fit --keep-statistics, padim update) against fits on the union."""

import numpy as np
import pytest
import torch
from PIL import Image

from padim import PaDiM
from padim.settings.calibration import CalibrationError
from padim.cli import main
from padim.settings.config import PadimConfig
from padim.core.features import random_channel_subset
from padim.core.gaussian import GaussianAccumulator, unpack_lower
from padim.core.statistics import FitStatistics, StatisticsFileError, StatisticsMismatchError

from conftest import FAST

FAST_CLI = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--batch-size", "8",
            "--device", "cpu"]


def _images(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (64, 64, 3))
    return [np.clip(base + rng.integers(-40, 40, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _accumulate(x: np.ndarray, shift=None, chunk=None, batch=5) -> GaussianAccumulator:
    acc = GaussianAccumulator(chunk, None if shift is None else torch.from_numpy(shift))
    for start in range(0, len(x), batch):
        acc.update(torch.from_numpy(x[start : start + batch]))
    return acc


# ------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_arbitrary_splits_equals_numpy_whatever_the_shifts(seed):
    rng = np.random.default_rng(seed)
    n, n_pos, n_ch = 41, 7, 5
    # a large mean relative to the spread, correlated channels: where naive one-pass sums lose digits
    x = 1e3 + rng.normal(size=(n, n_pos, n_ch)) @ rng.normal(size=(n_ch, n_ch))
    cuts = np.sort(rng.choice(np.arange(1, n), size=3, replace=False))
    parts = np.split(x, cuts)
    # shifts: the first batch's mean, far off, zero (no shift: cancellation costs ~6 digits here), near
    shifts = [None, rng.normal(0, 50, (n_pos, n_ch)), np.zeros((n_pos, n_ch)), rng.normal(1e3, 1, (n_pos, n_ch))]
    chunks = [None, 3, 2, 7]
    accs = [_accumulate(p, s, c) for p, s, c in zip(parts, shifts, chunks)]
    merged = accs[0]
    for acc in accs[1:]:
        merged = merged.merged(acc)
    assert merged.count == n
    mean = x.mean(axis=0)
    cov = np.stack([np.cov(x[:, p].T) for p in range(n_pos)])  # unbiased, NumPy's own two-pass
    assert _relative(merged.mean().numpy(), mean) <= 1e-12
    cov_error = _relative(merged.covariance(0.0).numpy(), cov)
    assert cov_error <= 1e-9
    # the factor: W^T W = (cov + eps I)^-1, as exact as the inverse's conditioning allows
    # (perturbation bound: relative error of an inverse <= cond x relative error of the matrix)
    _, packed = merged.finalize(0.01, torch.float64)
    w = unpack_lower(packed, n_ch).numpy()
    regularised = cov + 0.01 * np.eye(n_ch)
    condition = float(np.linalg.cond(regularised).max())
    assert _relative(np.transpose(w, (0, 2, 1)) @ w, np.linalg.inv(regularised)) <= 10 * condition * max(cov_error, 1e-15)
    # merging leaves its inputs as they were (a second merge gives the same)
    again = accs[0].merged(accs[1])
    assert again.count == len(parts[0]) + len(parts[1])


def test_recentring_is_exact_against_direct_sums():
    rng = np.random.default_rng(5)
    x = rng.normal(3, 2, (9, 4, 3))
    s, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    moved = _accumulate(x, s).recentred(torch.from_numpy(t))
    direct = _accumulate(x, t)
    assert np.abs(moved.sum.numpy() - direct.sum.numpy()).max() <= 1e-12
    for a, b in zip(moved.outer, direct.outer):
        assert _relative(a.numpy(), b.numpy()) <= 1e-12


# ------------------------------------------------------------------------------------ files
def _small_statistics(data_seed=0, n=6, **config) -> FitStatistics:
    """FitStatistics of random embeddings shaped like resnet18 layer1..3 at 64 x 64 (16 x 16 grid), d=5."""
    config = PadimConfig(**{**dict(backbone="resnet18", weights="random", layers=("layer1", "layer2", "layer3"),
                                   n_features=5, image_size=(64, 64)), **config})
    x = np.random.default_rng(data_seed).normal(2, 1, (n, 256, config.n_features))
    return FitStatistics(config, random_channel_subset(448, config.n_features, config.seed), (16, 16),
                         _accumulate(x, chunk=100), "random (untrained)", None, f"{n} test embeddings",
                         [{"how": "test", "n_images": n}])


def test_save_load_round_trip_is_exact(tmp_path):
    stats = _small_statistics()
    path = tmp_path / "s.safetensors"
    stats.save(path)
    back = FitStatistics.load(path)
    assert back.count == stats.count and back.config == stats.config and back.feature_hw == stats.feature_hw
    assert back.covers == stats.covers and back.history == stats.history
    assert torch.equal(back.channel_idx, stats.channel_idx)
    assert torch.equal(back.accumulator.shift, stats.accumulator.shift)
    assert torch.equal(back.accumulator.sum, stats.accumulator.sum)
    assert len(back.accumulator.outer) == 3
    assert torch.equal(torch.cat(back.accumulator.outer), torch.cat(stats.accumulator.outer))
    m1, f1 = back.finalize(torch.float64)
    m2, f2 = stats.finalize(torch.float64)
    assert torch.equal(m1, m2) and torch.equal(f1, f2)


def test_damaged_or_wrong_files_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    _small_statistics().save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(raw))
    with pytest.raises(StatisticsFileError, match="statistics file .* checksum does not match"):
        FitStatistics.load(broken)
    with pytest.raises(StatisticsFileError, match="does not exist"):
        FitStatistics.load(tmp_path / "missing.safetensors")
    model = PaDiM(**FAST, calibration_fraction=0).fit(_images(2, 0))
    model.save(tmp_path / "m.safetensors")
    with pytest.raises(StatisticsFileError):
        FitStatistics.load(tmp_path / "m.safetensors")


@pytest.mark.parametrize("field, value", [("n_features", 6), ("seed", 1), ("image_size", (96, 96)),
                                          ("layers", ("layer1", "layer2")), ("weights", "imagenet")])
def test_merging_statistics_of_another_configuration_is_refused(field, value):
    a, b = _small_statistics(), _small_statistics(1, **{field: value})
    with pytest.raises(StatisticsMismatchError, match=f"different configurations: {field} ") as caught:
        a.merge(b)
    assert "\n" not in str(caught.value)


def test_merge_of_statistics_objects_equals_one_accumulator():
    a, b = _small_statistics(0, n=4), _small_statistics(1, n=7)
    both = a.merge(b)
    assert both.count == 11 and len(both.history) == 2
    x = np.concatenate([np.random.default_rng(s).normal(2, 1, (n, 256, 5)) for s, n in ((0, 4), (1, 7))])
    assert _relative(both.mean().numpy(), x.mean(axis=0)) <= 1e-12
    assert _relative(both.accumulator.covariance(0.0).numpy(),
                     np.stack([np.cov(x[:, p].T) for p in range(256)])) <= 1e-9
    assert a.count == 4 and b.count == 7  # inputs untouched


# ------------------------------------------------------------------------------------ incremental fits
def _float64_model(stats: FitStatistics):
    mean, packed = stats.finalize(torch.float64)
    return mean.numpy(), packed.numpy()


def test_partial_fit_over_two_calls_equals_fit_on_both_sets():
    first, second = _images(8, 1), _images(5, 2)
    model = PaDiM(**FAST, n_features=20, calibration_fraction=0)
    model.partial_fit(first)
    assert model.n_train_images_ == 8 and model.predict(second[:1]).scores.shape == (1,)  # usable after a call
    model.set_params(n_features=30)  # the first call fixed the configuration
    model.partial_fit(second)
    assert model.n_train_images_ == 13 and model.config_.n_features == 20
    whole = PaDiM(**FAST, n_features=20, calibration_fraction=0).fit(first + second, keep_statistics=True)
    m1, f1 = _float64_model(model.statistics_)
    m2, f2 = _float64_model(whole.statistics_)
    assert _relative(m1, m2) <= 1e-9 and _relative(f1, f2) <= 1e-9
    assert torch.allclose(model.mean_, whole.mean_, rtol=1e-6, atol=1e-6)
    assert np.allclose(model.predict(second).scores, whole.predict(second).scores, rtol=1e-5)
    rebuilt = PaDiM.from_statistics(whole.statistics_, device="cpu")  # a model from statistics alone: the same Gaussians
    assert torch.equal(rebuilt.mean_, whole.mean_) and rebuilt.calibration_ is None and rebuilt.n_train_images_ == 13
    assert torch.equal(rebuilt.precision_factor_packed_, whole.precision_factor_packed_)


def test_partial_fit_refusals():
    with pytest.raises(Exception, match="at least 2 images"):
        PaDiM(**FAST).partial_fit(_images(1, 0))
    fitted = PaDiM(**FAST, calibration_fraction=0).fit(_images(2, 0))
    assert fitted.statistics_ is None
    with pytest.raises(Exception, match="statistics were not kept"):
        fitted.partial_fit(_images(2, 1))


def _folder(path, images, prefix):
    path.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(path / f"{prefix}{i:03d}.png")
    return path


def test_cli_update_equals_fit_on_the_union(tmp_path, capsys):
    old, new = _images(8, 3), _images(8, 4)
    _folder(tmp_path / "old" / "cat" / "train" / "good", old, "a")
    added = _folder(tmp_path / "added", new, "b")
    _folder(tmp_path / "union" / "cat" / "train" / "good", old, "a")
    _folder(tmp_path / "union" / "cat" / "train" / "good", new, "b")
    opts = FAST_CLI + ["--n-features", "20", "--calibration-fraction", "0"]
    assert main(["fit", "--data-root", str(tmp_path / "old"), "--category", "cat", *opts, "--output",
                 str(tmp_path / "m1.safetensors"), "--keep-statistics", str(tmp_path / "s1.safetensors")]) == 0
    assert main(["update", "--model", str(tmp_path / "m1.safetensors"), "--statistics", str(tmp_path / "s1.safetensors"),
                 "--add", str(added), "--output", str(tmp_path / "m2.safetensors"), "--keep-statistics",
                 str(tmp_path / "s2.safetensors"), "--device", "cpu", "--batch-size", "8"]) == 0
    assert "added 8 images to 8" in capsys.readouterr().out
    assert main(["fit", "--data-root", str(tmp_path / "union"), "--category", "cat", *opts, "--output",
                 str(tmp_path / "m3.safetensors"), "--keep-statistics", str(tmp_path / "s3.safetensors")]) == 0
    updated, union = FitStatistics.load(tmp_path / "s2.safetensors"), FitStatistics.load(tmp_path / "s3.safetensors")
    assert updated.count == union.count == 16
    m1, f1 = _float64_model(updated)
    m2, f2 = _float64_model(union)
    assert _relative(m1, m2) <= 1e-9 and _relative(f1, f2) <= 1e-9
    a, b = PaDiM.load(tmp_path / "m2.safetensors"), PaDiM.load(tmp_path / "m3.safetensors")
    assert a.n_train_images_ == b.n_train_images_ == 16
    assert torch.allclose(a.mean_, b.mean_, rtol=1e-6, atol=1e-7)
    assert _relative(a.precision_factor_packed_.numpy(), b.precision_factor_packed_.numpy()) <= 1e-6

    # statistics of another model (other images or another configuration): one line, exit 1, nothing written
    capsys.readouterr()
    assert main(["update", "--model", str(tmp_path / "m1.safetensors"), "--statistics", str(tmp_path / "s3.safetensors"),
                 "--add", str(added), "--output", str(tmp_path / "m4.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("padim update: error: ") and "16 images" in err and err.count("\n") == 1
    assert not (tmp_path / "m4.safetensors").exists()
    assert main(["fit", "--data-root", str(tmp_path / "old"), "--category", "cat", *FAST_CLI, "--n-features", "10",
                 "--calibration-fraction", "0", "--output", str(tmp_path / "m5.safetensors")]) == 0
    capsys.readouterr()
    assert main(["update", "--model", str(tmp_path / "m5.safetensors"), "--statistics", str(tmp_path / "s1.safetensors"),
                 "--add", str(added), "--output", str(tmp_path / "m4.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("padim update: error: ") and "n_features 10 vs 20" in err


def test_update_of_a_calibrated_model_keeps_its_thresholds_marked_stale(tmp_path):
    images = _images(40, 6)
    model = PaDiM(**FAST, n_features=10).fit(images, keep_statistics=True)  # 20 held out to calibrate
    assert model.calibration_ is not None and model.statistics_.count == model.n_train_images_ == 20
    assert "20 held out for calibration are not included" in model.statistics_.covers
    threshold, source = model.image_threshold_, model.threshold_source_
    model.statistics_.save(tmp_path / "s.safetensors")
    model.save(tmp_path / "m.safetensors")

    loaded = PaDiM.load(tmp_path / "m.safetensors").attach_statistics(FitStatistics.load(tmp_path / "s.safetensors"))
    loaded.partial_fit(_images(4, 7))
    assert loaded.n_train_images_ == 24
    assert loaded.image_threshold_ == threshold
    assert loaded.threshold_source_ == f"stale: calibrated before 4 images were added ({source})"
    assert loaded.pixel_threshold_source_.startswith("stale: calibrated before 4 images were added")
    assert loaded.calibration_ is None and "stale calibration" in loaded.calibration_note_
    result = loaded.predict(images[:2])
    assert result.p_values is None and result.labels is not None and result.threshold_source.startswith("stale")
    with pytest.raises(CalibrationError):
        loaded.predict(images[:1], target_fpr=0.05)
    loaded.partial_fit(_images(2, 8))  # stale twice: the count of images added since calibration grows
    assert loaded.threshold_source_ == f"stale: calibrated before 6 images were added ({source})"
    loaded.save(tmp_path / "m2.safetensors")
    again = PaDiM.load(tmp_path / "m2.safetensors")
    assert again.threshold_source_ == loaded.threshold_source_ and again.image_threshold_ == threshold
