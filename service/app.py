"""The app factory: :func:`create_app` builds a FastAPI app whose lifespan creates the
feature-store client, the model (backend + batcher) and the ranking pipeline once, and
closes them on shutdown. Routes (:mod:`service.routes`) fetch them through
``app.state.services``.

Start-up fails (the process exits) when the model repository does not verify; a feature
store that does not answer yet only keeps the service not ready.

Shutdown (:func:`serve`, :class:`DrainingServer`): on the first SIGTERM/SIGINT readiness
turns false at once while requests are still accepted for ``shutdown.unready_s``; then
the listener closes and the requests in flight get the rest of ``shutdown.drain_s`` to
finish; then the lifespan closes the model and the store. Requests accepted before the
signal are answered (unless the drain budget runs out). A second signal skips the
unready phase.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from feature_store.store import FeatureStore
from service import errors
from service.http import HttpMiddleware
from service.metrics import Metrics
from service.models import ModelHolder
from service.ranking import RankingService
from service.settings import Settings

log = logging.getLogger(__name__)


def build_store(settings: Settings) -> FeatureStore:
    s = settings.store
    if s.kind == "embedded":
        from feature_store.embedded import EmbeddedStore

        assert s.path is not None  # checked by Settings
        return EmbeddedStore(s.path, cache_items=s.cache_items, pointer_ttl_s=s.pointer_ttl_s)
    from feature_store.reader import RedisSettings, RedisStore

    return RedisStore(
        RedisSettings(
            url=s.url,
            cluster=s.kind == "cluster",
            namespace=s.namespace,
            socket_timeout_s=s.socket_timeout_ms / 1e3,
            connect_timeout_s=s.connect_timeout_ms / 1e3,
            retries=s.retries,
            max_connections=s.pool_size,
            pointer_ttl_s=s.pointer_ttl_s,
            cache_items=s.cache_items,
        )
    )


@dataclass
class Services:
    """Everything the routes use, built once per app."""

    settings: Settings
    metrics: Metrics
    store: FeatureStore
    models: ModelHolder
    ranking: RankingService
    draining: bool = False  # set by the first SIGTERM: readiness is false from then on

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Services:
        store = build_store(settings)
        metrics.watch_store(store.stats)
        models = ModelHolder(settings, metrics)
        try:
            await models.load_initial(settings.repo)
        except BaseException:
            await store.close()
            raise
        return cls(settings, metrics, store, models, RankingService(settings, store, models,
                                                                    metrics))  # fmt: skip

    async def close(self) -> None:
        await self.models.close()
        await self.store.close()

    async def readiness(self) -> tuple[bool, list[str], dict[str, Any]]:
        """(ready, reasons it is not, embedding info): a model is loaded and warm, its
        backend answers, the store answers within its timeout, and its active version
        fits the model."""
        reasons: list[str] = ["shutting down"] if self.draining else []
        emb: dict[str, Any] = {"version": None, "compatible": False, "problems": []}
        slot = self.models.current
        timeout = self.settings.store.timeout_ms / 1e3
        if slot is None:
            reasons.append("no model is loaded")
        else:
            try:
                backend_ok = await asyncio.wait_for(slot.backend.ready(), timeout)
            except Exception as exc:  # an unreachable backend means not ready, with the reason
                log.debug("backend check failed: %s", exc)
                backend_ok = False
            if not backend_ok:
                reasons.append(f"the inference backend ({slot.backend.name}) is not ready")
        try:
            if not await asyncio.wait_for(self.store.ping(), timeout):
                raise ConnectionError("ping failed")
            vm = await asyncio.wait_for(self.store.manifest(), timeout)
        except Exception as exc:  # any store failure means not ready, with the reason
            log.debug("store check failed: %s", exc)
            reasons.append(f"the feature store does not answer ({type(exc).__name__})")
            return False, reasons, emb
        emb["version"] = vm.version
        emb["built_by"] = {"name": vm.model_name, "version": vm.model_version,
                           "item_tower_sha256": vm.item_tower_sha256}  # fmt: skip
        if slot is not None:
            problems = slot.problems(vm)
            emb["compatible"], emb["problems"] = not problems, problems
            reasons += problems
        return not reasons, reasons, emb


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.model_validate({})
    logging.getLogger("service").setLevel(settings.log_level.upper())
    metrics = Metrics()  # one registry per app (tests run several apps in one process)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services = await Services.start(settings, metrics)
        except (ValueError, OSError) as exc:  # bad input (no or a broken model): one line
            app.state.startup_error = f"{type(exc).__name__}: {exc}"
            raise
        app.state.services = services
        log.info("mmrank service ready to accept requests")
        try:
            yield
        finally:
            await services.close()

    docs = settings.api.docs
    app = FastAPI(
        title="mmrank",
        summary="Ranking inference for multimodal CVR models",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    errors.install(app, settings.api.retry_after_s)
    from service.routes import router

    app.include_router(router)
    app.add_middleware(HttpMiddleware, api=settings.api, metrics=metrics)
    if docs:
        _document(app, settings)
    return app


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"},
        "request_id": {"type": "string"}}}},
}  # fmt: skip
_ERRORS = {  # (path, method): statuses the middleware, auth and handlers can answer
    ("/v1/rank", "post"): (401, 403, 413, 422, 429, 503, 504),
    ("/v1/admin/models", "post"): (401, 403, 404, 409, 413, 422, 429, 503),
    ("/v1/models", "get"): (),
    ("/v2/health/ready", "get"): (503,),
    ("/metrics", "get"): (404,),
}


def _document(app: FastAPI, settings: Settings) -> None:
    """/openapi.json states what the service really answers: every error status with
    the one error schema, /metrics as text, the configured limits (candidates per
    request, id length) and the served model's context fields in the ranking request's
    schema."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        app.openapi_schema = None  # rebuilt per call: the context fields follow the model
        spec = base()
        err = {"application/json": {"schema": ERROR_SCHEMA}}
        for (path, method), codes in _ERRORS.items():
            op = spec.get("paths", {}).get(path, {}).get(method)
            if op is None:
                continue
            for code in codes:
                r = op.setdefault("responses", {}).setdefault(str(code), {"description": "error"})
                r["content"] = err
        metrics_ok = (
            spec["paths"].get("/metrics", {}).get("get", {}).get("responses", {}).get("200")
        )
        if metrics_ok is not None:
            metrics_ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        rank = spec["paths"].get("/v1/rank", {}).get("post", {})
        body = rank.get("requestBody", {}).get("content", {}).get("application/json", {})
        props = body.get("schema", {}).get("properties", {})
        a = settings.api
        if "user_id" in props:
            props["user_id"]["maxLength"] = a.max_id_length
        if "candidates" in props:
            props["candidates"]["maxItems"] = a.max_candidates
            props["candidates"]["items"]["maxLength"] = a.max_id_length
        services: Services | None = getattr(app.state, "services", None)
        slot = services.models.current if services is not None else None
        if "context" in props and slot is not None:
            names = [f.name for f in slot.manifest.user_fields if f.name != "user_id"]
            props["context"]["propertyNames"] = {"enum": names}
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a readiness-first shutdown (the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.app_ref, self.unready_s = app, settings.shutdown.unready_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.unready_s <= 0:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        services: Services | None = getattr(self.app_ref.state, "services", None)
        if services is not None:
            services.draining = True
        log.info("signal %d: not ready; closing the listener in %.1fs", sig, self.unready_s)
        timer = threading.Timer(self.unready_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def serve(app: FastAPI, settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """Run ``app`` on uvicorn with the drain of :class:`DrainingServer` (blocks)."""
    sd = settings.shutdown
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=settings.api.keep_alive_s,
                            timeout_graceful_shutdown=max(int(sd.drain_s - sd.unready_s), 1))  # fmt: skip
    try:
        DrainingServer(config, app, settings).run()
    except KeyboardInterrupt:  # uvicorn re-raises a handled Ctrl-C after its shutdown
        log.info("stopped (SIGINT)")
