"""Watching a served model over months (issue 23): drift alarms with a false-alarm guarantee
(``padim.monitor.drift``) and an append-only decision log, kept flagged images and operator feedback
(``padim.monitor.decision_log``).

NumPy and the standard library only: no torch, no scipy, so both work in the torch-free runtime.
"""

from padim.monitor.decision_log import DecisionLog, DecisionLogError, FlaggedStore
from padim.monitor.feedback import OverrideCounter
from padim.monitor.drift import DriftError, DriftMonitor

# What an alarm of each stream says, in the words the service and padim predict print.
STREAM_MEANING = {
    "all": "the scores of all images moved against the calibration images: more defects than usual, or the "
           "picture changed (if stream good alarms too)",
    "good": "the scores of the images the model calls good moved: the picture changed (lighting, camera, "
            "material, focus), not only the defect rate",
}

__all__ = ["DecisionLog", "DecisionLogError", "DriftError", "DriftMonitor", "FlaggedStore", "OverrideCounter",
           "STREAM_MEANING"]
