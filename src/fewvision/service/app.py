"""The HTTP layer of the inspection service (FastAPI): routes under ``/v1``, token auth, JSON errors, the page.

Every route is a thin call into :class:`fewvision.service.core.Service`. Errors are JSON
``{"error": {"code", "message"}}`` with a 4xx status; nothing the client sends is used as a path.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..reports.shift import shift_report
from .core import Service as _Service
from .common import ServiceError, Settings, read_uploads
from .guard import Guard, bearer, error

PAGE = Path(__file__).resolve().parent / "page"


class ClassIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    task: str = Field(pattern="^(classification|anomaly)$")
    backbone: str | None = Field(default=None, max_length=500)
    method: str | None = Field(default=None, max_length=50)
    classes: list[ClassIn] = Field(default_factory=list, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)


class ProjectPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    params: dict[str, Any] | None = None


class ReviewIn(BaseModel):
    label: str = Field(min_length=1, max_length=200)


def svc(request: Request) -> _Service:
    return request.app.state.service


def auth(request: Request, authorization: Annotated[str | None, Header()] = None):
    """The caller's token (``Authorization: Bearer ...``); 401 without a valid one. A request with a body had it
    checked before the body was read (:class:`~fewvision.service.guard.Guard`)."""
    checked = getattr(request.state, "token", None)
    return checked if checked is not None else svc(request).authenticate(bearer(authorization))


# Module-level, so FastAPI can resolve the (string) annotations of the routes.
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]  # a database integer: larger ids cannot exist
Svc = Annotated[_Service, Depends(svc)]
Auth = Annotated[Any, Depends(auth)]


def create_app(settings: Settings, service: _Service | None = None) -> FastAPI:
    """The app; ``service`` (already started) for tests that drive the core directly too."""
    own = service is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own:
            app.state.service = _Service(settings)
            app.state.service.start()
        yield
        if own:
            app.state.service.stop()

    # No /docs or /redoc: their pages load from a CDN, which a line network does not reach; the schema is served.
    app = FastAPI(title="fewvision inspection service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, max_body_size=settings.max_request_bytes,
                  description="Zero-shot / few-shot classification and anomaly detection for visual inspection. "
                              "Every endpoint but /v1/health needs 'Authorization: Bearer <token>'.")
    app.add_middleware(Guard)
    if service is not None:
        app.state.service = service
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return error(422, "invalid", f"{where}: {first.get('msg', 'invalid request')}" if where else
                     first.get("msg", "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        return error(500, "internal", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500])

    def project_of(service: _Service, token, project_id: Id) -> dict:
        service.allow(token, project_id)
        return service.project(project_id)

    # --- routes ---------------------------------------------------------------------------------------------
    @app.get("/v1/health")
    def health(service: Svc) -> dict:
        return {"status": "ok", "version": __version__, "store": service.engine.dialect.name}

    @app.post("/v1/projects", status_code=201)
    def create_project(body: ProjectIn, service: Svc, token: Auth) -> dict:
        if token.project_id is not None:
            raise ServiceError(403, "forbidden", "a token limited to one project cannot create projects")
        return service.create_project(body.name, body.task, body.backbone, body.method,
                                      [c.model_dump() for c in body.classes], body.params)

    @app.get("/v1/projects")
    def list_projects(service: Svc, token: Auth) -> list[dict]:
        return service.projects(token)

    @app.get("/v1/projects/{project_id}")
    def get_project(project_id: Id, service: Svc, token: Auth) -> dict:
        return project_of(service, token, project_id)

    @app.patch("/v1/projects/{project_id}")
    def patch_project(project_id: Id, body: ProjectPatch, service: Svc, token: Auth) -> dict:
        project_of(service, token, project_id)
        return service.update_project(project_id, body.name, body.params)

    @app.delete("/v1/projects/{project_id}")
    def delete_project(project_id: Id, service: Svc, token: Auth) -> dict:
        project_of(service, token, project_id)
        if token.project_id is not None:
            raise ServiceError(403, "forbidden", "a token limited to one project cannot delete it")
        return service.delete_project(project_id)

    @app.post("/v1/projects/{project_id}/exemplars", status_code=201)
    def add_exemplar(project_id: Id, service: Svc, token: Auth, file: Annotated[UploadFile, File()],
                     label: Annotated[str, Form(max_length=200)] = "good") -> dict:
        project_of(service, token, project_id)
        return service.add_exemplar(project_id, file.file.read(), file.filename or "", label)

    @app.get("/v1/projects/{project_id}/exemplars")
    def list_exemplars(project_id: Id, service: Svc, token: Auth) -> list[dict]:
        project_of(service, token, project_id)
        return service.exemplars(project_id)

    @app.post("/v1/projects/{project_id}/fit", status_code=202)
    def fit(project_id: Id, service: Svc, token: Auth) -> dict:
        project_of(service, token, project_id)
        return service.start_fit(project_id)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: Annotated[str, PathParam(max_length=36)], service: Svc, token: Auth) -> dict:
        job = service.job(job_id)
        service.allow(token, job["project_id"])
        return job

    @app.get("/v1/projects/{project_id}/models")
    def list_models(project_id: Id, service: Svc, token: Auth) -> list[dict]:
        project_of(service, token, project_id)
        return service.models(project_id)

    @app.get("/v1/projects/{project_id}/models/{version}")
    def get_model(project_id: Id, version: Id, service: Svc, token: Auth) -> dict:
        project_of(service, token, project_id)
        return service.model_detail(project_id, version)

    @app.post("/v1/projects/{project_id}/models/{version}/activate")
    def activate(project_id: Id, version: Id, service: Svc, token: Auth) -> dict:
        project_of(service, token, project_id)
        return service.activate(project_id, version)

    @app.post("/v1/projects/{project_id}/predict")
    def predict(project_id: Id, service: Svc, token: Auth, file: Annotated[UploadFile, File()]) -> dict:
        project_of(service, token, project_id)
        return service.predict(project_id, read_uploads([file]))[0]

    @app.post("/v1/projects/{project_id}/predict-batch")
    def predict_batch(project_id: Id, service: Svc, token: Auth,
                      files: Annotated[list[UploadFile], File()]) -> dict:
        project_of(service, token, project_id)
        return {"predictions": service.predict(project_id, read_uploads(files))}

    @app.get("/v1/projects/{project_id}/predictions")
    def list_predictions(project_id: Id, service: Svc, token: Auth, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                         before_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
                         decision: Annotated[str | None, Query(pattern="^(accept|reject|review)$")] = None) -> dict:
        project_of(service, token, project_id)
        return service.predictions(project_id, limit, before_id, decision)

    @app.get("/v1/predictions/{prediction_id}")
    def get_prediction(prediction_id: Id, service: Svc, token: Auth) -> dict:
        pred = service.prediction(prediction_id)
        service.allow(token, pred["project_id"])
        return pred

    @app.get("/v1/predictions/{prediction_id}/heatmap", response_class=FileResponse)
    def get_heatmap(prediction_id: Id, service: Svc, token: Auth):
        service.allow(token, service.prediction(prediction_id)["project_id"])
        return FileResponse(service.prediction_file(prediction_id, "heatmap"), media_type="image/png")

    @app.get("/v1/predictions/{prediction_id}/image", response_class=FileResponse)
    def get_image(prediction_id: Id, service: Svc, token: Auth):
        service.allow(token, service.prediction(prediction_id)["project_id"])
        return FileResponse(service.prediction_file(prediction_id, "image"), media_type="application/octet-stream")

    @app.get("/v1/projects/{project_id}/review")
    def review_queue(project_id: Id, service: Svc, token: Auth,
                     limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict]:
        project_of(service, token, project_id)
        return service.review_queue(project_id, limit)

    @app.get("/v1/predictions/{prediction_id}/reviews")
    def list_reviews(prediction_id: Id, service: Svc, token: Auth) -> list[dict]:
        service.allow(token, service.prediction(prediction_id)["project_id"])
        return service.reviews(prediction_id)

    @app.post("/v1/predictions/{prediction_id}/review")
    def review(prediction_id: Id, body: ReviewIn, service: Svc, token: Auth) -> dict:
        service.allow(token, service.prediction(prediction_id)["project_id"])
        return service.review(prediction_id, body.label, token)

    @app.get("/v1/projects/{project_id}/monitor")
    def get_monitor(project_id: Id, service: Svc, token: Auth,
                    since: Annotated[str | None, Query(max_length=40)] = None) -> dict:
        project_of(service, token, project_id)
        return service.monitor(project_id, since)

    @app.get("/v1/projects/{project_id}/report", response_class=HTMLResponse)
    def get_report(project_id: Id, service: Svc, token: Auth,
                   since: Annotated[str | None, Query(max_length=40)] = "8h"):
        project_of(service, token, project_id)
        return HTMLResponse(shift_report(service.shift(project_id, since or None)))

    @app.post("/v1/projects/{project_id}/monitor/reset")
    def reset_monitor(project_id: Id, service: Svc, token: Auth) -> dict:
        project_of(service, token, project_id)
        return service.reset_monitor(project_id, token)

    @app.post("/v1/alarms/{alarm_id}/acknowledge")
    def acknowledge(alarm_id: Id, service: Svc, token: Auth) -> dict:
        service.allow(token, service.alarm(alarm_id)["project_id"])
        return service.acknowledge_alarm(alarm_id, token)

    # --- the page -------------------------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})

    return app
