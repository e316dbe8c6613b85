"""An asyncio TCP proxy that delays traffic: the "slow Redis" fault (no tc netem or
toxiproxy on these machines).

:class:`DelayProxy` listens on a free local port and forwards every connection to
``upstream``; each chunk read from either side is held ``delay_ms`` before it is
written on (a one-way delay per direction, so a request/response round trip takes at
least ``2 * delay_ms``). ``delay_ms`` can be changed while traffic flows; chunks keep
their order. It runs its own event loop in a daemon thread, so a blocking caller
(a test, a command) can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType


class DelayProxy:
    def __init__(self, upstream_host: str, upstream_port: int, delay_ms: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_ms = delay_ms
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delay proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def up() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(up())
        self._loop.run_forever()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await asyncio.gather(self._pipe(cr, uw), self._pipe(ur, cw))
        finally:
            self._conns.discard(task)
            for w in (cw, uw):
                w.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Forward r -> w, each chunk written ``delay_ms`` after it was read (order kept)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def writer() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                w.write(data)
                await w.drain()

        wt = asyncio.create_task(writer())
        try:
            while True:
                data = await r.read(65536)
                await q.put((loop.time() + self.delay_ms / 1e3, data))
                if not data:
                    break
            await wt
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            wt.cancel()
            with contextlib.suppress(BaseException):
                await wt
            w.close()  # the other direction sees EOF

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def down() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
