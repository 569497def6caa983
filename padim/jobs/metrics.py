"""Per-category metrics: image AUROC / best F1 (scikit-learn), pixel AUROC / best F1 / AUPRO.

Pixel metrics run over every test pixel (tens of millions for a category), so they share one sort:
true- and false-positive counts at every distinct threshold give the ROC curve, the F1 curve and,
with per-region weights, the PRO curve. scikit-learn would sort the same pixels once per metric.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

PRO_FPR_LIMIT = 0.3  # MVTec AD protocol: integrate the PRO curve up to a false-positive rate of 30 %
# MVTec AD 2 (2025) integrates to 5 %: small defects vanish in the area up to 30 %, which even a map that
# flags a tenth of the good pixels fills; up to 5 % only maps that find them with few false pixels score
PRO_FPR_STRICT = 0.05


def best_f1(labels: np.ndarray, scores: np.ndarray):
    """Highest F1 over all thresholds (as anomalib's adaptive threshold) and that threshold."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> Dict[str, float]:
    """labels: (N,) 0/1, scores: (N,) -> image_AUROC, image_F1Score, image_threshold."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    f1, threshold = best_f1(labels, scores)
    return {"image_AUROC": float(roc_auc_score(labels, scores)), "image_F1Score": f1, "image_threshold": threshold}


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N * H * W,) float64: 1 / (region area * number of regions) on each pixel of a
    connected defect region (8-connectivity, as the MVTec AD evaluation code), 0 elsewhere. Summed over
    the pixels above a threshold this is the mean per-region overlap."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        areas = np.bincount(labelled.ravel())  # areas[0] is the background
        weights[i] = np.where(labelled > 0, 1.0 / areas[labelled], 0.0)
        n_regions += count
    return (weights / max(n_regions, 1)).reshape(-1)


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT,
                  roc_points: int = 0, valid: Optional[np.ndarray] = None) -> Dict[str, float]:
    """masks: (N, H, W) bool ground truth; maps: (N, H, W) anomaly maps; valid: (H, W) bool, the
    pixels that count (a model's ignore mask left out; None: all). A defect region's overlap is
    measured on its valid pixels.

    Returns pixel_AUROC, pixel_F1Score, pixel_threshold (the F1-maximising one), pixel_AUPRO
    (area under the per-region-overlap vs false-positive-rate curve up to ``fpr_limit``, divided by it)
    and pixel_AUPRO_05 (the same up to ``PRO_FPR_STRICT``, 0.05).
    With ``roc_points`` > 0, also "pixel_roc_curve": (fpr, tpr) arrays of about that many points, for plots.
    """
    masks = np.asarray(masks, dtype=bool)
    if valid is not None:
        masks = masks & valid  # ignored pixels belong to no region
    region_weights = _region_weights(masks).reshape(masks.shape)
    if valid is not None:
        masks, maps, region_weights = masks[:, valid], np.asarray(maps)[:, valid], region_weights[:, valid]
    labels = torch.from_numpy(masks.reshape(-1))
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("pixel metrics need both defect and defect-free pixels")
    scores, order = torch.sort(torch.as_tensor(np.asarray(maps, dtype=np.float32)).reshape(-1), descending=True)
    # the last index of every run of equal scores: a threshold keeps all of a tie or none of it
    ends = torch.nonzero(scores[1:] != scores[:-1]).squeeze(1)
    ends = torch.cat([ends, torch.tensor([scores.numel() - 1])])

    tp = torch.cumsum(labels[order], 0, dtype=torch.int64)[ends].double()
    fp = (ends + 1).double() - tp
    tpr, fpr = tp / n_pos, fp / n_neg
    zero = torch.zeros(1, dtype=torch.float64)
    auroc = torch.trapezoid(torch.cat([zero, tpr]), torch.cat([zero, fpr])).item()

    precision = tp / (tp + fp)
    f1 = 2 * precision * tpr / (precision + tpr).clamp_min(1e-300)
    best = int(torch.argmax(f1))

    overlap = torch.cumsum(torch.from_numpy(np.ascontiguousarray(region_weights).reshape(-1))[order], 0)[ends]
    curve = torch.cat([zero, fpr]), torch.cat([zero, overlap])
    result = {
        "pixel_AUROC": auroc,
        "pixel_F1Score": float(f1[best]),
        "pixel_threshold": float(scores[ends[best]]),
        "pixel_AUPRO": _partial_area(*curve, fpr_limit) / fpr_limit,
        "pixel_AUPRO_05": _partial_area(*curve, PRO_FPR_STRICT) / PRO_FPR_STRICT,
    }
    if roc_points > 0:
        keep = torch.unique(torch.linspace(0, len(fpr) - 1, roc_points).round().long())
        result["pixel_roc_curve"] = (np.r_[0.0, fpr[keep].numpy()], np.r_[0.0, tpr[keep].numpy()])
    return result


def _partial_area(x: torch.Tensor, y: torch.Tensor, limit: float) -> float:
    """Trapezoidal area under y(x) for x in [0, limit], x ascending; y interpolated at ``limit``."""
    inside = int(torch.searchsorted(x, torch.tensor([limit], dtype=x.dtype), right=True))
    xs, ys = x[:inside], y[:inside]
    if inside < len(x):
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs = torch.cat([xs, torch.tensor([limit], dtype=x.dtype)])
        ys = torch.cat([ys, y_limit.view(1)])
    return torch.trapezoid(ys, xs).item()
