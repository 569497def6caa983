"""Thresholds from good images alone: split-conformal calibration of image scores, pixel-score
quantiles for masks, and the operating point a prediction uses.

The guarantee (split conformal prediction): let s_(1) <= ... <= s_(n) be the image scores of n good
images the Gaussians were not fitted on. For a new good image exchangeable with them (same line,
lighting, camera), P(score > s_(k)) <= alpha with k = ceil((n + 1)(1 - alpha)): flagging scores
above s_(k) flags at most a fraction alpha of good images, on average over calibration sets. It needs
k <= n, i.e. n >= 1 / alpha - 1 (19 images for 5 %, 99 for 1 %); with fewer, the threshold is the
highest calibration score, which guarantees 1 / (n + 1), and the threshold's source says so. It says
nothing about defects (recall), and nothing once the images drift (new lighting, a new camera): then
recalibrate.

Shapes: n calibration images; N scored images; Q stored pixel-score quantiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from padim.errors import PadimError

DEFAULT_CALIBRATION_FRACTION = 0.1
MIN_CALIBRATION_IMAGES = 20  # 19 guarantee a 5 % false-positive rate; one more for margin
DEFAULT_TARGET_FPR = 0.05
DEFAULT_TARGET_PIXEL_FPR = 0.01

# Levels of the stored pixel-score quantiles: evenly spaced, plus a fine tail (1 - 1e-6 .. 0.99),
# where pixel thresholds live. Q = 2049 + 1025 levels, a few kB per model.
PIXEL_LEVELS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 2049), 1.0 - np.logspace(-6, -2, 1025)]))

SOURCE_MANUAL = "manual"
SOURCE_TEST_SET = "test set (optimistic)"


class CalibrationError(PadimError):
    """A calibrated threshold was asked for that the calibration data cannot give."""


def calibration_size(n_images: int, fraction: float) -> int:
    """How many of ``n_images`` training images to hold out: ``fraction`` of them, at least
    ``MIN_CALIBRATION_IMAGES``, and 0 when that would leave fewer images to fit on than to calibrate
    with (or ``fraction`` is 0)."""
    if not 0.0 <= fraction < 1.0:
        raise PadimError(f"calibration fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return 0
    n_calibration = max(MIN_CALIBRATION_IMAGES, round(fraction * n_images))
    return n_calibration if n_images - n_calibration >= n_calibration else 0


def split_indices(n_images: int, n_calibration: int, seed: int):
    """A seeded split of range(n_images) -> (fit indices, calibration indices), each sorted."""
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[n_calibration:]), np.sort(order[:n_calibration])


def percent(alpha: float) -> str:
    return f"{100 * alpha:.3g}%"


def needed(alpha: float) -> int:
    """Calibration images a target false-positive rate needs: n >= 1 / alpha - 1."""
    return math.ceil(1.0 / alpha - 1.0 - 1e-9)


@dataclass(frozen=True)
class Calibration:
    """Scores of good images the model's Gaussians did not see.

    image_scores:    (n,) image scores, sorted ascending
    pixel_levels:    (Q,) probabilities, ascending; pixel_quantiles: (Q,) the calibration maps'
                     pixel scores at those levels
    method:          "holdout" (scored by the final model) or "cv" (each fold scored by the model
                     fitted without it; the final model saw every image)
    """

    image_scores: np.ndarray
    pixel_levels: np.ndarray
    pixel_quantiles: np.ndarray
    method: str = "holdout"

    @classmethod
    def from_scores(cls, image_scores: Sequence[float], pixel_scores: np.ndarray, method: str = "holdout",
                    ignore: Optional[np.ndarray] = None) -> "Calibration":
        """image_scores: (n,); pixel_scores: the calibration maps (n, H, W), or any shape without ``ignore``;
        ignore: (H, W) bool, pixels that never count: left out of the quantiles (their map is 0)."""
        pixels = np.asarray(pixel_scores)
        pixels = (pixels if ignore is None else pixels[:, ~np.asarray(ignore, dtype=bool)]).ravel()  # float32 stays
        return cls(np.sort(np.asarray(image_scores, dtype=np.float64)), PIXEL_LEVELS.copy(),
                   np.quantile(pixels, PIXEL_LEVELS).astype(np.float64), method)

    @property
    def n(self) -> int:
        return len(self.image_scores)

    def smallest_target(self) -> float:
        """The smallest target false-positive rate n images can guarantee: 1 / (n + 1)."""
        return 1.0 / (self.n + 1)

    def rank(self, alpha: float) -> int:
        """k = ceil((n + 1)(1 - alpha)), the order statistic whose score is the cut (may exceed n)."""
        if not 0.0 < alpha < 1.0:
            raise CalibrationError(f"target false-positive rate must be in (0, 1), got {alpha}")
        return max(1, math.ceil((self.n + 1) * (1.0 - alpha) - 1e-9))  # the tolerance keeps 0.95 * 20 at 19

    def guaranteed(self, alpha: float) -> float:
        """The false-positive rate the threshold for ``alpha`` guarantees: alpha, or 1 / (n + 1) when
        n is too small for alpha (the threshold is then the largest calibration score)."""
        return alpha if self.rank(alpha) <= self.n else self.smallest_target()

    def image_threshold(self, alpha: float) -> float:
        """The cut with P(good image flagged) <= alpha: anomalous iff score >= the returned value,
        the next float above s_(k). When n is too small for alpha (k > n), the largest calibration
        score takes its place and the guarantee is 1 / (n + 1) instead (``describe`` says so)."""
        k = min(self.rank(alpha), self.n)
        return float(np.nextafter(self.image_scores[k - 1], np.inf))

    def p_values(self, scores) -> np.ndarray:
        """(N,) conformal p-values (1 + #{calibration scores >= s}) / (n + 1): small when a score is
        high for a good image; a good image's p-value is (super-)uniform."""
        scores = np.asarray(scores, dtype=np.float64)
        at_least = self.n - np.searchsorted(self.image_scores, scores, side="left")
        return (1.0 + at_least) / (self.n + 1.0)

    def pixel_threshold(self, pixel_fpr: float) -> float:
        """The pixel score above which a fraction ``pixel_fpr`` of the calibration images' pixels lie
        (an empirical quantile: pixels of one image are not exchangeable, so no guarantee)."""
        if not 0.0 < pixel_fpr < 1.0:
            raise CalibrationError(f"target pixel false-positive rate must be in (0, 1), got {pixel_fpr}")
        return float(np.interp(1.0 - pixel_fpr, self.pixel_levels, self.pixel_quantiles))

    def describe(self, alpha: float) -> str:
        """The image threshold's source, as predictions report it; says so when n is too small."""
        how = "" if self.method == "holdout" else ", cross-fitted"
        if self.rank(alpha) > self.n:
            return (f"calibration: target FPR {percent(alpha)} asked, but {self.n} good images guarantee only "
                    f"{percent(self.smallest_target())} (threshold at their highest score; {needed(alpha)} "
                    f"would be needed){how}")
        return f"calibration: target FPR {percent(alpha)} on {self.n} good images{how}"

    def describe_pixels(self, pixel_fpr: float) -> str:
        return f"calibration: {percent(pixel_fpr)} of the pixels of {self.n} good images above it"


def at_least(values, threshold: float) -> np.ndarray:
    """values >= threshold, exactly as real numbers. Why not plain ``>=``: NumPy 2 compares a float32
    array with a Python float in float32, which rounds a threshold such as nextafter(s_k) (float64)
    back onto s_k and would flag a score equal to s_k. float32 arrays are compared with the smallest
    float32 at or above the threshold instead (no float64 copy of a big map)."""
    values = np.asarray(values)
    if values.dtype == np.float32:
        cut = np.float32(threshold)
        if float(cut) < threshold:
            cut = np.nextafter(cut, np.float32(np.inf))
        return values >= cut
    return values.astype(np.float64, copy=False) >= float(threshold)


def labels_at(scores, threshold: Optional[float]) -> Optional[np.ndarray]:
    """(N,) bool: anomalous where score >= threshold (a score at the threshold is anomalous); None
    without a threshold."""
    return None if threshold is None else at_least(scores, threshold)


def masks_at(maps, threshold: Optional[float]):
    """Like ``maps`` (an array or a list of arrays), bool: defect where map >= threshold; None
    without a threshold."""
    if threshold is None:
        return None
    return at_least(maps, threshold) if isinstance(maps, np.ndarray) else [at_least(m, threshold) for m in maps]


@dataclass
class PadimResult:
    """What ``PaDiM.predict`` returns for N images.

    scores: (N,) image anomaly scores (max of each map)
    maps:   (N, H, W) anomaly maps at the model's input size, or a list of (H_i, W_i) maps at each
            image's original resolution
    labels: (N,) bool, score >= image threshold; None when the model has no threshold
    masks:  like ``maps`` but bool, map >= pixel threshold; None when the model has no pixel threshold
    p_values: (N,) conformal p-values against the model's calibration images; None without calibration
    image_threshold, pixel_threshold: the thresholds used (None: none)
    threshold_source, pixel_threshold_source: where they came from, e.g. "calibration: target FPR 5%
            on 76 good images", "manual" or "test set (optimistic)"
    index:  (N,) the input position of each row (``predict(..., errors="record")`` leaves out the
            images it could not read)
    errors: [(input position, name, one-line message)] of the images that could not be read
    """

    scores: np.ndarray
    maps: Union[np.ndarray, List[np.ndarray]]
    labels: Optional[np.ndarray] = None
    masks: Optional[Union[np.ndarray, List[np.ndarray]]] = None
    p_values: Optional[np.ndarray] = None
    image_threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None
    threshold_source: Optional[str] = None
    pixel_threshold_source: Optional[str] = None
    index: Optional[np.ndarray] = None
    errors: List[Tuple[int, str, str]] = field(default_factory=list)


def decide(batches, point: "OperatingPoint", p_values, resize=None) -> PadimResult:
    """Gathers scored batches into a ``PadimResult`` and decides at ``point``: the one assembly of
    ``PaDiM.predict`` and the torch-free ``ExportedModel.predict``.

    batches: iterable of (scores (B,), maps (B, H, W), original sizes [(h, w)]), arrays or CPU tensors;
    p_values: scores -> (N,) p-values or None; resize: (map (H, W), (h, w)) -> map at that size, to
    return each map at its image's original resolution, or None for maps at the model's input size.
    """
    scores, maps = [], []
    for batch_scores, batch_maps, sizes in batches:
        scores.append(np.asarray(batch_scores))
        if resize is not None:
            maps += [resize(m, hw) for m, hw in zip(batch_maps, sizes)]
        else:
            maps.append(np.asarray(batch_maps))
    scores = np.concatenate(scores)
    maps = maps if resize is not None else np.concatenate(maps)
    return PadimResult(scores=scores, maps=maps, labels=labels_at(scores, point.image_threshold),
                       masks=masks_at(maps, point.pixel_threshold), p_values=p_values(scores),
                       image_threshold=point.image_threshold, pixel_threshold=point.pixel_threshold,
                       threshold_source=point.source, pixel_threshold_source=point.pixel_source)


@dataclass(frozen=True)
class OperatingPoint:
    """The thresholds a prediction uses and where each came from. A score >= image threshold is
    anomalous; a pixel >= pixel threshold is defect. None: no such threshold."""

    image_threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None
    source: Optional[str] = None  # of the image threshold: "calibration: ...", "manual", "test set (optimistic)"
    pixel_source: Optional[str] = None
    target_fpr: Optional[float] = None
    warning: Optional[str] = None  # set when the calibration cannot guarantee target_fpr


def operating_point(calibration: Optional[Calibration], stored: OperatingPoint, target_fpr: Optional[float] = None,
                    image_threshold: Optional[float] = None, pixel_threshold: Optional[float] = None,
                    target_pixel_fpr: Optional[float] = None) -> OperatingPoint:
    """The operating point for one prediction, without changing the model: a threshold given by hand
    ("manual"), or a target false-positive rate (needs calibration), else what the model stores.
    A target the calibration set is too small for uses its highest score, with ``warning`` set and
    the source saying so: never a silent fallback. Impossible choices raise CalibrationError."""
    for name, value in (("image threshold", image_threshold), ("pixel threshold", pixel_threshold)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise CalibrationError(f"the {name} must be a finite number, got {value!r}")
    if target_fpr is not None and image_threshold is not None:
        raise CalibrationError("give a target false-positive rate or an image threshold, not both")
    if target_pixel_fpr is not None and pixel_threshold is not None:
        raise CalibrationError("give a target pixel false-positive rate or a pixel threshold, not both")
    if (target_fpr is not None or target_pixel_fpr is not None) and calibration is None:
        raise CalibrationError("this model has no calibration (fitted with `calibration_fraction` 0, with too few "
                               "training images, or by an older padim): give `image_threshold`/`pixel_threshold` by hand")
    image, source, target = stored.image_threshold, stored.source, stored.target_fpr
    pixel, pixel_source = stored.pixel_threshold, stored.pixel_source
    if image_threshold is not None:
        image, source, target = float(image_threshold), SOURCE_MANUAL, None
    elif target_fpr is not None:
        image, source, target = calibration.image_threshold(target_fpr), calibration.describe(target_fpr), target_fpr
    warning = None
    if target is not None and calibration is not None and calibration.rank(target) > calibration.n:
        warning = f"warning: {source}"
    if pixel_threshold is not None:
        pixel, pixel_source = float(pixel_threshold), SOURCE_MANUAL
    elif target_pixel_fpr is not None:
        pixel, pixel_source = calibration.pixel_threshold(target_pixel_fpr), calibration.describe_pixels(target_pixel_fpr)
    return OperatingPoint(image, pixel, source, pixel_source, target, warning)
