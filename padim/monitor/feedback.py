"""Operators' verdicts against the model's (issues 23, 28): ``OverrideCounter`` keeps the verdicts of
recent requests, by model version, and the operators' truth -> counts, the override rate (how often
the operator disagrees), and each version's counts for its live accuracy (``padim.monitor.accuracy``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence

from padim.monitor.decision_log import TRUTHS, VERDICTS, DecisionLogError


class OverrideCounter:
    """Operator feedback against the model's verdicts.

    ``remember(request_id, labels, version)``: a response's verdicts ("good" / "anomalous" / None per
    image) and the model version (its SHA-256) that gave them, kept for the last ``max_requests``
    requests. ``feedback(request_id, index, truth)`` ("good" / "defect") records the operator's
    verdict (a second one for the same image replaces the first) and returns {"verdict", "truth",
    "override"}. ``state()``: counts and override rate, JSON-ready; ``by_version()``: the counts of
    each version; ``truth(request_id, index)``: the operator's verdict on an image, or None.
    """

    def __init__(self, max_requests: int = 100_000):
        self.max_requests = max_requests
        self._verdicts: "OrderedDict[str, tuple]" = OrderedDict()  # request_id -> (labels, version)
        self._truths: "dict[tuple, str]" = {}
        self._counts = {(v, t): 0 for v in VERDICTS for t in TRUTHS}
        self._versions: "dict[Optional[str], dict]" = {}
        self._lock = threading.Lock()

    def remember(self, request_id: str, labels: Sequence[Optional[str]], version: Optional[str] = None) -> None:
        with self._lock:
            self._verdicts[str(request_id)] = (list(labels), version)
            self._verdicts.move_to_end(str(request_id))
            while len(self._verdicts) > self.max_requests:
                old, _ = self._verdicts.popitem(last=False)
                for key in [k for k in self._truths if k[0] == old]:
                    del self._truths[key]  # its counts stay: they were real feedback

    def feedback(self, request_id: str, index: int, truth: str) -> dict:
        if truth not in TRUTHS:
            raise DecisionLogError(f"truth must be 'good' or 'defect', got {truth!r}")
        with self._lock:
            labels, version = self._verdicts.get(str(request_id), (None, None))
            if labels is None:
                raise DecisionLogError(f"unknown request_id {request_id!r} (or older than the last "
                                       f"{self.max_requests})")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(labels):
                raise DecisionLogError(f"index must be an integer in [0, {len(labels)}) for this request, "
                                       f"got {index!r}")
            verdict = labels[index]
            if verdict not in VERDICTS:
                raise DecisionLogError("that image has no verdict (the model had no threshold)")
            key = (str(request_id), index)
            counts = self._versions.setdefault(version, {(v, t): 0 for v in VERDICTS for t in TRUTHS})
            if key in self._truths:
                self._counts[(verdict, self._truths[key])] -= 1
                counts[(verdict, self._truths[key])] -= 1
            self._truths[key] = truth
            self._counts[(verdict, truth)] += 1
            counts[(verdict, truth)] += 1
        return {"verdict": verdict, "truth": truth, "override": (verdict == "anomalous") != (truth == "defect")}

    def truth(self, request_id: str, index: int) -> Optional[str]:
        with self._lock:
            return self._truths.get((str(request_id), index))

    def state(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
        return summarise(counts)

    def by_version(self) -> "dict[Optional[str], dict]":
        """{version: ``state()`` of the verdicts that version gave}."""
        with self._lock:
            versions = {version: dict(counts) for version, counts in self._versions.items()}
        return {version: summarise(counts) for version, counts in versions.items()}


def summarise(counts: dict) -> dict:
    """{(verdict, truth): n} -> feedback, overrides, override rate, missed defects, false alarms, counts."""
    total = sum(counts.values())
    overrides = counts[("good", "defect")] + counts[("anomalous", "good")]
    return {"feedback": total, "overrides": overrides, "override_rate": overrides / total if total else None,
            "missed_defects": counts[("good", "defect")], "false_alarms": counts[("anomalous", "good")],
            "counts": {f"{v}/{t}": n for (v, t), n in counts.items()}}
