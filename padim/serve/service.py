"""The service's state: model versions and their batchers, the decoding threads, readiness, metrics,
monitoring (drift, decision log, feedback) and the reloader. Route handlers only call it."""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, Dict, List, Mapping, Optional

from fastapi import HTTPException

from padim.errors import PadimError
from padim.serve.metrics import Metrics
from padim.serve.monitoring import Monitoring, brief
from padim.serve.registry import ServedModel, aliases, describe
from padim.serve.reloader import Reloader
from padim.serve.settings import ServeSettings
from padim.serve.uploads import clip
from padim.serve.versions import ModelSource, ModelVersion, now_iso, start_version

log = logging.getLogger("uvicorn.error")  # the server's log (its level is padim serve's --log-level)
HISTORY = 10  # versions remembered per model in /models


class Service:
    """``versions``: {name: ModelVersion}, a new dict on every change (readers take one reference);
    ``names``: {name or alias: name}. ``acquire``/``release`` bracket every request that uses a version."""

    def __init__(self, models: Mapping[str, ServedModel], settings: ServeSettings,
                 on_ready: Optional[Callable[[Optional[str]], None]], source: Optional[ModelSource] = None):
        self.initial, self.settings, self.on_ready = dict(models), settings, on_ready
        self.metrics = Metrics()
        self.monitoring = Monitoring(settings, self.metrics, log)
        self.versions: Dict[str, ModelVersion] = {}
        self.names: Dict[str, str] = {}
        self.history: Dict[str, Deque[dict]] = {}
        self.lock = threading.Lock()
        self.status, self.detail = "warming", None
        self.pool: Optional[ThreadPoolExecutor] = None
        self.reloader = Reloader(self, source, settings.reload_interval, log) if source is not None else None
        self._retiring: List[threading.Thread] = []
        # Predict requests between reading their body and answering: beyond this many, new ones get
        # 503 before their body is read, which bounds the memory uploads take (each <= max_upload_mb).
        self.admitted, self.max_admitted = 0, settings.queue + settings.max_batch

    @property
    def models(self) -> Dict[str, ServedModel]:
        return {name: version.entry for name, version in self.versions.items()}

    def _new_version(self, entry: ServedModel) -> ModelVersion:
        s = self.settings
        return start_version(entry, s.max_batch, s.max_wait_ms / 1000.0, s.queue,
                             self.monitoring.drift_monitor(entry.model), self._feed, self._batch_done)

    def _feed(self, name: str, sha256: Optional[str], drift, scores: list) -> list:
        # a version draining after a swap still feeds its own monitor, but the gauges show the serving one's
        serving = self.versions.get(name)
        return self.monitoring.feed(name, sha256, drift, scores, publish=serving is not None and serving.drift is drift)

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="padim-decode")
        for name, entry in self.initial.items():
            self._install(name, self._new_version(entry))
        self.initial = {}
        threading.Thread(target=self._await_warm_up, name="padim-warm-up", daemon=True).start()

    def _install(self, name: str, version: ModelVersion) -> Optional[ModelVersion]:
        """Puts ``version`` in the table -> the version it replaces (None for a new model)."""
        with self.lock:
            old = self.versions.get(name)
            versions = dict(self.versions)
            versions[name] = version
            self._set_table(versions)
            history = self.history.setdefault(name, collections.deque(maxlen=HISTORY))
            if old is not None and history:
                history[0]["state"], history[0]["retired_at"] = "draining", now_iso()
            history.appendleft({"version": version, "state": "serving", "retired_at": None})
            self._count_versions(name)
        self.monitoring.publish(name, None if version.drift is None else version.drift.state())
        return old

    def _set_table(self, versions: Dict[str, ModelVersion]) -> None:
        names = {alias: name for alias, name in aliases({n: v.model for n, v in versions.items()}).items()}
        names.update({name: name for name in versions})
        self.versions, self.names = versions, names

    def _count_versions(self, name: str) -> None:
        self.metrics.versions.labels(name).set(sum(1 for h in self.history.get(name, ()) if h["state"] != "retired"))

    def _batch_done(self, name: str, n: int, seconds: float) -> None:
        self.metrics.batch_size.labels(name).observe(n)
        self.metrics.batch_seconds.labels(name).observe(seconds)
        self.metrics.images.labels(name).inc(n)
        version = self.versions.get(name)
        if version is not None:
            self.metrics.queue.labels(name).set(version.batcher.pending)

    def _await_warm_up(self) -> None:
        failures = []
        for name, version in self.versions.items():
            version.batcher.ready.wait()
            if version.batcher.warmup_error is not None:
                failures.append(f"model {name}: {version.batcher.warmup_error}")
        if self.status == "warming":
            self.status, self.detail = ("failed", "; ".join(failures)) if failures else ("ready", None)
        if self.status == "ready" and self.reloader is not None:
            self.reloader.start()
        if self.on_ready is not None:
            self.on_ready(self.detail)

    # ------------------------------------------------------------------------------ versions
    def start_version(self, entry: ServedModel) -> ModelVersion:
        """A new version of a model, warmed up (for the reloader). Raises PadimError when warm-up fails."""
        version = self._new_version(entry)
        version.batcher.ready.wait()
        if version.batcher.warmup_error is not None:
            version.batcher.close()
            raise PadimError(f"warm-up failed: {' '.join(str(version.batcher.warmup_error).split())[:300]}")
        return version

    def swap(self, name: str, version: ModelVersion) -> None:
        old = self._install(name, version)
        if old is not None:
            self._retire(name, old)

    def remove(self, name: str) -> None:
        with self.lock:
            versions = dict(self.versions)
            old = versions.pop(name, None)
            self._set_table(versions)
            if old is not None and self.history.get(name):
                self.history[name][0]["state"], self.history[name][0]["retired_at"] = "draining", now_iso()
            self._count_versions(name)
        self.monitoring.publish(name, None)
        if old is not None:
            self._retire(name, old)

    def _retire(self, name: str, old: ModelVersion) -> None:
        """Once no request holds ``old``: its batcher scores what is queued and stops; then it is dropped."""

        def drain():
            old.lease.wait_idle()
            old.batcher.close()
            with self.lock:
                for item in self.history.get(name, ()):
                    if item["version"] is old:
                        item["state"] = "retired"
                        item["version"] = old.describe("retired", item["retired_at"])  # the model is let go
                self._count_versions(name)

        thread = threading.Thread(target=drain, name=f"padim-drain-{name}", daemon=True)
        self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]
        thread.start()

    def acquire(self, name: str) -> ModelVersion:
        """The version serving ``name`` (a name or an alias), held until ``release``; 404 if none."""
        with self.lock:
            version = self.versions.get(self.names.get(name, ""))  # a table lookup only: a name never becomes a path
            if version is None:
                raise HTTPException(404, f"no model named {clip(name)!r}; this server has: "
                                         f"{', '.join(sorted(self.versions))}")
            version.lease.acquire()
        return version

    def release(self, version: ModelVersion) -> None:
        version.lease.release()

    def current(self, name: str) -> ModelVersion:
        version = self.acquire(name)
        self.release(version)
        return version

    def describe(self, version: ModelVersion) -> dict:
        """``schemas.ModelInfo`` of the version serving a model."""
        name = version.name
        with self.lock:
            history = [item["version"].describe(item["state"], item["retired_at"])
                       if isinstance(item["version"], ModelVersion) else item["version"]
                       for item in self.history.get(name, ())]
            own = [alias for alias, target in self.names.items() if target == name and alias != name]
        error = self.reloader.errors.get(name) if self.reloader is not None else None
        info = describe(version.entry)
        info.update(aliases=own, sha256=version.sha256, fit_date=version.fit_date, loaded_at=version.loaded_at,
                    versions=history, last_reload_error=error,
                    drift=brief(None if version.drift is None else version.drift.state()),
                    live_accuracy=self.monitoring.accuracy(name, version.model.target_fpr_))
        return info

    def stop(self) -> None:
        """Refuses new work, scores what is queued, then returns (uvicorn calls it once every
        connection has been answered, so normally nothing is left)."""
        self.status = "stopping"
        if self.reloader is not None:
            self.reloader.stop()
        for version in self.versions.values():
            version.batcher.close()
        for thread in self._retiring:
            thread.join(60)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.monitoring.close()
