"""Testing a fitted model on a category: scores, maps, masks -> metrics and thresholds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from .data.mvtec import Category
from .images import load_mask, open_image, resize_crop
from .metrics import image_metrics, pixel_metrics
from .model import PaDiM
from .visualize import heatmap_overlay, save_png

METRIC_KEYS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO")
THRESHOLDS_NOTE = "thresholds maximise F1 on the test set: an optimistic choice, not validated on held-out data"


@dataclass
class Evaluation:
    metrics: Dict[str, float]  # the METRIC_KEYS plus image_threshold, pixel_threshold
    scores: np.ndarray  # (N,) image scores, in ``category.test`` order
    test_seconds: float
    defects_without_mask: List[Path]


def evaluate(model: PaDiM, category: Category, images_dir: Optional[Path] = None) -> Evaluation:
    """Scores every test image of ``category``; pixel metrics use the images that have ground truth
    (good images, defect images with a mask). With ``images_dir``, writes a heatmap overlay per image.

    Holds the maps of the category at the model's input size: N * H * W float32 (150 MB for 600
    images at 256 x 256), needed for pixel metrics over all thresholds.
    """
    samples = category.test
    scores, maps, masks = [], [], []
    started = time.perf_counter()
    for batch_scores, batch_maps, sizes in model.iter_predict([s.path for s in samples], desc=f"test {category.name}"):
        for anomaly_map, size in zip(batch_maps, sizes):
            sample = samples[len(maps)]
            maps.append(anomaly_map)
            if sample.mask is not None:
                masks.append(load_mask(sample.mask, model.config_, size))
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
    metrics.update(pixel_metrics(
        torch.stack([masks[i] for i in with_truth]).numpy(), torch.stack([maps[i] for i in with_truth]).numpy()
    ))
    if images_dir is not None:
        _save_overlays(model, samples, maps, Path(images_dir), metrics["pixel_threshold"])
    return Evaluation(metrics, scores, test_seconds, [s.path for s in category.defects_without_mask])


def _save_overlays(model: PaDiM, samples, maps, images_dir: Path, pixel_threshold: float) -> None:
    """One heatmap overlay per test image, images_dir/<defect>/<stem>.png, on a shared colour scale
    (0 to twice the pixel threshold) so that images can be compared."""
    for sample, anomaly_map in zip(samples, maps):
        base = resize_crop(open_image(sample.path).convert("RGB"), model.config_, Image.BILINEAR)
        overlay = heatmap_overlay(base, anomaly_map.numpy(), 0.0, 2 * pixel_threshold)
        save_png(overlay, images_dir / sample.defect / f"{sample.path.stem}.png")
