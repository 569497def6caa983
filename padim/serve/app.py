"""The FastAPI app: routes, the API key, errors as one-line JSON, and the models' batchers.

Route handlers hold no PaDiM logic: decoding is ``uploads``, scoring is ``registry.score_pixels``
behind a ``batcher.MicroBatcher``, thresholds come from ``PaDiM.operating_point`` (a per-request
choice that never changes the model), pictures from ``render``. Blocking work (decoding, scoring,
PNG encoding) runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Dict, List, Mapping, Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from padim import __version__
from padim.errors import DataError, PadimError
from padim.pipeline.records import label as decided_label
from padim.serve import render
from padim.serve.batcher import BatcherClosed, MicroBatcher, QueueFull
from padim.serve.metrics import Metrics, MetricsMiddleware
from padim.serve.registry import ServedModel, describe, score_pixels, warm_up
from padim.serve.schemas import Health, ImageResult, ModelInfo, Prediction, Problem
from padim.serve.uploads import UploadError, clip, decode_upload, discard_rest, read_multipart

log = logging.getLogger("uvicorn.error")  # the server's log (its level is padim serve's --log-level)


@dataclass(frozen=True)
class ServeSettings:
    """max_batch: images per backbone batch (1: no batching); max_wait_ms: how long the first image
    of a batch waits for others; queue: images waiting per model before 503; max_upload_mb: body
    size per request; max_files: files per request; api_key: bearer token required on every route
    but /health (None: none; an empty or blank key is refused); decode_workers: threads decoding
    uploads and drawing heatmaps."""

    max_batch: int = 16
    max_wait_ms: float = 8.0
    queue: int = 64
    max_upload_mb: float = 32.0
    max_files: int = 16
    api_key: Optional[str] = None
    decode_workers: int = 2
    retry_after_s: int = 1

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


class Service:
    """The app's state: models, their batchers, the decoding threads, readiness, metrics."""

    def __init__(self, models: Mapping[str, ServedModel], settings: ServeSettings,
                 on_ready: Optional[Callable[[Optional[str]], None]]):
        self.models, self.settings, self.on_ready = dict(models), settings, on_ready
        self.names = {alias: entry for entry in self.models.values() for alias in entry.aliases}
        self.names.update(self.models)
        self.metrics = Metrics()
        self.status, self.detail = "warming", None
        self.pool: Optional[ThreadPoolExecutor] = None
        self.batchers: Dict[str, MicroBatcher] = {}
        # Predict requests between reading their body and answering: beyond this many, new ones get
        # 503 before their body is read, which bounds the memory uploads take (each <= max_upload_mb).
        self.admitted, self.max_admitted = 0, settings.queue + settings.max_batch

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="padim-decode")
        for name, entry in self.models.items():
            self.batchers[name] = MicroBatcher(
                lambda pixels, model=entry.model: score_pixels(model, pixels), self.settings.max_batch,
                self.settings.max_wait_ms / 1000.0, self.settings.queue, name,
                on_batch=lambda n, seconds, name=name: self._batch_done(name, n, seconds),
                warmup=lambda model=entry.model: warm_up(model, self.settings.max_batch)).start()
        threading.Thread(target=self._await_warm_up, name="padim-warm-up", daemon=True).start()

    def _batch_done(self, name: str, n: int, seconds: float) -> None:
        self.metrics.batch_size.labels(name).observe(n)
        self.metrics.batch_seconds.labels(name).observe(seconds)
        self.metrics.images.labels(name).inc(n)
        self.metrics.queue.labels(name).set(self.batchers[name].pending)

    def _await_warm_up(self) -> None:
        failures = []
        for name, batcher in self.batchers.items():
            batcher.ready.wait()
            if batcher.warmup_error is not None:
                failures.append(f"model {name}: {batcher.warmup_error}")
        if self.status == "warming":
            self.status, self.detail = ("failed", "; ".join(failures)) if failures else ("ready", None)
        if self.on_ready is not None:
            self.on_ready(self.detail)

    def stop(self) -> None:
        """Refuses new work, scores what is queued, then returns (uvicorn calls it once every
        connection has been answered, so normally nothing is left)."""
        self.status = "stopping"
        for batcher in self.batchers.values():
            batcher.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def lookup(self, name: str) -> ServedModel:
        entry = self.names.get(name)  # a table lookup only: a name never becomes a path
        if entry is None:
            raise HTTPException(404, f"no model named {clip(name)!r}; this server has: "
                                     f"{', '.join(sorted(self.models))}")
        return entry


def _problem(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(models: Mapping[str, ServedModel], settings: ServeSettings = ServeSettings(),
               on_ready: Optional[Callable[[Optional[str]], None]] = None) -> FastAPI:
    """The service for ``models`` (see ``registry.load_models``). Models warm up in the background
    once the app starts; /health answers 200 only after that. ``on_ready(error or None)`` is called
    when warm-up ends."""
    settings.check()
    service = Service(models, settings, on_ready)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(title="padim", version=__version__, lifespan=lifespan,
                  description="PaDiM anomaly detection: score images against models fitted on defect-free images. "
                              "The page at / uploads images and shows heatmaps.",
                  responses={401: {"model": Problem}})
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key (or PADIM_API_KEY)")
    retry = {"Retry-After": str(settings.retry_after_s)}

    def require_key(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _problem(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return _problem(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: say so in JSON, keep serving
        return _problem(500, f"internal error ({type(exc).__name__}): {' '.join(str(exc).split())[:300]}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        # The page holds no data: it is open like /docs, and asks for the API key for its calls.
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """200 once every model is loaded and warmed up; 503 while warming, stopping or failed."""
        body = Health(status=service.status, models=sorted(service.models), detail=service.detail)
        return JSONResponse(body.model_dump(), status_code=200 if service.status == "ready" else 503,
                            headers=None if service.status == "ready" else retry)

    @app.get("/models", response_model=List[ModelInfo], dependencies=[Depends(require_key)])
    async def list_models() -> List[dict]:
        return [describe(entry) for entry in service.models.values()]

    @app.get("/models/{name}", response_model=ModelInfo, dependencies=[Depends(require_key)],
             responses={404: {"model": Problem}})
    async def get_model(name: str = Path(description="a model's name or alias")) -> dict:
        return describe(service.lookup(name))

    @app.get("/metrics", response_class=Response, dependencies=[Depends(require_key)])
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

    @app.post("/models/{name}/predict", response_model=Prediction, dependencies=[Depends(require_key)],
              openapi_extra=upload_body,
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
        file that cannot be read gets its own ``error`` and the others are still scored."""
        entry = service.lookup(name)
        model = entry.model
        if target_fpr is not None and threshold is not None:
            raise HTTPException(422, "give target_fpr or threshold, not both")
        if any(v is not None and not math.isfinite(v) for v in (threshold, pixel_threshold)):
            raise HTTPException(422, "threshold and pixel_threshold must be finite numbers")
        try:
            point = model.operating_point(target_fpr=target_fpr, image_threshold=threshold,
                                          pixel_threshold=pixel_threshold)
        except PadimError as exc:  # e.g. a target FPR for a model without calibration
            message = str(exc).replace("`image_threshold`", "threshold").replace("`pixel_threshold`", "pixel_threshold")
            raise HTTPException(422, message) from None
        if service.status != "ready":
            raise HTTPException(503, f"the server is {service.status}: try again shortly", headers=retry)
        if service.admitted >= service.max_admitted:
            service.metrics.rejected.labels(entry.name).inc()
            raise HTTPException(503, f"busy: {service.admitted} requests in progress; try again shortly", headers=retry)
        service.admitted += 1
        try:
            return await _predict(request, entry, point, heatmap)
        finally:
            service.admitted -= 1

    async def _predict(request: Request, entry: ServedModel, point, heatmap: bool) -> Prediction:
        model = entry.model
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
                        f"{client.host}:{client.port}" if client else "?", entry.name)
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
        service.metrics.image_errors.labels(entry.name).inc(len(files) - len(good))
        if not good:
            raise HTTPException(415, "not an image padim can read: " + "; ".join(decoded))
        batcher = service.batchers[entry.name]
        try:
            futures = batcher.submit([decoded[i][0] for i in good])
        except (QueueFull, BatcherClosed) as exc:
            service.metrics.rejected.labels(entry.name).inc()
            raise HTTPException(503, f"busy: {exc}; try again shortly", headers=retry) from None
        service.metrics.queue.labels(entry.name).set(batcher.pending)
        scored = dict(zip(good, await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))))
        scores = [scored[i][0] for i in good]
        p_values = model.p_values(scores)
        p_of = dict(zip(good, [None] * len(good) if p_values is None else p_values.tolist()))

        ignore = getattr(model, "ignore_mask_", None)
        ignore = None if ignore is None else ignore.cpu().numpy()

        def result(i: int) -> ImageResult:
            if i not in scored:
                return ImageResult(index=i, file=files[i].filename, error=decoded[i])
            pixels, (height, width), picture = decoded[i]
            score, anomaly_map = scored[i]
            label = decided_label(score, point.image_threshold)
            drawn = render.heatmap(anomaly_map, (height, width), picture, pixels, cropped,
                                   point.pixel_threshold, ignore) if heatmap else None
            return ImageResult(index=i, file=files[i].filename, width=width, height=height, score=score,
                               p_value=p_of[i], label=label, threshold=point.image_threshold,
                               threshold_source=point.source, pixel_threshold=point.pixel_threshold,
                               pixel_threshold_source=point.pixel_source, heatmap=drawn)

        if heatmap:  # PNG encoding is CPU work: off the event loop
            results = await asyncio.gather(*(loop.run_in_executor(service.pool, result, i) for i in range(len(files))))
        else:
            results = [result(i) for i in range(len(files))]
        warnings = [point.warning] if point.warning else []
        if model.uses_random_weights:
            warnings.append("random backbone weights: the scores mean nothing (tests only)")
        return Prediction(model=entry.name, engine=model.engine, warnings=warnings, results=list(results))

    return app
