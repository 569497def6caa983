"""Watching served models (issue 23): drift alarms fed from the batchers, with their log line,
gauges and webhook; the decision log and the flagged images written per request; operators' feedback.

Drift: one ``padim.monitor.DriftMonitor`` per model version with calibration, fed each scored image
once, in the version's batcher thread (never on the event loop), in the order the images were
batched. A new version starts a new monitor (its calibration is the reference); an alarm latches
until ``POST /models/NAME/drift/reset`` or a new version.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import urlsplit

from padim.errors import one_line
from padim.version import __version__
from padim.settings.calibration import DEFAULT_TARGET_FPR
from padim.monitor import STREAM_MEANING, DecisionLog, DecisionLogError, DriftMonitor, FlaggedStore, OverrideCounter
from padim.monitor.accuracy import live_accuracy
from padim.monitor.drift import STREAMS
from padim.monitor.good_sample import GoodSample

MEANING = STREAM_MEANING


class LogUnavailable(Exception):
    """The decision log could not be written: the decisions are not given out (answered 503)."""


def brief(state: Optional[dict]) -> Optional[dict]:
    """A drift state -> ``schemas.DriftBrief`` (None without a monitor)."""
    if state is None:
        return None
    return {"alarm": state["alarm"], "streams_alarmed": [s for s in STREAMS if state["streams"][s]["alarm"]],
            "log10": {s: state["streams"][s]["martingale"]["log10"] for s in STREAMS},
            "images_seen": state["images_seen"], "delta": state["delta"]}


class Webhook:
    """POSTs JSON to ``url`` from one background thread: at most ``max_queue`` waiting (more are
    dropped, one log line each), each within ``timeout_s``, a failure one log line. The URL is logged
    as scheme://host:port only (its path may be a secret)."""

    def __init__(self, url: str, timeout_s: float, log: logging.Logger, max_queue: int = 64):
        self.url, self.timeout_s, self.log = url, timeout_s, log
        parts = urlsplit(url)
        self.shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        # a loopback address never goes through a proxy of the environment
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
        self._queue: "queue.Queue[Optional[dict]]" = queue.Queue(max_queue)
        self.sent = self.failed = 0
        self._thread = threading.Thread(target=self._work, name="padim-webhook", daemon=True)
        self._thread.start()

    def send(self, payload: dict) -> None:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.log.warning("padim serve: webhook %s: %d messages are waiting; this one is dropped",
                             self.shown, self._queue.qsize())

    def _work(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            request = urllib.request.Request(
                self.url, json.dumps(payload, allow_nan=False).encode(), method="POST",
                headers={"Content-Type": "application/json", "User-Agent": f"padim/{__version__}"})
            try:
                with self._opener.open(request, timeout=self.timeout_s) as answer:
                    answer.read(65536)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - any failure is one line; the service goes on
                self.failed += 1
                self.log.warning("padim serve: webhook %s failed: %s", self.shown, one_line(exc, typed=False))

    def close(self) -> None:
        """Sends what is queued (each within the timeout), then stops."""
        try:
            self._queue.put(None, timeout=self.timeout_s)
        except queue.Full:
            return
        self._thread.join(self.timeout_s * (self._queue.qsize() + 2))


class Monitoring:
    """Drift feeding and alarms, the decision log, flagged images and feedback of one service."""

    def __init__(self, settings, metrics, log: logging.Logger):
        self.settings, self.metrics, self.log = settings, metrics, log
        self.webhook = Webhook(settings.webhook, settings.webhook_timeout_s, log) if settings.webhook else None
        self.decisions = self.flagged = None
        try:
            if settings.log_decisions is not None:
                self.decisions = DecisionLog(settings.log_decisions, int(settings.log_max_mb * 2 ** 20))
                if self.decisions.torn_bytes:
                    log.warning("padim serve: decision log %s: %d bytes of a batch cut off by a kill were removed",
                                settings.log_decisions, self.decisions.torn_bytes)
            if settings.keep_flagged is not None:
                self.flagged = FlaggedStore(settings.keep_flagged, settings.keep_max_gb * 1e9)
        except DecisionLogError:
            self.close()
            raise
        self.overrides: Dict[str, OverrideCounter] = {}
        self.samples: Dict[str, GoodSample] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ drift
    def drift_monitor(self, model) -> Optional[DriftMonitor]:
        """A monitor against the model's calibration images (None without calibration)."""
        calibration = model.calibration_
        if calibration is None or len(calibration.image_scores) == 0:
            return None
        return DriftMonitor(calibration.image_scores, self.settings.drift_delta,
                            model.target_fpr_ or DEFAULT_TARGET_FPR, seed=self.settings.drift_seed)

    def feed(self, name: str, sha256: Optional[str], monitor: Optional[DriftMonitor], scores: Sequence[float],
             publish: bool = True) -> list:
        """Feeds one batch's scores, image by image -> each image's log10 martingale of stream "all"
        (None without a monitor). Alarms that fire are announced; with ``publish``, the gauges set."""
        if monitor is None:
            return [None] * len(scores)
        values, state = [], None
        for score in scores:
            state = monitor.update([score])
            values.append(state["streams"]["all"]["martingale"]["log10"])
            for stream in state["new_alarms"]:
                self._alarm(name, sha256, state, stream)
        if state is not None and publish:
            self.publish(name, state)
        return values

    def publish(self, name: str, state: Optional[dict]) -> None:
        """The gauges of model ``name`` := this drift state (removed when None)."""
        for stream in STREAMS:
            if state is None:
                for gauge in (self.metrics.drift_log10, self.metrics.drift_alarm):
                    try:
                        gauge.remove(name, stream)
                    except KeyError:
                        pass
                continue
            self.metrics.drift_log10.labels(name, stream).set(state["streams"][stream]["martingale"]["log10"])
            self.metrics.drift_alarm.labels(name, stream).set(1.0 if state["streams"][stream]["alarm"] else 0.0)

    def _alarm(self, name: str, sha256: Optional[str], state: dict, stream: str) -> None:
        s = state["streams"][stream]
        try:
            sample = self.sample(name)
            if sample is not None:
                sample.restart()  # the pictures kept so far are of the line before the change
        except DecisionLogError as exc:
            self.log.warning("padim serve: the sample of model %s was not emptied: %s", name, one_line(exc, typed=False))
        self.metrics.drift_alarms.labels(name, stream).inc()
        self.log.warning("padim serve: drift alarm: model %s (version %s), stream %s: martingale 10^%.2f >= 1/delta "
                         "= %g at image %d since reset: %s", name, (sha256 or "?")[:12], stream,
                         s["martingale"]["log10"], s["threshold"], s["alarm_since"]["image"], MEANING[stream])
        if self.webhook is not None:
            self.webhook.send({"event": "drift_alarm", "model": name, "sha256": sha256, "stream": stream,
                               "meaning": MEANING[stream], "time": s["alarm_since"]["time"],
                               "image": s["alarm_since"]["image"], "martingale_log10": s["martingale"]["log10"],
                               "delta": s["delta"], "threshold": s["threshold"], "images_seen": state["images_seen"],
                               "streams_alarmed": [x for x in STREAMS if state["streams"][x]["alarm"]]})

    # ------------------------------------------------------------------------------------ decisions
    def sample(self, name: str) -> Optional[GoodSample]:
        """Model ``name``'s sample of scored pictures (``--keep-good-sample``), None without one."""
        if self.settings.keep_good_sample is None:
            return None
        with self._lock:
            if name not in self.samples:
                folder = Path(self.settings.keep_flagged) / "good-sample" / name
                self.samples[name] = GoodSample(folder, self.settings.keep_good_sample,
                                                self.settings.keep_max_gb * 1e9, self.settings.drift_seed)
            return self.samples[name]

    def counter(self, name: str) -> OverrideCounter:
        with self._lock:
            return self.overrides.setdefault(name, OverrideCounter())

    def record(self, name: str, request_id: str, records: List[dict], uploads: Sequence) -> None:
        """After a prediction, in a worker thread: its lines to the decision log (one write; raises
        DecisionLogError when that fails), its anomalous images to the flagged store (a failure there
        is one log line), its verdicts remembered for feedback. Raises LogUnavailable."""
        if self.decisions is not None:
            self._write(records)
        try:
            sample = self.sample(name)
        except DecisionLogError as exc:  # the folder cannot be used: the decisions are still given
            sample = None
            self.log.warning("padim serve: no sample of model %s kept: %s", name, one_line(exc, typed=False))
        for record, upload in zip(records, uploads) if sample is not None else ():
            if record.get("error") is None:
                try:
                    if sample.offer(bytes(upload.data), record, upload.filename) is not None:
                        self.metrics.sampled.inc()
                except DecisionLogError as exc:
                    self.log.warning("padim serve: sampled picture %s not kept: %s", upload.filename,
                                     one_line(exc, typed=False))
        if self.flagged is not None:
            for record, upload in zip(records, uploads):
                if record.get("label") != "anomalous":
                    continue
                try:
                    if self.flagged.add(bytes(upload.data), record, upload.filename) is not None:
                        self.metrics.flagged.inc()
                except DecisionLogError as exc:
                    self.log.warning("padim serve: flagged image %s not kept: %s", upload.filename, one_line(exc, typed=False))
        self.counter(name).remember(request_id, [record.get("label") for record in records],
                                    records[0].get("sha256") if records else None)

    def feedback(self, name: str, request_id: str, index: int, truth: str, sha256: Optional[str],
                 target_fpr: Optional[float] = None) -> dict:
        """An operator's verdict on image ``index`` of request ``request_id`` -> the feedback and the
        counts. Raises DecisionLogError (unknown request, bad index, no verdict), LogUnavailable."""
        counter = self.counter(name)
        result = counter.feedback(request_id, index, truth)
        if self.decisions is not None:
            self._write([{"kind": "feedback", "time": datetime.now(timezone.utc).isoformat(),
                          "request_id": request_id, "index": index, "model": name, "sha256": sha256, **result}])
        state = counter.state()
        for key, count in state["counts"].items():
            verdict, truth_ = key.split("/")
            self.metrics.feedback.labels(name, verdict, truth_).set(count)
        self.metrics.overrides.labels(name).set(state["overrides"])
        rate = state["override_rate"]
        self.metrics.override_rate.labels(name).set(float("nan") if rate is None else rate)
        self.publish_accuracy(name, target_fpr)
        return {**result, **state}

    def accuracy(self, name: str, target_fpr: Optional[float]) -> Dict[str, dict]:
        """{version SHA-256: ``live_accuracy``} of model ``name``'s versions that were given verdicts."""
        return {str(version): live_accuracy(state["counts"], target_fpr)
                for version, state in self.counter(name).by_version().items()}

    def publish_accuracy(self, name: str, target_fpr: Optional[float]) -> None:
        """The live-accuracy gauges of model ``name``'s versions; a warning line when a version's
        false-alarm rate is above the target beyond its interval."""
        for version, accuracy in self.accuracy(name, target_fpr).items():
            for which, gauge in (("false_alarms", self.metrics.false_alarm_rate),
                                 ("missed_defects", self.metrics.missed_defect_rate)):
                found = accuracy[which]
                low, high = found["interval"] or (None, None)
                for bound, value in (("estimate", found["rate"]), ("low", low), ("high", high)):
                    gauge.labels(name, version[:12], bound).set(float("nan") if value is None else value)
            if accuracy["warning"] is not None:
                self.log.warning("padim serve: model %s version %s: %s", name, version[:12], accuracy["warning"])

    def _write(self, records: List[dict]) -> None:
        try:
            self.decisions.write(records)
        except DecisionLogError as exc:
            self.metrics.log_errors.inc()
            self.log.warning("padim serve: %s", one_line(exc, typed=False))
            raise LogUnavailable(one_line(exc, typed=False)) from None
        self.metrics.logged.inc(len(records))

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
        if self.decisions is not None:
            self.decisions.close()
