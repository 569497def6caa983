"""Live accuracy of a model version from the operators' verdicts (issue 28): among the pictures an
operator confirmed good, the fraction the version flagged (its false-alarm rate); among those confirmed
defect, the fraction it called good (its missed-defect rate); each with an exact (Clopper-Pearson)
95 % interval, and a warning when the false-alarm rate is above the target beyond its interval.

What it measures is the rate among the pictures operators gave a verdict on: operators who review only
flagged pictures confirm few good ones that were called good, so the false-alarm rate is then an
over-estimate; verdicts on a uniform sample (``padim serve --keep-good-sample``) measure it without bias.

The interval: scipy's ``binomtest(...).proportion_ci(method="exact")``; without scipy (the torch-free
runtime) the estimate is given and the interval is None.
"""

from __future__ import annotations

from typing import Optional

CONFIDENCE = 0.95


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> Optional[list]:
    """[low, high], the exact binomial interval of k successes in n trials; None when n is 0 or scipy
    is missing."""
    if n == 0:
        return None
    try:
        from scipy.stats import binomtest
    except ImportError:
        return None
    interval = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return [float(interval.low), float(interval.high)]


def rate(k: int, n: int) -> dict:
    return {"rate": k / n if n else None, "interval": clopper_pearson(k, n), "errors": k, "of": n}


def live_accuracy(counts: dict, target_fpr: Optional[float]) -> dict:
    """``counts``: {"verdict/truth": n} (``padim.monitor.feedback.summarise``) -> {"false_alarms": rate among
    confirmed good, "missed_defects": rate among confirmed defects, "confidence", "warning"}."""
    alarms, good = counts.get("anomalous/good", 0), counts.get("anomalous/good", 0) + counts.get("good/good", 0)
    missed, defects = counts.get("good/defect", 0), counts.get("good/defect", 0) + counts.get("anomalous/defect", 0)
    false_alarms = rate(alarms, good)
    warning = None
    interval = false_alarms["interval"]
    if target_fpr is not None and interval is not None and interval[0] > target_fpr:
        warning = (f"false alarms on {alarms} of {good} pictures confirmed good ({100 * alarms / good:.1f} %, "
                   f"95 % interval {100 * interval[0]:.1f}-{100 * interval[1]:.1f} %) are above the target "
                   f"{100 * target_fpr:.3g} %: the pictures changed (recalibrate) or the verdicts are not a sample "
                   "of all pictures")
    return {"false_alarms": false_alarms, "missed_defects": rate(missed, defects), "confidence": CONFIDENCE,
            "target_fpr": target_fpr, "warning": warning}
