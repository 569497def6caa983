"""The FastAPI app: the API key, errors as one-line JSON, and the routes that describe the service.

The routes that score are ``routes_predict``; drift, feedback and reloads are ``routes_admin``; the
state they share is ``service.Service`` (model versions, batchers, monitoring).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from importlib import resources
from typing import Callable, List, Mapping, Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from padim.version import __version__
from padim.serve.metrics import MetricsMiddleware
from padim.serve.registry import ServedModel
from padim.serve.routes_admin import add_admin_routes
from padim.serve.routes_predict import add_predict_route
from padim.serve.schemas import Health, ModelInfo, Problem
from padim.serve.service import Service
from padim.serve.settings import ServeSettings
from padim.serve.versions import ModelSource

__all__ = ["ServeSettings", "create_app"]


def _problem(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(models: Mapping[str, ServedModel], settings: ServeSettings = ServeSettings(),
               on_ready: Optional[Callable[[Optional[str]], None]] = None,
               source: Optional[ModelSource] = None) -> FastAPI:
    """The service for ``models`` (see ``registry.load_models``). Models warm up in the background
    once the app starts; /health answers 200 only after that. ``on_ready(error or None)`` is called
    when warm-up ends. With ``source`` (where ``models`` came from), its files are watched
    (``settings.reload_interval``, and ``POST /admin/reload``) and new versions swapped in live."""
    settings.check()
    service = Service(models, settings, on_ready, source)
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
        body = Health(status=service.status, models=sorted(service.versions), detail=service.detail)
        return JSONResponse(body.model_dump(), status_code=200 if service.status == "ready" else 503,
                            headers=None if service.status == "ready" else retry)

    @app.get("/models", response_model=List[ModelInfo], dependencies=[Depends(require_key)])
    async def list_models() -> List[dict]:
        """Every model served: the version serving (SHA-256, fit date), the versions loaded, the last
        file refused, and the drift alarm."""
        return [service.describe(version) for _, version in sorted(service.versions.items())]

    @app.get("/models/{name}", response_model=ModelInfo, dependencies=[Depends(require_key)],
             responses={404: {"model": Problem}})
    async def get_model(name: str = Path(description="a model's name or alias")) -> dict:
        return service.describe(service.current(name))

    @app.get("/metrics", response_class=Response, dependencies=[Depends(require_key)])
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_predict_route(app, service, require_key, retry)
    add_admin_routes(app, service, require_key, retry)
    return app
