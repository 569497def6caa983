"""Model versions, swapped live: a loaded version is an immutable object, replaced by reference.

A request takes the version serving its model when it starts (``Service.acquire``, which also
counts it in the version's ``Lease``) and uses that one object to the end: decoding at its input
size, its batcher, its thresholds, its drift monitor, the SHA-256 it names. A swap puts the new
version in the table (a new dict, under the service's lock) and retires the old one: once its last
request is released, its batcher is closed (which scores what is queued) and the model is dropped.
So requests in flight finish on the old version, new ones go to the new one, and none fails
because a swap happened under it. Each batcher belongs to one version.

``ModelSource`` is where a server's models come from (the files named on the command line and
every ``*.safetensors`` of ``--models DIR``) and how one is loaded; ``padim.serve.reloader`` looks
at it for changes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from padim.errors import PadimError
from padim.serve.batcher import MicroBatcher
from padim.serve.registry import MODEL_SUFFIX, ServedModel, file_signature, fit_date, open_model, score_pixels, warm_up


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Lease:
    """The requests holding a version: ``acquire`` / ``release`` (under the service's lock for the
    first), ``wait_idle`` returns once none holds it."""

    def __init__(self):
        self._holders = 0
        self._idle = threading.Condition()

    def acquire(self) -> None:
        with self._idle:
            self._holders += 1

    def release(self) -> None:
        with self._idle:
            self._holders -= 1
            if self._holders == 0:
                self._idle.notify_all()

    @property
    def holders(self) -> int:
        return self._holders

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._holders == 0, timeout)


@dataclass(frozen=True)
class ModelVersion:
    """One loaded version of a served model. Never changed once made (its lease only counts)."""

    entry: ServedModel
    batcher: MicroBatcher
    drift: Optional[object]  # padim.monitor.DriftMonitor, or None for a model without calibration
    loaded_at: str
    lease: Lease = field(default_factory=Lease, compare=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def model(self):
        return self.entry.model

    @property
    def sha256(self) -> Optional[str]:
        return self.entry.sha256

    @property
    def fit_date(self) -> Optional[str]:
        return fit_date(self.entry.model)

    def describe(self, state: str, retired_at: Optional[str] = None) -> dict:
        """A ``schemas.VersionInfo``."""
        return {"sha256": self.sha256, "fit_date": self.fit_date, "file": os.path.basename(self.entry.path),
                "loaded_at": self.loaded_at, "state": state, "retired_at": retired_at,
                "requests_in_flight": self.lease.holders}


def start_version(entry: ServedModel, max_batch: int, max_wait_s: float, queue: int, drift,
                  feed: Callable[[str, Optional[str], object, list], list],
                  on_batch: Callable[[str, int, float], None]) -> ModelVersion:
    """Starts the version's batcher (it warms the model up first, in its own thread: ``batcher.ready``).
    Each batch's scores are fed to ``drift`` through ``feed(name, sha256, drift, scores) -> drift
    values`` in that thread, in arrival order; results are (score, map, drift_log10)."""
    name, model = entry.name, entry.model

    def run(pixels):
        scored = score_pixels(model, pixels)
        drift_values = feed(name, entry.sha256, drift, [score for score, _ in scored])
        return [(score, anomaly_map, value) for (score, anomaly_map), value in zip(scored, drift_values)]

    batcher = MicroBatcher(run, max_batch, max_wait_s, queue, f"{name}@{(entry.sha256 or '')[:8]}",
                           on_batch=lambda n, seconds: on_batch(name, n, seconds),
                           warmup=lambda: warm_up(model, max_batch)).start()
    return ModelVersion(entry, batcher, drift, now_iso())


class ModelSource:
    """The model files a server serves: ``paths`` (files or export folders named on the command line)
    and every ``*.safetensors`` in ``folder`` (not names starting with '.': temporaries of atomic
    writes), loaded with ``device``, ``batch_size``, ``engine`` and ``precision``."""

    def __init__(self, paths: Sequence[os.PathLike] = (), folder: Optional[os.PathLike] = None,
                 device: Optional[str] = None, batch_size: int = 16, engine: str = "torch", precision: str = "f32"):
        self.paths = [Path(p) for p in paths]
        self.folder = None if folder is None else Path(folder)
        self.device, self.batch_size, self.engine, self.precision = device, batch_size, engine, precision

    @staticmethod
    def name_of(path: Path) -> str:
        return path.name if path.is_dir() else path.stem

    def scan(self) -> Tuple[Dict[str, Path], Dict[str, str]]:
        """-> ({name: path} of the model files there now, {name: why refused} for two files of one
        name). Raises PadimError when the folder cannot be listed (then nothing is removed)."""
        found: Dict[str, Path] = {}
        clashes: Dict[str, str] = {}
        candidates = [p for p in self.paths if file_signature(p) is not None]
        if self.folder is not None:
            try:
                listed = sorted(self.folder.iterdir())
            except OSError as exc:
                raise PadimError(f"`models_dir` {self.folder} cannot be listed: {exc.strerror or exc}") from None
            candidates += [p for p in listed if p.suffix.lower() == MODEL_SUFFIX and not p.name.startswith(".")
                           and p.is_file()]
        for path in candidates:
            name = self.name_of(path)
            if name in found and found[name] != path:
                clashes[name] = f"two models are named {name!r} ({found[name]} and {path}): rename one"
                continue
            found[name] = path
        return found, clashes

    def load(self, name: str, path) -> ServedModel:
        """``path``: a model file or export folder, or a file already read (``registry.read_content``)."""
        return open_model(path, name, self.device, self.batch_size, self.engine, self.precision)
