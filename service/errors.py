"""One error hierarchy, one JSON error schema, one mapping to HTTP statuses.

Every error a client can see is a :class:`ServiceError` carrying its status, a stable
machine-readable ``code`` and, for 429/503, a ``Retry-After``. The errors of the layers
below (the feature store's, the backends') are mapped here, in :func:`to_service_error`,
and nowhere else; routes contain no try/except. Every answer has the body::

    {"error": {"code": "...", "message": "...", "request_id": "..."}}

Never a stack trace, never the request's payload; anything unexpected is logged with
its traceback and answered 500 ``internal`` with no details. Bad input is always a 4xx.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from feature_store.errors import FeatureStoreError, StoreUnavailable, VersionError
from model_export.errors import ModelRepositoryError
from service.backends.base import BackendError, BackendOverloaded, BackendUnavailable

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class Unauthenticated(ServiceError):
    status, code = 401, "unauthenticated"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    """A valid request the current state refuses (an admin swap that failed checks)."""

    status, code = 409, "conflict"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class Unavailable(ServiceError):
    """A dependency (feature store, backend) cannot answer now, or the model and the
    embeddings do not belong together."""

    status, code = 503, "unavailable"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class ClientGone(ServiceError):
    """The client disconnected; nothing is sent (499 in logs and metrics only)."""

    status, code = 499, "client_closed_request"


class Internal(ServiceError):
    status, code = 500, "internal"


def to_service_error(exc: BaseException, retry_after: int) -> ServiceError:
    """The one mapping of lower-layer errors to client-visible ones."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, BackendOverloaded):
        return Overloaded("the inference backend is overloaded", retry_after=retry_after)
    if isinstance(exc, BackendUnavailable):
        return Unavailable("the inference backend is unavailable", retry_after=retry_after)
    if isinstance(exc, BackendError):
        return Internal("inference failed")
    if isinstance(exc, StoreUnavailable | TimeoutError):
        return Unavailable("the feature store is unavailable", retry_after=retry_after)
    if isinstance(exc, VersionError):
        return Unavailable("no usable embedding version is loaded", retry_after=retry_after)
    if isinstance(exc, FeatureStoreError):
        return Internal("feature read failed")
    if isinstance(exc, ModelRepositoryError):
        return Conflict(f"model repository refused: {exc}")
    return Internal("internal error")


def error_body(err: ServiceError, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if request_id:
        body["request_id"] = request_id
    return {"error": body}


def error_response(err: ServiceError, request_id: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    headers = dict(headers or {})
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    return JSONResponse(
        error_body(err, request_id), status_code=err.status, headers=headers or None
    )


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


_MAPPED = (ServiceError, BackendError, FeatureStoreError, ModelRepositoryError, TimeoutError)


def _invalid_input(exc: RequestValidationError) -> InvalidInput:
    parts = []
    for e in exc.errors()[:10]:  # locations and messages; the input is never echoed
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return InvalidInput("; ".join(parts))


def client_error(exc: Exception, retry_after: int, where: str) -> ServiceError:
    """What the client is told about ``exc`` raised while answering ``where`` (e.g.
    ``POST /v1/rank``), logged as the handlers below log it: the handlers of
    :func:`install` and the middleware's direct ranking path share it."""
    if isinstance(exc, RequestValidationError):
        return _invalid_input(exc)
    if isinstance(exc, _MAPPED):
        err = to_service_error(exc, retry_after)
        if err.status >= 500 and not isinstance(exc, ServiceError):
            # the lower layer's message may name hosts or files: logs only
            log.warning("%s -> %d: %s", where, err.status, exc)
        return err
    log.error("unhandled error on %s", where, exc_info=exc)
    return Internal("internal error")


def install(app: FastAPI, retry_after: int) -> None:
    """Register every handler (called once by the app factory)."""

    async def mapped(request: Request, exc: Exception) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        return error_response(client_error(exc, retry_after, where), _request_id(request))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # FastAPI's "error parsing the body": invalid input
            return error_response(InvalidInput("the body is not valid JSON"), _request_id(request))
        err = ServiceError(str(exc.detail))
        err.status, err.code = exc.status_code, f"http_{exc.status_code}"
        # keeps e.g. the Allow header of a 405 (RFC 9110)
        return error_response(err, _request_id(request), dict(exc.headers or {}))

    # Exception too: registered under it, Starlette would re-raise after answering
    for cls in (*_MAPPED, RequestValidationError, Exception):
        app.add_exception_handler(cls, mapped)
    app.add_exception_handler(StarletteHTTPException, http_error)
