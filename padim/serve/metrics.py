"""Prometheus metrics of one app (its own registry: two apps in a process, e.g. tests, never mix).

Routes are labelled by their template (``/models/{name}/predict``), never by the raw path, so a
client cannot grow the label set; unmatched paths count as ``other``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("padim_requests", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.errors = Counter("padim_request_errors", "HTTP requests answered with a status >= 400",
                              ["route", "status"], registry=r)
        self.latency = Histogram("padim_request_latency_seconds", "time from request to response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("padim_requests_in_flight", "HTTP requests accepted and not yet answered", registry=r)
        self.images = Counter("padim_images", "images scored", ["model"], registry=r)
        self.image_errors = Counter("padim_image_errors", "uploaded files that could not be scored", ["model"],
                                    registry=r)
        self.batch_size = Histogram("padim_batch_size", "images per backbone batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("padim_batch_seconds", "time to score one batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("padim_queue_images", "images waiting or being scored", ["model"], registry=r)
        self.rejected = Counter("padim_rejected", "requests refused with 503 because the queue was full", ["model"],
                                registry=r)
        # issue 23: drift alarms, model versions, the decision log and operators' feedback
        self.drift_log10 = Gauge("padim_drift_martingale_log10", "log10 of the drift martingale (alarm at "
                                 "log10(1 / delta)) of the model version serving", ["model", "stream"], registry=r)
        self.drift_alarm = Gauge("padim_drift_alarm", "1 while the drift alarm is on (latched until reset or a "
                                 "new version)", ["model", "stream"], registry=r)
        self.drift_alarms = Counter("padim_drift_alarms", "drift alarms fired", ["model", "stream"], registry=r)
        self.reloads = Counter("padim_model_reloads", "model files loaded (result: loaded) or refused (refused) "
                               "after start-up", ["model", "result"], registry=r)
        self.versions = Gauge("padim_model_versions", "versions of a model loaded: serving + draining", ["model"],
                              registry=r)
        self.logged = Counter("padim_decisions_logged", "decision log lines written", registry=r)
        self.log_errors = Counter("padim_decision_log_errors", "requests whose decisions could not be logged",
                                  registry=r)
        self.flagged = Counter("padim_flagged_kept", "images labelled anomalous kept for review", registry=r)
        self.feedback = Gauge("padim_feedback_images", "images an operator gave a verdict on, by the model's "
                              "verdict and the operator's truth", ["model", "verdict", "truth"], registry=r)
        self.override_rate = Gauge("padim_override_rate", "fraction of the verdicts given feedback that the "
                                   "operator overrode (NaN before any feedback)", ["model"], registry=r)
        self.overrides = Gauge("padim_overrides", "verdicts the operator overrode", ["model"], registry=r)
        # issue 28: live accuracy per model version, from the operators' verdicts (padim.monitor.accuracy)
        self.false_alarm_rate = Gauge("padim_live_false_alarm_rate", "of the pictures an operator confirmed good, "
                                      "the fraction the version flagged: estimate and 95 % Clopper-Pearson bounds",
                                      ["model", "version", "bound"], registry=r)
        self.missed_defect_rate = Gauge("padim_live_missed_defect_rate", "of the pictures an operator confirmed "
                                        "defect, the fraction the version called good: estimate and 95 % bounds",
                                        ["model", "version", "bound"], registry=r)
        self.sampled = Counter("padim_good_sample_kept", "scored pictures kept in the good sample", registry=r)
        self.accepted = 0  # requests that reached the app, and those answered: equal after a clean stop
        self.answered = 0


class MetricsMiddleware:
    """Pure ASGI middleware: counts, times and tracks in-flight requests (streaming bodies pass
    through untouched, unlike Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics, status = self.metrics, {"code": 500}
        metrics.accepted += 1
        metrics.in_flight.inc()
        started = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            code = status["code"]
            metrics.requests.labels(route, scope["method"], str(code)).inc()
            if code >= 400:
                metrics.errors.labels(route, str(code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)
            metrics.in_flight.dec()
            metrics.answered += 1
