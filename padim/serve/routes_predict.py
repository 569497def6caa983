"""``POST /models/{name}/predict``: uploads decoded in threads, scored by the version's batcher (which
feeds the drift monitor), decided at the request's operating point, logged, and answered.

The handler holds no PaDiM logic: decoding is ``uploads``, scoring ``registry.score_pixels`` behind
the version's ``batcher.MicroBatcher``, thresholds come from the model's ``operating_point`` (a
per-request choice that never changes the model), pictures from ``render``. Blocking work
(decoding, PNG encoding, the decision log's write and fsync) runs in threads, never on the event
loop. The whole request uses the one version it took at its start (``Service.acquire``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from datetime import datetime, timezone
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from starlette.requests import ClientDisconnect

from padim.errors import DataError, PadimError
from padim.pipeline.records import DECISION_FIELDS, decided, ignored_pixels
from padim.render import overlays as render
from padim.serve.batcher import BatcherClosed, QueueFull
from padim.serve.monitoring import LogUnavailable, brief
from padim.serve.schemas import ImageResult, Prediction, Problem
from padim.serve.uploads import UploadError, decode_upload, discard_rest, read_multipart
from padim.serve.versions import ModelVersion

log = logging.getLogger("uvicorn.error")

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def add_predict_route(app: FastAPI, service, require_key, retry: dict) -> None:
    settings = service.settings

    @app.post("/models/{name}/predict", response_model=Prediction, dependencies=[Depends(require_key)],
              openapi_extra=UPLOAD_BODY,
              responses={404: {"model": Problem}, 413: {"model": Problem}, 415: {"model": Problem},
                         422: {"model": Problem}, 503: {"model": Problem}})
    async def predict(request: Request, name: str = Path(description="a model's name or alias"),
                      heatmap: bool = Query(False, description="add heatmap overlay, mask and map PNGs"),
                      target_fpr: Optional[float] = Query(None, gt=0, lt=1, description=(
                          "label at this false-positive rate on good images (needs calibration)")),
                      threshold: Optional[float] = Query(None, description="label with this image threshold"),
                      pixel_threshold: Optional[float] = Query(None, description="draw masks at this pixel threshold"),
                      ) -> Prediction:
        """Scores one or several images (multipart form files, e.g. ``curl -F files=@a.png -F
        files=@b.png``). The operating point is chosen per request and never changes the model. A
        file that cannot be read gets its own ``error`` and the others are still scored. The answer
        names the model version that scored (``model_sha256``, ``fit_date``) and the request
        (``request_id``, for the decision log and feedback)."""
        version = service.acquire(name)
        try:
            model = version.model
            if target_fpr is not None and threshold is not None:
                raise HTTPException(422, "give target_fpr or threshold, not both")
            if any(v is not None and not math.isfinite(v) for v in (threshold, pixel_threshold)):
                raise HTTPException(422, "threshold and pixel_threshold must be finite numbers")
            try:
                point = model.operating_point(target_fpr=target_fpr, image_threshold=threshold,
                                              pixel_threshold=pixel_threshold)
            except PadimError as exc:  # e.g. a target FPR for a model without calibration
                message = str(exc).replace("`image_threshold`", "threshold").replace("`pixel_threshold`",
                                                                                     "pixel_threshold")
                raise HTTPException(422, message) from None
            if service.status != "ready":
                raise HTTPException(503, f"the server is {service.status}: try again shortly", headers=retry)
            if service.admitted >= service.max_admitted:
                service.metrics.rejected.labels(version.name).inc()
                raise HTTPException(503, f"busy: {service.admitted} requests in progress; try again shortly",
                                    headers=retry)
            service.admitted += 1
            try:
                return await _predict(request, version, point, heatmap)
            finally:
                service.admitted -= 1
        finally:
            service.release(version)

    async def _predict(request: Request, version: ModelVersion, point, heatmap: bool) -> Prediction:
        model, name = version.model, version.name
        chunks, length = request.stream(), request.headers.get("content-length")
        max_bytes = int(settings.max_upload_mb * 1e6)
        try:
            try:
                files = await read_multipart(request.headers.get("content-type"), length, chunks, max_bytes,
                                             settings.max_files)
            except UploadError as exc:  # answered once the client has sent its body (see uploads.discard_rest)
                ended = await discard_rest(chunks, length, max_bytes)
                raise HTTPException(exc.status, exc.reason,
                                    headers=None if ended else {"Connection": "close"}) from None
        except ClientDisconnect:  # one line, not the traceback starlette's error middleware would log
            client = request.client
            log.warning("padim serve: client %s disconnected during its upload to model %s",
                        f"{client.host}:{client.port}" if client else "?", name)
            raise HTTPException(499, "the client disconnected before its upload ended") from None
        loop = asyncio.get_running_loop()
        cropped = model.config_.crop is not None
        display = render.OVERLAY_MAX_SIDE if heatmap and not cropped else None

        def decode(upload):
            try:
                return decode_upload(upload, model.config_, display)
            except DataError as exc:
                return str(exc)

        decoded = await asyncio.gather(*(loop.run_in_executor(service.pool, decode, f) for f in files))
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        service.metrics.image_errors.labels(name).inc(len(files) - len(good))
        if not good:
            raise HTTPException(415, "not an image padim can read: " + "; ".join(decoded))
        try:
            futures = version.batcher.submit([decoded[i][0] for i in good])
        except (QueueFull, BatcherClosed) as exc:
            service.metrics.rejected.labels(name).inc()
            raise HTTPException(503, f"busy: {exc}; try again shortly", headers=retry) from None
        service.metrics.queue.labels(name).set(version.batcher.pending)
        scored = dict(zip(good, await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))))
        p_values = model.p_values([scored[i][0] for i in good])
        p_of = dict(zip(good, [None] * len(good) if p_values is None else p_values.tolist()))

        ignore = ignored_pixels(model)  # hatched on the overlays

        def result(i: int) -> ImageResult:
            if i not in scored:
                return ImageResult(index=i, file=files[i].filename, error=decoded[i])
            pixels, (height, width), picture = decoded[i]
            score, anomaly_map, drift_log10 = scored[i]
            drawn = render.heatmap(anomaly_map, (height, width), picture, pixels, cropped,
                                   point.pixel_threshold, ignore) if heatmap else None
            return ImageResult(index=i, file=files[i].filename, width=width, height=height,
                               **decided(score, p_of[i], point),  # the fields and values of every record
                               pixel_threshold=point.pixel_threshold, pixel_threshold_source=point.pixel_source,
                               drift_log10=drift_log10, heatmap=drawn)

        if heatmap:  # PNG encoding is CPU work: off the event loop
            results = await asyncio.gather(*(loop.run_in_executor(service.pool, result, i) for i in range(len(files))))
        else:
            results = [result(i) for i in range(len(files))]
        request_id = uuid.uuid4().hex
        records = [_record(version, request_id, files[i], r) for i, r in enumerate(results)]
        try:
            await loop.run_in_executor(service.pool, service.monitoring.record, name, request_id, records, files)
        except LogUnavailable as exc:
            raise HTTPException(503, f"the decision log cannot be written ({exc}): the decisions are not given "
                                     "out; try again shortly", headers=retry) from None
        warnings = [point.warning] if point.warning else []
        if model.uses_random_weights:
            warnings.append("random backbone weights: the scores mean nothing (tests only)")
        return Prediction(model=name, engine=model.engine, model_sha256=version.sha256, fit_date=version.fit_date,
                          request_id=request_id, warnings=warnings,
                          drift=brief(None if version.drift is None else version.drift.state()), results=list(results))


def _record(version: ModelVersion, request_id: str, upload, result: ImageResult) -> dict:
    """One image's line in the decision log."""
    return {"kind": "decision", "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id, "index": result.index, "model": version.name, "sha256": version.sha256,
            "fit_date": version.fit_date, "engine": version.model.engine, "file": result.file,
            "bytes": len(upload.data), "width": result.width, "height": result.height,
            **{field: getattr(result, field) for field in DECISION_FIELDS},  # as the answer gave them
            "drift_log10": result.drift_log10, "error": result.error}
