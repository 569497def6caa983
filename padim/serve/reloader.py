"""Noticing new, changed and removed model files while serving.

Every ``interval_s`` seconds (and on ``POST /admin/reload``) the source's files are looked at: a
file whose (device, inode, size, mtime) differs from the last look is read into memory once and
summed (SHA-256); when its bytes differ from the version serving, the model is built from those
same bytes (the model file's own checks: checksum, header, tensors), warmed up in its own batcher,
and only then swapped in (``service.swap``). A loaded version never reads its file again: writing
or truncating the file in place is a new version or a refusal, never a change under a SHA-256. A
file that fails any step is refused in one log line and noted (``errors``, shown in ``/models`` as
``last_reload_error``); the old version keeps serving, and the file is tried again when it changes
again. A file that is gone stops being served once its requests in flight are answered.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, Optional

from padim.errors import PadimError, one_line
from padim.serve.registry import file_sha256, file_signature, read_content
from padim.serve.versions import ModelSource, now_iso


class Reloader:
    """``service`` has ``versions`` ({name: ModelVersion}), ``start_version(entry)`` (loaded -> warmed
    version, or PadimError), ``swap(name, version)``, ``remove(name)`` and ``metrics``."""

    def __init__(self, service, source: ModelSource, interval_s: float, log: logging.Logger):
        self.service, self.source, self.interval_s, self.log = service, source, interval_s, log
        self.seen: Dict[str, tuple] = {}  # name -> (path, signature) last looked at
        self.errors: Dict[str, dict] = {}  # name -> why its file was refused (until it loads or is gone)
        self.last: Optional[dict] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        for name, version in self.service.versions.items():
            self.seen[name] = (version.entry.path, version.entry.signature)
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._poll, name="padim-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the polling
                self.log.warning("padim serve: looking at the model files failed: %s", one_line(exc, typed=False))

    def status(self) -> dict:
        return {"interval_s": self.interval_s, "last": self.last, "errors": dict(self.errors)}

    def reload(self) -> dict:
        """One look at the files -> {"time", "loaded", "refused", "removed", "unchanged", "errors"}."""
        with self._lock:
            if self._stop.is_set():
                return {"time": now_iso(), "loaded": [], "refused": [], "removed": [], "unchanged": 0,
                        "errors": dict(self.errors), "error": "the server is stopping"}
            summary = {"time": now_iso(), "loaded": [], "refused": [], "removed": [], "unchanged": 0}
            try:
                found, clashes = self.source.scan()
            except PadimError as exc:
                self.log.warning("padim serve: %s; the models served stay as they are", one_line(exc, typed=False))
                summary["error"] = one_line(exc, typed=False)
                summary["errors"] = dict(self.errors)
                self.last = summary
                return summary
            for name, why in clashes.items():
                if self.errors.get(name, {}).get("error") != why:
                    self.log.warning("padim serve: model %s: %s", name, why)
                self.errors[name] = {"time": now_iso(), "file": None, "sha256": None, "error": why}
            current = self.service.versions
            for name, path in found.items():
                self._look(name, path, current.get(name), summary)
            for name in [n for n in current if n not in found]:
                self.service.remove(name)
                self.seen.pop(name, None)
                self.log.warning("padim serve: model %s: its file is gone: no longer served (requests in flight are "
                                 "answered)", name)
                summary["removed"].append(name)
            for name in [n for n in self.errors if n not in found and n not in clashes]:
                del self.errors[name]
            summary["errors"] = dict(self.errors)
            self.last = summary
            return summary

    def _look(self, name: str, path, version, summary: dict) -> None:
        signature = file_signature(path)
        if signature is None or self.seen.get(name) == (str(path), signature):
            summary["unchanged"] += signature is not None
            return
        file, sha256 = os.path.basename(str(path)), None
        try:
            sha256, content, signature = read_content(path)  # a model file: read once, summed, loaded from memory
            if version is not None and version.sha256 == sha256 and version.entry.path == str(path):
                self.seen[name] = (str(path), signature)  # touched, same bytes
                self.errors.pop(name, None)
                summary["unchanged"] += 1
                return
            entry = self.source.load(name, content)
            new = self.service.start_version(entry)
        except Exception as exc:  # noqa: BLE001 - whatever a file does, the old version keeps serving
            if file_signature(path) is None:
                return  # gone between two looks: the next look stops serving it
            self.seen[name] = (str(path), signature)  # tried again when it changes again
            why = one_line(exc, typed=False)
            if sha256 is None:  # refused before it was summed (not a model, truncated, a FIFO): sum what is there
                try:
                    sha256 = file_sha256(path)
                except OSError:
                    pass
            self.errors[name] = {"time": now_iso(), "file": file, "sha256": sha256, "error": why}
            self.service.metrics.reloads.labels(name, "refused").inc()
            kept = f"version {version.sha256[:12]} keeps serving" if version is not None else "not served"
            self.log.warning("padim serve: model %s: %s (sha256 %s) refused: %s; %s", name, file, (sha256 or "?")[:12],
                             why, kept)
            summary["refused"].append({"name": name, "file": file, "sha256": sha256, "error": why})
            return
        if self._stop.is_set():  # the server began to stop while this version warmed up
            new.batcher.close()
            return
        self.seen[name] = (str(path), entry.signature)
        self.errors.pop(name, None)
        self.service.swap(name, new)
        self.service.metrics.reloads.labels(name, "loaded").inc()
        self.log.warning("padim serve: model %s: now serving version %s (fit %s) from %s%s", name, entry.sha256[:12],
                         new.fit_date, file, "" if version is None else f"; version {version.sha256[:12]} drains")
        summary["loaded"].append({"name": name, "file": file, "sha256": entry.sha256, "fit_date": new.fit_date})
