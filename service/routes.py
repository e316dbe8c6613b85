"""The HTTP routes (DESIGN section 5). Thin: fetch the services built by the lifespan,
call them, return; errors are raised and mapped in :mod:`service.errors`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.app import Services
from service.errors import Forbidden, NotFound, Unavailable
from service.http import check_key, rank_body
from service.models import repository_dir
from service.schemas import RankRequest, RankResponse, SwapRequest

router = APIRouter()


# Dependencies are ``async def``: FastAPI runs plain ``def`` ones in a thread pool,
# a thread hop (and GIL hand-off) per dependency per request.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def admin_auth(request: Request, svc: ServicesDep) -> None:
    keys = svc.settings.api.admin_api_keys
    if not keys:
        raise Forbidden("the admin API is disabled (no admin keys are configured)")
    check_key(dict(request.scope["headers"]), keys, "the admin API")


# service.http.HttpMiddleware answers POST /v1/rank itself (no routing, no dependency
# injection: the hot path); this route documents it and runs the same rank_body
@router.post(
    "/v1/rank",
    response_model=RankResponse,
    # the body is parsed by parse_rank_request, not by FastAPI; its schema for the docs:
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": RankRequest.model_json_schema()}},
        }
    },
    responses={
        k: {"description": d}
        for k, d in (
            (401, "no API key"),
            (403, "wrong API key"),
            (413, "body too large"),
            (422, "invalid input"),
            (429, "overloaded; Retry-After"),
            (
                503,
                "feature store or backend unavailable, or model and embeddings do not belong "
                "together; Retry-After",
            ),
            (504, "deadline exceeded"),
        )
    },
)
async def rank(request: Request, svc: ServicesDep) -> Response:
    """Rank ``candidates`` for ``user_id``; the deadline header bounds the whole call."""
    body = await rank_body(svc, dict(request.scope["headers"]), await request.body(),
                           request.state.started, request.receive)  # fmt: skip
    return Response(body, media_type="application/json")


@router.get("/v1/models")
async def models(svc: ServicesDep) -> dict[str, Any]:
    """The loaded model (signature, versions, backend) and its fit with the embeddings."""
    ready, reasons, emb = await svc.readiness()
    slot = svc.models.current
    return {
        "models": [slot.describe()] if slot else [],
        "embeddings": emb,
        "ready": ready,
        "not_ready_reasons": reasons,
        "last_swap_error": svc.models.last_swap_error,
    }


@router.post("/v1/admin/models", dependencies=[Depends(admin_auth)])
async def swap_model(body: SwapRequest, svc: ServicesDep) -> dict[str, Any]:
    """Load, verify, warm and swap in the model repository at ``repo``; on any failure
    the current model keeps serving (409 / 422 with the reason)."""
    root = repository_dir(body.repo)
    if root is None:
        raise NotFound("no model repository at that path")
    try:
        active = await svc.store.manifest()
    except Exception:  # the check below refuses the swap with this reason
        active = None
    new, old = await svc.models.swap(root, active, body.require_compatible)
    return {
        "swapped": True,
        "model": new.describe(),
        "previous": old.manifest.version if old else None,
    }


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(svc: ServicesDep) -> JSONResponse:
    ok, reasons, _ = await svc.readiness()
    if not ok:
        err = Unavailable(
            "not ready: " + "; ".join(reasons), retry_after=svc.settings.api.retry_after_s
        )
        return JSONResponse({"ready": False, "reasons": reasons}, status_code=err.status,
                            headers={"Retry-After": str(err.retry_after)})  # fmt: skip
    return JSONResponse({"ready": True})


@router.get("/metrics")
async def metrics(svc: ServicesDep) -> Response:
    if not svc.settings.api.metrics:
        raise NotFound("metrics are disabled")
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
