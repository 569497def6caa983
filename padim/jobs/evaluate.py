"""Testing a fitted model on a category: scores, maps, masks -> metrics and thresholds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from padim.settings.calibration import labels_at, masks_at
from padim.data.mvtec import Category
from padim.files.images import load_mask, load_pixels
from padim.pipeline.records import ignored_pixels
from padim.jobs.metrics import image_metrics, pixel_metrics
from padim.core.estimator import PaDiM

METRIC_KEYS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO", "pixel_AUPRO_05")
# at the model's calibrated operating point (None without calibration): what a line would see
CALIBRATED_KEYS = ("image_F1_calibrated", "image_recall_calibrated", "good_FPR_calibrated", "pixel_F1_calibrated")
PIXEL_KEYS = ("pixel_AUROC", "pixel_F1Score", "pixel_AUPRO", "pixel_AUPRO_05", "pixel_threshold")  # None when not available
THRESHOLDS_NOTE = "thresholds maximise F1 on the test set: an optimistic choice, not validated on held-out data"


GOOD_PANELS = 3  # highest-scoring good images shown beside the defects: the false-positive check


@dataclass
class Evaluation:
    metrics: Dict[str, float]  # the METRIC_KEYS plus image_threshold, pixel_threshold
    scores: np.ndarray  # (N,) image scores, in ``category.test`` order
    test_seconds: float
    defects_without_mask: List[Path]
    defects_with_empty_mask: List[Path] = field(default_factory=list)  # all-black masks: no ground truth
    pictures: List[Path] = field(default_factory=list)  # curves, histogram, then panels


def calibrated_metrics(labels: np.ndarray, scores: np.ndarray, image_threshold: Optional[float],
                       masks: Optional[np.ndarray], maps: Optional[np.ndarray],
                       pixel_threshold: Optional[float]) -> Dict[str, Optional[float]]:
    """Metrics at fixed thresholds (anomalous iff score >= threshold): image F1, recall (defect images
    caught), good_FPR (good images flagged), and pixel F1 over the pixels with ground truth.
    labels: (N,) bool; scores: (N,); masks, maps: (M, H, W). None where a threshold is missing."""
    out = dict.fromkeys(CALIBRATED_KEYS)
    if image_threshold is not None:
        flagged = labels_at(scores, image_threshold)  # the one decision rule (a float32 score at the cut too)
        labels = np.asarray(labels, dtype=bool)
        out["image_F1_calibrated"] = _f1(flagged, labels)
        out["image_recall_calibrated"] = float(flagged[labels].mean()) if labels.any() else None
        out["good_FPR_calibrated"] = float(flagged[~labels].mean()) if (~labels).any() else None
    if pixel_threshold is not None and masks is not None and len(masks):
        out["pixel_F1_calibrated"] = _f1(masks_at(np.asarray(maps), pixel_threshold), np.asarray(masks, dtype=bool))
    return out


def _f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    true_positives = int(np.count_nonzero(predicted & truth))
    denominator = int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
    return 2.0 * true_positives / denominator if denominator else 0.0


def evaluate(model: PaDiM, category: Category, pictures_dir: Optional[Path] = None,
             max_images: Optional[int] = None, calibrated=None, iter_predict=None) -> Evaluation:
    """Scores every test image of ``category``; pixel metrics use the images that have ground truth
    (good images, defect images with a mask that marks some pixel). When no defect image has such a
    mask, the pixel metrics and the pixel threshold are None (not available), not an error. With
    ``pictures_dir``, also draws the ROC curves (no pixel curve then), the score histogram and a panel
    per defect image (the ``max_images`` highest-scoring ones when set) plus the highest-scoring good
    images. ``calibrated``: the operating point of the ``*_calibrated`` metrics (default: the fit's
    calibrated targets; those metrics are None without calibration).

    Holds the maps of the category at the model's input size: N * H * W float32 (150 MB for 600
    images at 256 x 256), needed for pixel metrics over all thresholds.
    iter_predict: what scores the images (default ``model.iter_predict``; an engine's, see
    ``padim.deploy.engines.as_torch``).
    """
    samples = category.test
    scores, maps, masks = [], [], []
    started = time.perf_counter()
    empty = []  # defect images whose mask marks nothing
    scorer = iter_predict or model.iter_predict
    for batch_scores, batch_maps, sizes in scorer([s.path for s in samples], desc=f"test {category.name}"):
        for anomaly_map, size in zip(batch_maps, sizes):
            sample = samples[len(maps)]
            maps.append(anomaly_map)
            mask = load_mask(sample.mask, model.config_, size) if sample.mask is not None else None
            if mask is not None and sample.is_anomalous and not mask.any():
                empty.append(sample.path)
                masks.append(None)  # an all-black mask on a defect image: no ground truth
            elif mask is not None:
                masks.append(mask)
            elif not sample.is_anomalous:
                masks.append(torch.zeros(anomaly_map.shape, dtype=torch.bool))
            else:
                masks.append(None)  # a defect without ground truth: image metrics only
        scores.append(batch_scores)
    test_seconds = time.perf_counter() - started

    scores = torch.cat(scores).numpy()
    labels = np.array([s.is_anomalous for s in samples])
    metrics = image_metrics(labels, scores)
    with_truth = [i for i, mask in enumerate(masks) if mask is not None]
    ignore = ignored_pixels(model)
    valid = None if ignore is None else ~ignore  # pixels that count: the model's ignore mask left out
    if any((masks[i] if valid is None else masks[i] & torch.from_numpy(valid)).any() for i in with_truth):
        metrics.update(pixel_metrics(
            torch.stack([masks[i] for i in with_truth]).numpy(), torch.stack([maps[i] for i in with_truth]).numpy(),
            roc_points=500, valid=valid,
        ))
        pixel_roc = metrics.pop("pixel_roc_curve")
        truth, pixel_maps = (np.stack([masks[i].numpy() for i in with_truth]),
                             np.stack([maps[i].numpy() for i in with_truth]))
        if valid is not None:
            truth, pixel_maps = truth[:, valid], pixel_maps[:, valid]
    else:  # no defect pixel anywhere: pixel AUROC, F1 and AUPRO are undefined
        metrics.update({key: None for key in PIXEL_KEYS})
        pixel_roc = truth = pixel_maps = None
    if calibrated is None and model.calibration_ is not None:  # the fit's calibrated operating point
        calibrated = model.operating_point(target_fpr=model.target_fpr_ or model.target_fpr,
                                           target_pixel_fpr=model.target_pixel_fpr)
    metrics.update(calibrated_metrics(labels, scores, calibrated.image_threshold if calibrated else None, truth,
                                      pixel_maps, calibrated.pixel_threshold if calibrated else None))
    result = Evaluation(metrics, scores, test_seconds, [s.path for s in category.defects_without_mask], empty)
    if pictures_dir is not None:
        result.pictures = _draw(model, category, result, maps, masks, pixel_roc, Path(pictures_dir), max_images)
    return result


def _draw(model: PaDiM, category: Category, result: Evaluation, maps, masks, pixel_roc,
          folder: Path, max_images: Optional[int]) -> List[Path]:
    """Draws the category's pictures into ``folder``; returns their paths, curves first."""
    from padim.jobs.report import defect_panel, roc_figure, score_histogram

    samples, scores, metrics = category.test, result.scores, result.metrics
    labels = np.array([s.is_anomalous for s in samples])
    roc_path, hist_path = folder / "roc.png", folder / "score_histogram.png"
    roc_figure(labels, scores, metrics["image_AUROC"], pixel_roc, metrics["pixel_AUROC"], roc_path)
    score_histogram(labels, scores, metrics["image_threshold"], hist_path)

    by_score = np.argsort(-scores, kind="stable")
    defects = [i for i in by_score if labels[i]][:max_images]
    goods = [i for i in by_score if not labels[i]][:GOOD_PANELS]
    vmin = float(min(m.min() for m in maps))
    vmax = float(max(m.max() for m in maps))
    pictures = [roc_path, hist_path]
    for i in defects + goods:
        sample = samples[i]
        image = Image.fromarray(load_pixels(sample.path, model.config_)[0])
        mask = masks[i].numpy() if masks[i] is not None else None
        verdict = "" if labels[i] else " (good image: false-positive check)"
        path = folder / "panels" / f"{sample.defect}_{sample.path.stem}.png"
        threshold = metrics["pixel_threshold"] if metrics["pixel_threshold"] is not None else float("inf")
        defect_panel(image, mask, maps[i].numpy() - vmin, threshold - vmin, vmax - vmin,
                     f"{category.name} / {sample.defect} / {sample.path.name}: score {scores[i]:.3g}{verdict}", path)
        pictures.append(path)
    return pictures
