"""``ServeSettings``: every setting of a server, checked in one line before any work. Plain Python
(no FastAPI): ``padim.cli.checks`` checks ``padim serve``'s options with it before anything loads."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from padim.errors import PadimError


def check_drift_delta(value, name: str = "drift_delta") -> None:
    """The drift alarm's false-alarm probability: a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise PadimError(f"`{name}` must be in (0, 1) (the probability of a false drift alarm, e.g. 0.01), "
                         f"got {value!r}")


def check_webhook(url: Optional[str]) -> None:
    """None, or an http(s) URL with a host."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PadimError(f"`webhook` must be an http:// or https:// URL with a host, got {url[:80]!r}")


@dataclass(frozen=True)
class ServeSettings:
    """max_batch: images per backbone batch (1: no batching); max_wait_ms: how long the first image
    of a batch waits for others; queue: images waiting per model before 503; max_upload_mb: body
    size per request; max_files: files per request; api_key: bearer token required on every route
    but /health (None: none; an empty or blank key is refused); decode_workers: threads decoding
    uploads and drawing heatmaps.

    On a line for months (issue 23): drift_delta: each drift stream's false-alarm probability;
    drift_seed: seed of its tie-breaking (None: fresh; tests fix it); webhook: URL POSTed each alarm
    (None: none), with webhook_timeout_s; reload_interval: how often model files are looked at (0:
    only on POST /admin/reload); log_decisions: folder of the decision log (None: no log), files
    rotated at log_max_mb; keep_flagged: folder keeping images labelled anomalous, at most
    keep_max_gb (oldest dropped first).

    The learning line (issue 28): keep_good_sample: a uniform sample of at most this many of each
    model's scored pictures since its last drift alarm, kept in keep_flagged/good-sample/NAME
    (``padim.monitor.good_sample``): where ``POST /models/NAME/recalibrate`` takes its pictures."""

    max_batch: int = 16
    max_wait_ms: float = 8.0
    queue: int = 64
    max_upload_mb: float = 32.0
    max_files: int = 16
    api_key: Optional[str] = None
    decode_workers: int = 2
    retry_after_s: int = 1
    drift_delta: float = 0.01
    drift_seed: Optional[int] = None
    webhook: Optional[str] = None
    webhook_timeout_s: float = 5.0
    reload_interval: float = 2.0
    log_decisions: Optional[str] = None
    log_max_mb: float = 64.0
    keep_flagged: Optional[str] = None
    keep_max_gb: float = 1.0
    keep_good_sample: Optional[int] = None

    def check(self) -> None:
        for name in ("max_batch", "queue", "max_files", "decode_workers"):
            if getattr(self, name) < 1:
                raise PadimError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_upload_mb <= 0:
            raise PadimError("`max_wait_ms` must be >= 0 and `max_upload_mb` > 0")
        if self.api_key is not None and not self.api_key.strip():
            raise PadimError("`api_key` (or PADIM_API_KEY) is empty: give a key, or unset it to serve without one")
        if self.queue < self.max_files:
            raise PadimError(f"`queue` ({self.queue}) must hold at least `max_files` ({self.max_files}) images")
        check_drift_delta(self.drift_delta)
        check_webhook(self.webhook)
        if self.keep_good_sample is not None:
            if isinstance(self.keep_good_sample, bool) or not isinstance(self.keep_good_sample, int) \
                    or self.keep_good_sample < 1:
                raise PadimError(f"`keep_good_sample` must be a whole number of at least 1, got {self.keep_good_sample!r}")
            if self.keep_flagged is None:
                raise PadimError("`keep_good_sample` keeps its pictures under `keep_flagged` DIR/good-sample: give that "
                                 "folder too")
        for name, low in (("webhook_timeout_s", 0.0), ("log_max_mb", 0.0), ("keep_max_gb", 0.0)):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > low):
                raise PadimError(f"`{name}` must be a number above {low:g}, got {value!r}")
        if not (isinstance(self.reload_interval, numbers.Real) and math.isfinite(self.reload_interval)
                and (self.reload_interval == 0 or self.reload_interval >= 0.1)):
            raise PadimError(f"`reload_interval` must be 0 (off) or at least 0.1 seconds, got "
                             f"{self.reload_interval!r}")
