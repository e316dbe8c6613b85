"""The hot-path Redis client (feature_store.resp) against real redis-server processes:
replies, ACL users and databases, timeouts of a frozen server, a killed and restarted
one, a call cancelled mid-flight (its late reply is never read as the next call's), the
pool bound."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis

from feature_store.local_redis import LocalRedis
from feature_store.resp import Endpoint, RespError, RespPool, endpoint, pack


def _pool(port: int, **kw: float) -> RespPool:
    opts: dict = {"max_connections": 4, "timeout_s": 0.3, "connect_timeout_s": 0.5, "retries": 1}
    opts.update(kw)
    return RespPool(Endpoint("127.0.0.1", port), **opts)


def _cmd(*args: str) -> bytes:
    return pack(*args)


def test_endpoint_parsing() -> None:
    assert endpoint("redis://h:7000/3") == Endpoint("h", 7000, 3)
    assert endpoint("redis://h") == Endpoint("h", 6379, 0)
    assert endpoint("redis://ranker:p%40ss@h:1/0") == Endpoint("h", 1, 0, "ranker", "p@ss")
    assert endpoint("redis://:secret@h:1") == Endpoint("h", 1, 0, None, "secret")
    for other in ("rediss://h:1", "unix:///tmp/r.sock", "redis://h:1/0?protocol=3", "http://h"):
        assert endpoint(other) is None, other


def test_replies_and_error_replies() -> None:
    with LocalRedis() as r:
        r.client().mset({"a": b"1", "b": b"\x00\xff"})

        async def main() -> None:
            p = _pool(r.port)
            assert await p.execute(_cmd("MGET", "a", "nope", "b")) == [b"1", None, b"\x00\xff"]
            calls = await asyncio.gather(*(p.execute(_cmd("GET", "a")) for _ in range(20)))
            assert calls == [b"1"] * 20
            with pytest.raises(RespError, match="wrong number of arguments"):
                await p.execute(_cmd("GET"))
            assert await p.execute(_cmd("GET", "b")) == b"\x00\xff"  # still in step
            await p.close()

        asyncio.run(main())


def test_acl_user_password_and_database() -> None:
    acl = ["--user", "ranker", "on", ">s3cret", "~*", "+get", "+mget", "+select", "+ping"]
    with LocalRedis(acl) as r:

        async def main() -> None:
            good = RespPool(Endpoint("127.0.0.1", r.port, 2, "ranker", "s3cret"),
                            max_connections=2, timeout_s=0.5, connect_timeout_s=0.5,
                            retries=0)  # fmt: skip
            assert await good.execute(_cmd("MGET", "k")) == [None]
            with pytest.raises(RespError, match="NOPERM"):
                await good.execute(_cmd("SET", "k", "v"))  # read-only user
            await good.close()
            bad = RespPool(Endpoint("127.0.0.1", r.port, 0, "ranker", "wrong"),
                           max_connections=2, timeout_s=0.5, connect_timeout_s=0.5,
                           retries=0)  # fmt: skip
            with pytest.raises(RespError, match="WRONGPASS"):
                await bad.execute(_cmd("GET", "k"))
            await bad.close()

        asyncio.run(main())


def test_database_is_selected() -> None:
    with LocalRedis() as r:
        redis.Redis(port=r.port, db=3).set("k", b"in-3")

        async def main() -> None:
            p = RespPool(Endpoint("127.0.0.1", r.port, 3), max_connections=1, timeout_s=0.5,
                         connect_timeout_s=0.5, retries=0)  # fmt: skip
            assert await p.execute(_cmd("GET", "k")) == b"in-3"
            await p.close()

        asyncio.run(main())


def test_frozen_server_times_out_then_recovers() -> None:
    """SIGSTOP: the call fails in ~timeout x (retries + 1) plus the backoff; after
    SIGCONT the pool answers again on a fresh connection."""
    with LocalRedis() as r:
        r.client().set("k", b"v")

        async def main() -> None:
            p = _pool(r.port, timeout_s=0.2, retries=1)
            assert await p.execute(_cmd("GET", "k")) == b"v"  # one pooled connection
            os.kill(r.proc.pid, signal.SIGSTOP)
            try:
                t = time.monotonic()
                with pytest.raises(TimeoutError):
                    await p.execute(_cmd("GET", "k"))
                took = time.monotonic() - t
            finally:
                os.kill(r.proc.pid, signal.SIGCONT)
            assert 0.35 < took < 1.0, took
            assert await p.execute(_cmd("GET", "k")) == b"v"
            await p.close()

        asyncio.run(main())


def test_killed_server_refuses_then_restarted_answers() -> None:
    with LocalRedis() as r:
        port = r.port

        async def main() -> None:
            p = _pool(port)
            assert await p.execute(_cmd("GET", "k")) is None
            r.stop()
            t = time.monotonic()
            with pytest.raises(ConnectionError):
                await p.execute(_cmd("GET", "k"))
            assert time.monotonic() - t < 0.5  # refused at once, not a timeout
            with LocalRedis(port=port) as again:
                again.client().set("k", b"back")
                assert await p.execute(_cmd("GET", "k")) == b"back"
            await p.close()

        asyncio.run(main())


def test_cancelled_call_never_leaks_its_reply() -> None:
    """A call cancelled while Redis holds its reply (CLIENT PAUSE) closes its
    connection: the next call on the pool reads its own reply, not the late one."""
    with LocalRedis() as r:
        r.client().mset({"a": b"A", "b": b"B"})

        async def main() -> None:
            p = _pool(r.port, max_connections=1, timeout_s=2.0)
            assert await p.execute(_cmd("GET", "a")) == b"A"
            r.client().execute_command("CLIENT", "PAUSE", "300", "ALL")
            slow = asyncio.create_task(p.execute(_cmd("GET", "a")))
            await asyncio.sleep(0.05)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert await p.execute(_cmd("GET", "b")) == b"B"  # after the pause ends
            await p.close()

        asyncio.run(main())


def test_pool_bound_waits_for_a_free_connection() -> None:
    with LocalRedis() as r:
        r.client().set("k", b"v")

        async def main() -> None:
            p = _pool(r.port, max_connections=1, timeout_s=0.3)
            got = await asyncio.gather(*(p.execute(_cmd("GET", "k")) for _ in range(5)))
            assert got == [b"v"] * 5 and len(p._open) == 1  # five calls, one connection
            await p._slots.acquire()  # the one connection is busy elsewhere
            t = time.monotonic()
            with pytest.raises(TimeoutError, match="no free redis connection"):
                await p._once(_cmd("GET", "k"))  # one attempt: the pool wait alone
            assert 0.25 < time.monotonic() - t < 0.8
            p._slots.release()
            assert await p.execute(_cmd("GET", "k")) == b"v"
            await p.close()

        asyncio.run(main())


def test_a_pool_reused_on_another_event_loop() -> None:
    with LocalRedis() as r:
        r.client().set("k", b"v")
        p = _pool(r.port)
        for _ in range(2):  # the second asyncio.run has a new loop; the old one is closed
            assert asyncio.run(p.execute(_cmd("GET", "k"))) == b"v"
