"""Thresholds from good images alone: the conformal threshold and p-values against their definitions,
the false-positive guarantee by simulation, holdout and cross-fitted calibration against models
fitted directly, and the operating point as a runtime choice."""

import json
import math

import numpy as np
import pytest
import torch

from padim import PaDiM
from padim.settings.calibration import Calibration, calibration_size
from padim.cli import main
from padim.core.gaussian import GaussianAccumulator, unpack_lower

from conftest import FAST

N_IMAGES = 44  # enough to hold out 20 for calibration


def _images(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (64, 64, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-25, 25, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _order_statistic_rank(n, alpha):
    """The smallest k with k / (n + 1) >= 1 - alpha, by search (the definition, not the formula)."""
    return next(k for k in range(1, n + 2) if k / (n + 1) >= 1 - alpha - 1e-12)


@pytest.mark.parametrize("n, alpha", [(19, 0.05), (20, 0.05), (76, 0.05), (99, 0.01), (150, 0.1), (76, 0.01), (5, 0.1)])
def test_conformal_threshold_is_the_order_statistic(n, alpha):
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0)) * 1.5
    calibration = Calibration.from_scores(scores, np.zeros(10))
    k = _order_statistic_rank(n, alpha)
    expected = np.sort(scores)[min(k, n) - 1]  # the highest score when n is too small (k = n + 1)
    threshold = calibration.image_threshold(alpha)
    assert expected < threshold and np.nextafter(expected, np.inf) == threshold  # flags scores above s_(k)
    if k > n:
        assert "guarantee only" in calibration.describe(alpha)
        assert calibration.guaranteed(alpha) == pytest.approx(1 / (n + 1))
    else:
        assert calibration.describe(alpha) == f"calibration: target FPR {100 * alpha:.3g}% on {n} good images"


def test_p_values_count_calibration_scores_at_least_as_high():
    rng = np.random.default_rng(1)
    calibration_scores = rng.normal(size=30).round(1)  # ties included
    new = np.concatenate([rng.normal(size=20).round(1), calibration_scores[:5], [-9.0, 9.0]])
    expected = [(1 + np.sum(calibration_scores >= s)) / 31 for s in new]
    np.testing.assert_allclose(Calibration.from_scores(calibration_scores, np.zeros(3)).p_values(new), expected)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_false_positive_rate_is_at_most_alpha_over_random_calibration_sets(alpha):
    """The split-conformal guarantee, by simulation: exchangeable good scores, 2,000 random splits
    into n calibration and 500 new images; the mean FPR must not exceed alpha + 2 standard errors."""
    rng = np.random.default_rng(7)
    n = max(99, _order_statistic_rank(99, alpha))
    rates = []
    for _ in range(2000):
        scores = rng.gamma(3.0, size=n + 500)
        threshold = Calibration.from_scores(scores[:n], np.zeros(2)).image_threshold(alpha)
        rates.append(np.mean(scores[n:] >= threshold))
    rates = np.array(rates)
    assert rates.mean() <= alpha + 2 * rates.std(ddof=1) / math.sqrt(len(rates))
    assert rates.mean() >= 0.5 * alpha  # and not a trivially high threshold


def test_pixel_threshold_is_the_calibration_pixels_quantile():
    pixels = np.random.default_rng(2).exponential(size=(20, 32, 32))
    calibration = Calibration.from_scores(np.ones(20), pixels)
    for fpr in (0.2, 0.01, 0.001):
        assert np.mean(pixels >= calibration.pixel_threshold(fpr)) == pytest.approx(fpr, rel=0.05)


@pytest.mark.parametrize("n_images, fraction, expected", [(761, 0.1, 76), (100, 0.1, 20), (40, 0.1, 20), (39, 0.1, 0),
                                                          (300, 0.0, 0), (300, 0.3, 90)])
def test_calibration_size(n_images, fraction, expected):
    assert calibration_size(n_images, fraction) == expected


# ------------------------------------------------------------------------------------------ fitting
def test_total_minus_a_fold_equals_a_fit_on_the_other_folds():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(60, 12, 6, generator=generator, dtype=torch.float64) * 3 + 5  # (B, P, C)
    fold = torch.zeros(60, dtype=torch.bool)
    fold[torch.randperm(60, generator=generator)[:15]] = True
    total = GaussianAccumulator(chunk=5)
    for part in x.split(16):
        total.update(part)
    part = GaussianAccumulator(total.chunk, total.shift)
    part.update(x[fold])
    direct = GaussianAccumulator(chunk=5)
    direct.update(x[~fold])
    mean_a, factor_a = total.without(part).finalize(0.01, dtype=torch.float64)
    mean_b, factor_b = direct.finalize(0.01, dtype=torch.float64)
    torch.testing.assert_close(mean_a, mean_b, rtol=1e-9, atol=0)
    torch.testing.assert_close(unpack_lower(factor_a, 6), unpack_lower(factor_b, 6), rtol=1e-6, atol=1e-12)


@pytest.fixture(scope="module")
def calibrated():
    images = _images(N_IMAGES, seed=0)
    return images, PaDiM(**FAST).fit(images)


def test_holdout_calibration_scores_the_held_out_images_with_the_final_model(calibrated):
    images, model = calibrated
    assert (model.n_train_images_, model.n_calibration_images_) == (N_IMAGES - 20, 20)
    # the held-out images are the ones whose predicted scores are the calibration scores
    scores = model.predict(images).scores
    matched = np.isclose(scores[:, None], model.calibration_.image_scores[None, :], rtol=1e-5).any(axis=1)
    assert matched.sum() == 20
    np.testing.assert_allclose(np.sort(scores[matched]), model.calibration_.image_scores, rtol=1e-5)
    # and the Gaussians were fitted on the others only
    others = [image for image, held in zip(images, matched) if not held]
    direct = PaDiM(**FAST, calibration_fraction=0).fit(others)
    torch.testing.assert_close(model.mean_, direct.mean_)
    assert model.image_threshold_ == Calibration.from_scores(scores[matched], np.zeros(2)).image_threshold(0.05)
    assert model.threshold_source_ == "calibration: target FPR 5% on 20 good images"


def test_cross_fitted_scores_come_from_models_that_did_not_see_them():
    images = _images(21, seed=4)
    model = PaDiM(**FAST, calibration="cv", folds=3).fit(images)
    assert model.n_train_images_ == 21 and model.calibration_.n == 21
    folds = np.array_split(np.random.default_rng(FAST.get("seed", 0)).permutation(21), 3)  # the documented rule
    expected = []
    for fold in folds:
        others = [images[i] for i in range(21) if i not in set(fold)]
        direct = PaDiM(**FAST, calibration_fraction=0).fit(others)
        expected += direct.predict([images[i] for i in sorted(fold)]).scores.tolist()
    np.testing.assert_allclose(model.calibration_.image_scores, np.sort(expected), rtol=1e-4)
    torch.testing.assert_close(model.mean_, PaDiM(**FAST, calibration_fraction=0).fit(images).mean_)
    assert model.threshold_source_.endswith("cross-fitted")


def test_too_few_images_for_calibration_say_so():
    model = PaDiM(**FAST).fit(_images(12, seed=5))
    assert model.calibration_ is None and model.image_threshold_ is None
    assert "too few" in model.calibration_note_
    with pytest.raises(Exception, match="no calibration"):
        model.predict(_images(1, seed=6), target_fpr=0.1)


# ------------------------------------------------------------------------------------------ runtime choice
def test_operating_point_is_chosen_per_call_and_saved_with_the_model(calibrated, tmp_path):
    images, model = calibrated
    new = _images(8, seed=9)
    default = model.predict(new)
    loose = model.predict(new, target_fpr=0.5)
    assert loose.image_threshold == model.calibration_.image_threshold(0.5) < default.image_threshold
    np.testing.assert_array_equal(loose.labels, loose.scores >= loose.image_threshold)
    manual = model.predict(new, image_threshold=float(np.median(default.scores)))
    assert manual.threshold_source == "manual" and manual.labels.sum() == 4
    assert model.image_threshold_ == default.image_threshold  # per-call choices leave the model alone
    np.testing.assert_allclose(default.p_values, model.calibration_.p_values(default.scores))

    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = PaDiM.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.calibration_.image_scores, model.calibration_.image_scores)
    assert (loaded.image_threshold_, loaded.threshold_source_) == (model.image_threshold_, model.threshold_source_)
    np.testing.assert_allclose(loaded.predict(new).p_values, default.p_values)


def test_cli_predict_target_fpr_changes_labels_without_refitting(calibrated, tmp_path, capsys):
    from PIL import Image

    images, model = calibrated
    path = tmp_path / "m.safetensors"
    model.save(path)
    before = path.read_bytes()
    files = []
    for i, image in enumerate(_images(6, seed=11)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])

    def predict(*options):
        assert main(["predict", "--model", str(path), *map(str, files), "--device", "cpu", *options]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    stored, loose = predict(), predict("--target-fpr", "0.5")
    threshold = model.calibration_.image_threshold(0.5)
    for line in loose:
        assert line["threshold"] == threshold and line["label"] == ("anomalous" if line["score"] >= threshold else "good")
        assert line["threshold_source"] == "calibration: target FPR 50% on 20 good images"
        assert line["p_value"] == pytest.approx(model.calibration_.p_values([line["score"]])[0])
    assert all(line["threshold"] == model.image_threshold_ for line in stored)
    assert sum(line["label"] == "anomalous" for line in loose) >= sum(line["label"] == "anomalous" for line in stored)
    manual = predict("--image-threshold", "0")
    assert all(line["label"] == "anomalous" and line["threshold_source"] == "manual" for line in manual)
    predict("--target-fpr", "0.01")
    assert path.read_bytes() == before


@pytest.mark.parametrize("options, words", [
    (["--image-threshold", "nan"], "finite"),
    (["--pixel-threshold", "inf"], "finite"),
    (["--target-fpr", "0.1", "--image-threshold", "3"], "not both"),
    (["--target-fpr", "1.5"], "(0, 1)"),
])
def test_cli_predict_refuses_impossible_operating_points(calibrated, tmp_path, capsys, options, words):
    from PIL import Image

    _, model = calibrated
    path = tmp_path / "m.safetensors"
    model.save(path)
    Image.fromarray(_images(1, seed=12)[0]).save(tmp_path / "a.png")
    assert main(["predict", "--model", str(path), str(tmp_path / "a.png"), "--device", "cpu", *options]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err and words in captured.err.strip().splitlines()[-1]


def test_a_float32_score_equal_to_the_cut_order_statistic_is_not_flagged():
    """The cut is the next double above s_(k): a float32 score equal to s_(k) is good (FPR <= alpha),
    although NumPy would round that threshold back to s_(k) in a float32 comparison."""
    scores = np.float32([1.1, 2.2, 3.3, 4.4, 5.5, 6.6, 7.7, 8.8, 9.9, 10.1] * 2)
    calibration = Calibration.from_scores(scores, np.zeros(2))
    threshold = calibration.image_threshold(0.2)  # k = ceil(21 * 0.8) = 17: s_(17) = 9.9 (float32)
    at_cut = np.float32(9.9)
    assert float(at_cut) == calibration.image_scores[16] < threshold
    from padim.settings.calibration import labels_at, masks_at

    assert not labels_at(np.array([at_cut]), threshold)[0] and labels_at(np.array([np.float32(10.1)]), threshold)[0]
    assert not masks_at(np.full((2, 2), at_cut), threshold).any()
