"""Watching a served model over months (issue 23): drift alarms with a false-alarm guarantee
(``padim.monitor.drift``) and an append-only decision log, kept flagged images and operator feedback
(``padim.monitor.decision_log``).

NumPy and the standard library only: no torch, no scipy, so both work in the torch-free runtime.
"""

from padim.monitor.decision_log import DecisionLog, DecisionLogError, FlaggedStore, OverrideCounter
from padim.monitor.drift import DriftError, DriftMonitor

__all__ = ["DecisionLog", "DecisionLogError", "DriftError", "DriftMonitor", "FlaggedStore", "OverrideCounter"]
