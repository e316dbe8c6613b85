"""Running the real app in tests: the ASGI app with its lifespan, an httpx client on
it (in process, no sockets), and settings pointing at the fixtures' models and stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import Services, create_app
from service.settings import Settings


def settings(repo: Path, store_file: Path | None = None, redis_url: str | None = None,
             **groups: dict[str, Any]) -> Settings:  # fmt: skip
    store: dict[str, Any] = (
        {"kind": "redis", "url": redis_url}
        if redis_url
        else {"kind": "embedded", "path": store_file}
    )
    store.update(groups.pop("store", {}))
    return Settings.model_validate({"repo": repo, "store": store, **groups})


@asynccontextmanager
async def running(s: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc",
                                     timeout=30) as client:  # fmt: skip
            yield app, client


def services(app: FastAPI) -> Services:
    svc: Services = app.state.services
    return svc
