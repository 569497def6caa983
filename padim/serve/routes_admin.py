"""The routes of a line that runs for months (issues 23, 28): drift state and reset, operators' feedback,
recalibration, model reloads. All of them need the API key when the server has one.

The key is checked before any body is read, and a body is read within a bound: FastAPI reads and
parses a route's declared body model *before* its dependencies run (the key among them), whatever
its size, so feedback takes its JSON from the request itself (``uploads.read_body``, at most
``FEEDBACK_MAX_BYTES``, 413 beyond) once the key was checked, and validates it with ``Feedback``.
The other routes take no body and never read one."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from padim.errors import PadimError
from padim.monitor import DecisionLogError
from padim.serve.monitoring import MEANING, LogUnavailable
from padim.serve.recalibration import RecalibrationRefused, recalibrate_served
from padim.serve.schemas import Feedback, FeedbackAnswer, Problem, Recalibrate, RecalibrateAnswer, Reload
from padim.serve.uploads import UploadError, discard_rest, read_body

log = logging.getLogger("uvicorn.error")
NAME = Path(description="a model's name or alias")
FEEDBACK_MAX_BYTES = 16 * 1024  # a verdict is about 100 bytes of JSON
FEEDBACK_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": Feedback.model_json_schema()}}}}
RECALIBRATE_BODY = {"requestBody": {"required": False, "content": {"application/json": {
    "schema": Recalibrate.model_json_schema()}}}}


async def json_body(request: Request, schema: type, max_bytes: int, empty_ok: bool = False) -> BaseModel:
    """The request's JSON body as ``schema``, read within ``max_bytes`` (413 beyond, answered once the
    rest is dropped as ``padim.serve.uploads.discard_rest`` does) and validated (422, the message
    FastAPI gives for a body it validates itself)."""
    chunks, length = request.stream(), request.headers.get("content-length")
    try:
        try:
            data = await read_body(chunks, length, max_bytes)
        except UploadError as exc:
            ended = await discard_rest(chunks, length, max_bytes)
            raise HTTPException(exc.status, exc.reason, headers=None if ended else {"Connection": "close"}) from None
    except ClientDisconnect:
        raise HTTPException(499, "the client disconnected before its request ended") from None
    if empty_ok and not bytes(data).strip():
        return schema()  # every field has its default
    try:
        return schema.model_validate_json(data)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from None


def add_admin_routes(app: FastAPI, service, require_key, retry: dict) -> None:
    def monitor_of(name: str):
        version = service.current(name)
        if version.drift is None:
            raise HTTPException(409, f"model {version.name} has no calibration images, so no drift alarm: fit it with "
                                     "a calibration hold-out (padim fit --calibration-fraction, the default 0.1)")
        return version

    def drift_answer(version, state: dict) -> dict:
        return {"model": version.name, "sha256": version.sha256, "fit_date": version.fit_date,
                "meaning": MEANING, **state}

    @app.get("/models/{name}/drift", dependencies=[Depends(require_key)],
             responses={404: {"model": Problem}, 409: {"model": Problem}})
    async def drift(name: str = NAME) -> dict:
        """The drift alarm of the version serving: per stream ("all": every image; "good": the images
        that look good), the martingale, its maximum, images seen, and since when an alarm is on.
        Each stream alarms falsely with probability at most delta while the images stay exchangeable
        with the calibration images."""
        version = monitor_of(name)
        return drift_answer(version, version.drift.state())

    @app.post("/models/{name}/drift/reset", dependencies=[Depends(require_key)],
              responses={404: {"model": Problem}, 409: {"model": Problem}})
    async def drift_reset(name: str = NAME) -> dict:
        """Starts the drift alarm over (martingales at 1, the images seen forgotten): after the cause
        of an alarm was found and fixed. Resetting without cause throws away the history the alarm
        needs (see the README)."""
        version = monitor_of(name)
        state = version.drift.reset()
        service.monitoring.publish(version.name, state)
        log.warning("padim serve: drift alarm of model %s (version %s) reset by request", version.name,
                    (version.sha256 or "?")[:12])
        return drift_answer(version, state)

    @app.post("/models/{name}/feedback", response_model=FeedbackAnswer, dependencies=[Depends(require_key)],
              openapi_extra=FEEDBACK_BODY, responses={404: {"model": Problem}, 413: {"model": Problem},
                                                      422: {"model": Problem}, 503: {"model": Problem}})
    async def feedback(request: Request, name: str = NAME) -> dict:
        """An operator's verdict ("good" or "defect") on image ``index`` of a recent request (JSON:
        ``request_id``, ``index``, ``truth``): counted against the model's verdict (``/metrics``:
        padim_override_rate, padim_feedback_images) and written to the decision log. A second verdict
        on one image replaces the first."""
        version = service.current(name)
        body = await json_body(request, Feedback, FEEDBACK_MAX_BYTES)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(service.pool, service.monitoring.feedback, version.name,
                                              body.request_id, body.index, body.truth, version.sha256,
                                              version.model.target_fpr_)
        except LogUnavailable as exc:
            raise HTTPException(503, f"the decision log cannot be written ({exc}); try again shortly",
                                headers=retry) from None
        except DecisionLogError as exc:
            status = 404 if str(exc).startswith("unknown request_id") else 422
            raise HTTPException(status, " ".join(str(exc).split())) from None

    @app.post("/models/{name}/recalibrate", response_model=RecalibrateAnswer, dependencies=[Depends(require_key)],
              openapi_extra=RECALIBRATE_BODY, responses={404: {"model": Problem}, 409: {"model": Problem},
                                                         422: {"model": Problem}})
    async def recalibrate(request: Request, name: str = NAME) -> dict:
        """New thresholds from the sampled pictures operators confirmed good (``--keep-good-sample``),
        the same Gaussians: the model file is rewritten (the previous kept beside it) and the new
        version swapped in live, its drift alarm starting on the new calibration. JSON (all optional):
        ``since``, ``include_unconfirmed``, ``target_fpr``. See padim.serve.recalibration."""
        version = service.current(name)
        body = await json_body(request, Recalibrate, FEEDBACK_MAX_BYTES, empty_ok=True)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, recalibrate_served, service, version.name, body.since, body.include_unconfirmed, body.target_fpr)
        except RecalibrationRefused as exc:
            raise HTTPException(422 if str(exc).startswith("since") else 409, " ".join(str(exc).split())) from None
        except PadimError as exc:  # a picture that cannot be read, a file that cannot be written or served
            raise HTTPException(409, f"recalibration failed: {' '.join(str(exc).split())}") from None

    def reloader():
        if service.reloader is None:
            raise HTTPException(409, "this server was not given model files to watch")
        return service.reloader

    @app.get("/admin/reload", dependencies=[Depends(require_key)], responses={409: {"model": Problem}})
    async def reload_status() -> dict:
        """How often model files are looked at, the last look, and the files refused."""
        return reloader().status()

    @app.post("/admin/reload", response_model=Reload, dependencies=[Depends(require_key)],
              responses={409: {"model": Problem}, 503: {"model": Problem}})
    async def reload() -> dict:
        """Looks at the model files now: new and changed ones are verified, loaded and warmed up, then
        swapped in (requests in flight finish on the old version); removed ones stop being served;
        a file that fails is refused and the old version keeps serving."""
        watcher = reloader()
        if service.status != "ready":
            raise HTTPException(503, f"the server is {service.status}: try again shortly", headers=retry)
        return await asyncio.get_running_loop().run_in_executor(None, watcher.reload)
