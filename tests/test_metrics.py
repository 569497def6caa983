"""Metrics against scikit-learn and a direct implementation of the MVTec AD PRO definition."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from padim.jobs.metrics import image_metrics, pixel_metrics


def _pixel_case(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 24, 24), dtype=bool)
    masks[0, 2:7, 3:9] = True
    masks[1, 10:20, 10:13] = True
    masks[1, 1:3, 18:22] = True  # a second region in the same image
    masks[3, 15:23, 0:5] = True
    maps = rng.random(masks.shape) + masks * rng.uniform(0.2, 0.8)
    maps = np.round(maps, 2).astype(np.float32)  # ties, as real maps have
    return masks, maps


def _reference_aupro(masks, maps, limit=0.3):
    """Straight from the definition: at each threshold, the FPR over defect-free pixels and the mean
    over connected ground-truth regions of the fraction of the region above the threshold."""
    regions = []
    for mask, amap in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, count + 1)]
    negatives = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(negatives >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = list(fprs[keep]), list(pros[keep])
    nxt = np.argmax(fprs > limit)
    if fprs[nxt] > limit:
        x.append(limit)
        y.append(np.interp(limit, [fprs[nxt - 1], fprs[nxt]], [pros[nxt - 1], pros[nxt]]))
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return trapezoid(y, x) / limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_equal_sklearn_and_the_pro_definition(seed):
    masks, maps = _pixel_case(seed)
    ours = pixel_metrics(masks, maps)
    assert ours["pixel_AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)

    # best F1 over all thresholds, by brute force with scikit-learn's f1_score
    f1s = {t: f1_score(masks.ravel(), maps.ravel() >= t) for t in np.unique(maps)}
    best_t = max(f1s, key=f1s.get)
    assert ours["pixel_F1Score"] == pytest.approx(f1s[best_t], abs=1e-12)
    assert ours["pixel_threshold"] == pytest.approx(best_t)

    assert ours["pixel_AUPRO"] == pytest.approx(_reference_aupro(masks, maps), abs=1e-9)
    assert ours["pixel_AUPRO_05"] == pytest.approx(_reference_aupro(masks, maps, limit=0.05), abs=1e-9)
    assert ours["pixel_AUPRO_05"] != pytest.approx(ours["pixel_AUPRO"], abs=1e-3)  # two limits, two areas


def test_perfect_and_inverted_maps_have_known_answers():
    masks, _ = _pixel_case(0)
    perfect = pixel_metrics(masks, masks.astype(np.float32))
    assert perfect["pixel_AUROC"] == 1.0 and perfect["pixel_F1Score"] == 1.0
    assert perfect["pixel_AUPRO"] == pytest.approx(1.0) and perfect["pixel_AUPRO_05"] == pytest.approx(1.0)
    inverted = pixel_metrics(masks, (~masks).astype(np.float32))
    assert inverted["pixel_AUROC"] == 0.0 and inverted["pixel_AUPRO"] == 0.0


def test_image_metrics_equal_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.random(60) < 0.4
    scores = rng.random(60) + labels * 0.3
    ours = image_metrics(labels, scores)
    assert ours["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores))
    best = max(f1_score(labels, scores >= t) for t in scores)
    assert ours["image_F1Score"] == pytest.approx(best)
    assert f1_score(labels, scores >= ours["image_threshold"]) == pytest.approx(best)
