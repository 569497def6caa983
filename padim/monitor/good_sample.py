"""A uniform sample of the pictures a service scored since the last drift alarm, kept on disk: where
recalibration (``POST /models/NAME/recalibrate``) takes its new good pictures from (issue 28).

Why a uniform sample of *every* picture, not of the pictures the model judged good: after a change
the model flags many good pictures, so the ones it still calls good are those below the old
threshold, a sample cut off at the top; thresholds computed from it come out too low and the new
false-alarm rate too high. A uniform sample, of which the operators confirm the good ones, is
exchangeable with the line's good pictures, which is what the split-conformal guarantee needs.

Why since the last alarm: a sample over months would hold few pictures taken after a change;
``restart`` (called by the service on every drift alarm) empties it, so that it fills with pictures
of the new state of the line (the first ``size`` all kept, then each with probability size / t).

Vitter's algorithm R: the t-th picture is kept with probability size / t, in place of a kept one
chosen at random, so every picture seen since the restart is in the sample with probability
size / t. Storage: a ``FlaggedStore`` (atomic image + sidecar pairs; its byte limit drops the oldest
first, which only a sample of pictures larger than the limit reaches); ``seen`` is written beside it
(``.seen``) with each kept picture, not with every one offered (a write per scored picture would
serialise the service on the disk), so a restart of the service counts from the last kept picture.
The operators' verdicts the service matches the sample with are held in memory
(``OverrideCounter``: the last 100,000 requests, not across restarts).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import List, Optional

import numpy as np

from padim.files.atomic import atomic_write
from padim.monitor.decision_log import DecisionLogError, FlaggedStore


class GoodSample:
    """``GoodSample(folder, size, max_bytes, seed)``; ``offer(data, metadata, name)`` for every scored
    picture; ``items()`` the kept images, oldest first; ``restart()`` empties it."""

    def __init__(self, folder, size: int, max_bytes: float, seed: Optional[int] = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DecisionLogError(f"`keep_good_sample` must be a whole number of at least 1, got {size!r}")
        self.store, self.size = FlaggedStore(folder, max_bytes), size
        self._seen_file = Path(folder) / ".seen"
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.seen = max(self._read_seen(), len(self.store.items()))

    def _read_seen(self) -> int:
        try:
            value = json.loads(self._seen_file.read_text())
        except (OSError, ValueError):
            return 0
        return value if isinstance(value, int) and value >= 0 else 0

    def _write_seen(self) -> None:
        atomic_write(self._seen_file, lambda f: f.write(str(self.seen).encode()), DecisionLogError, "sample count")

    def offer(self, data: bytes, metadata: dict, name: str) -> Optional[Path]:
        """The t-th picture since the restart: kept with probability size / t -> its path, or None."""
        with self._lock:
            self.seen += 1
            kept = self.store.items()
            replace = None
            if len(kept) >= self.size:
                slot = int(self._rng.integers(self.seen))
                if slot >= self.size:
                    return None  # not kept: nothing written (``seen`` is saved with the next kept one)
                replace = kept[min(slot, len(kept) - 1)]
            if replace is not None:
                self.store.remove(replace)
            path = self.store.add(data, metadata, name)
            self._write_seen()
            return path

    def items(self) -> List[Path]:
        return self.store.items()

    def metadata(self, image: Path) -> dict:
        return self.store.metadata(image)

    def restart(self) -> None:
        """Empties the sample (a drift alarm: the pictures before it are of another state of the line)."""
        with self._lock:
            for image in self.store.items():
                self.store.remove(image)
            self.seen = 0
            self._write_seen()
