"""HTTP plumbing below the routes: the ASGI middleware (body limit, request id, outcome
metrics), authentication, the deadline header and the client-disconnect watch.

FastAPI does not cap request bodies: :class:`HttpMiddleware` reads the body first, up to
``api.max_body_bytes`` (a larger ``Content-Length`` is refused before anything is read),
answers 413 in the common error schema past it, and replays the body to the app.

Admission: at most ``api.max_in_flight`` ranking requests are handled at once; one more
is answered 429 with Retry-After at once, before its body is read (the batcher's queue
limit applies later, after the feature read; this bound keeps refusals cheap under
overload and the work in progress, hence memory and accepted latency, bounded).

``POST /v1/rank`` is answered here, by :func:`rank_body`, without FastAPI's routing,
exception middleware and dependency injection: measured at K=100 on one core, that
layer cost 0.14-0.32 ms of the event loop's ~1 ms per request. The route in
:mod:`service.routes` calls the same function (and documents the endpoint); errors go
through the same mapping (:func:`service.errors.client_error`).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BodyTooLarge,
    ClientGone,
    Forbidden,
    InvalidInput,
    Overloaded,
    Unauthenticated,
    client_error,
    error_body,
    error_response,
)
from service.metrics import Metrics
from service.ranking import Deadline
from service.schemas import parse_rank_request
from service.settings import ApiSettings

if TYPE_CHECKING:
    from service.app import Services

Headers = dict[bytes, bytes]  # an ASGI request's headers (names lower-case)

T = TypeVar("T")
RANK_PATH = "/v1/rank"


def _startup_failure_in_one_line(scope: Scope, send: Send) -> Send:
    """``send`` for the lifespan: a startup that failed on bad input (the lifespan put
    its reason in ``app.state.startup_error``: a missing or broken model repository) is
    reported by uvicorn as that one line, not as the traceback Starlette sends."""

    async def wrapped(message: Message) -> None:
        reason = getattr(scope["app"].state, "startup_error", None)
        if message["type"] == "lifespan.startup.failed" and reason:
            message = {**message, "message": f"mmrank cannot start: {reason}"}
        await send(message)

    return wrapped


class HttpMiddleware:
    def __init__(self, app: ASGIApp, api: ApiSettings, metrics: Metrics) -> None:
        self.app = app
        self.limit = api.max_body_bytes
        self.metrics = metrics
        self.max_in_flight, self.retry_after = api.max_in_flight, api.retry_after_s
        self.in_flight = 0  # ranking requests being handled (one event loop: no lock)
        self._busy_err = Overloaded("too many requests in flight", retry_after=self.retry_after)
        self._busy = orjson.dumps(error_body(self._busy_err))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _startup_failure_in_one_line(scope, send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or None
        state = scope.setdefault("state", {})
        state["started"], state["request_id"] = started, rid
        ranking = scope["path"] == RANK_PATH
        status = [0]
        if ranking and self.in_flight >= self.max_in_flight:
            self.metrics.rejected("in_flight")
            self.metrics.outcome(429)
            await self._refuse(send, rid)
            return
        if ranking:
            self.in_flight += 1
        try:
            await self._handle(scope, receive, send, headers, rid, ranking, started, status)
        finally:
            if ranking:
                self.in_flight -= 1

    async def _refuse(self, send: Send, rid: str | None) -> None:
        """429 + Retry-After in the common error schema, written straight to the ASGI
        server (under overload this path runs many times per accepted request: measured,
        a Response object per refusal cost a share of the goodput at 5x saturation)."""
        body = self._busy if rid is None else orjson.dumps(error_body(self._busy_err, rid))
        await _send_json(send, 429, body, self.retry_after)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes],
                      rid: str | None, ranking: bool, started: float, status: list[int]) -> None:  # fmt: skip

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        body = bytearray()
        too_large = declared > self.limit
        more = not too_large and scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.limit
            if too_large:
                break
        if too_large:
            err = BodyTooLarge(f"the request body is larger than {self.limit} bytes")
            await error_response(err, rid)(scope, receive, send_wrapper)
        else:
            replayed = [False]

            async def replay() -> Message:
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()  # after the body: waits for http.disconnect

            if ranking and scope["method"] == "POST":
                await self._rank(scope, bytes(body), headers, rid, started, receive, send_wrapper)
            else:
                await self.app(scope, replay, send_wrapper)
        if ranking:
            code = status[0] or 499  # nothing sent: the client left
            self.metrics.outcome(code)
            if code == 200:
                self.metrics.latency.observe(time.monotonic() - started)

    async def _rank(self, scope: Scope, body: bytes, headers: Headers, rid: str | None,
                    started: float, receive: Receive, send: Send) -> None:  # fmt: skip
        """``POST /v1/rank`` answered directly (see the module docstring)."""
        try:
            payload = await rank_body(scope["app"].state.services, headers, body, started,
                                      receive)  # fmt: skip
        except Exception as exc:
            err = client_error(exc, self.retry_after, "POST /v1/rank")
            await _send_json(send, err.status, orjson.dumps(error_body(err, rid)), err.retry_after)
            return
        await _send_json(send, 200, payload)


async def _send_json(send: Send, status: int, body: bytes, retry_after: int | None = None) -> None:
    """A whole JSON answer written straight to the ASGI server (no Response object)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if retry_after is not None:
        headers.append((b"retry-after", b"%d" % retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def rank_body(svc: Services, headers: Headers, body: bytes, started: float,
                    receive: Receive) -> bytes:  # fmt: skip
    """The JSON answer of ``POST /v1/rank``: key check, deadline header, body, ranking
    (cancelled if the client leaves); raises what :func:`service.errors.client_error`
    maps."""
    api = svc.settings.api
    if api.api_keys:
        check_key(headers, api.api_keys, "/v1/rank")
    deadline = deadline_of(headers, api, started)
    req = parse_rank_request(body)
    return await until_disconnect(receive, svc.ranking.rank(req, deadline, started))


def _presented(headers: Headers) -> str | None:
    key = headers.get(b"x-api-key", b"").decode("latin-1")
    if key:
        return key
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


def check_key(headers: Headers, keys: list[SecretStr], what: str) -> None:
    """Unauthenticated (401) without a key, Forbidden (403) with a wrong one; ``keys``
    empty means open (the caller decides whether that is allowed)."""
    got = _presented(headers)
    if got is None:
        raise Unauthenticated(f"{what} needs an API key (x-api-key or Authorization: Bearer)")
    if not any(hmac.compare_digest(got.encode(), k.get_secret_value().encode()) for k in keys):
        raise Forbidden("the API key is not accepted here")


def deadline_of(headers: Headers, api: ApiSettings, started: float) -> Deadline:
    """The request's deadline: its header (ms, relative to arrival), capped, else the
    default; counted from ``started``, when the middleware saw the request."""
    raw = headers.get(api.deadline_header.lower().encode("latin-1"))
    ms = api.default_deadline_ms
    if raw is not None:
        try:
            ms = float(raw)
        except ValueError:
            ms = float("nan")
        if not ms > 0:  # also NaN
            raise InvalidInput(f"{api.deadline_header} must be a positive number of ms")
        ms = min(ms, api.max_deadline_ms)
    return Deadline(started + ms / 1e3)


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` in the calling task; if the client disconnects first, cancel it (a
    queued job is then skipped by the batcher) and raise ClientGone. One watcher task,
    no task for ``work`` itself."""
    task = asyncio.current_task()
    assert task is not None, "until_disconnect runs inside a task"
    finished = False

    def client_left(watch: asyncio.Future[None]) -> None:
        if not finished and not watch.cancelled() and watch.exception() is None:
            task.cancel("client_gone")

    gone = asyncio.ensure_future(_wait_disconnect(receive))
    gone.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if gone.done() and not gone.cancelled() and gone.exception() is None:
            task.uncancel()
            raise ClientGone("the client disconnected") from None
        raise
    finally:
        finished = True
        gone.remove_done_callback(client_left)
        gone.cancel()


async def _wait_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
