"""Locust load for the mmrank ranking API (``POST /v1/rank``).

Self-contained (locust + the standard library): the compose ``locust`` service runs it
in the stock Locust image, ``mmrank loadtest`` runs it headless on the host.

The request mix (DESIGN section 10):

- users and items are Zipf-distributed (exponent ``--zipf-s``) over a seeded random
  order of the ids in ``--ids-file`` (``ids.json`` of the stack directory:
  ``{"users": [...], "items": [...]}``): a few hot users and items, a long tail;
- K candidates per request drawn from ``--k-mix`` (default 100, 500 and 1000 with
  weights 0.5/0.3/0.2), distinct items, capped at the catalog size;
- ``--unknown-user-rate`` of the requests name a user the store does not hold, and
  ``--missing-item-rate`` of them carry a few item ids no version holds; the service
  must list exactly those in ``missing_items`` (else the request counts as failed);
- arrivals: each simulated user sends on its own Poisson schedule of rate
  ``--user-rps`` (exponential gaps on an absolute timeline, so a slow answer makes the
  next request late, not the rate lower), so N users offer a Poisson stream of
  N x user-rps requests/s until the service saturates.

:class:`StepLoad` (a ``LoadTestShape``) raises the offered load in steps
(``--step-rps``, each ``--step-seconds`` long) to find saturation.

``--request-log FILE``: one CSV row per request (``REQUEST_LOG_FIELDS``), which
``mmrank loadtest`` turns into per-step percentiles; Locust's own ``--csv`` files are
written as usual.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import itertools
import json
import math
import random
import time
from typing import Any, ClassVar

from locust import FastHttpUser, LoadTestShape, events, task

REQUEST_LOG_FIELDS = ["t", "offered_rps", "k", "unknown_user", "missing_sent", "status",
                      "latency_ms", "server_ms", "error"]  # fmt: skip


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("mmrank")
    g.add_argument("--ids-file", env_var="MMRANK_IDS_FILE", default="ids.json",
                   help="ids.json of the stack directory (users and items)")  # fmt: skip
    g.add_argument("--k-mix", env_var="MMRANK_K_MIX", default="100:0.5,500:0.3,1000:0.2",
                   help="candidates per request K:weight,...")  # fmt: skip
    g.add_argument("--zipf-s", env_var="MMRANK_ZIPF_S", type=float, default=1.0)
    g.add_argument("--unknown-user-rate", env_var="MMRANK_UNKNOWN_USER_RATE", type=float,
                   default=0.02)  # fmt: skip
    g.add_argument("--missing-item-rate", env_var="MMRANK_MISSING_ITEM_RATE", type=float,
                   default=0.05)  # fmt: skip
    g.add_argument("--user-rps", env_var="MMRANK_USER_RPS", type=float, default=0.5,
                   help="requests/s each simulated user offers (Poisson)")  # fmt: skip
    g.add_argument("--step-rps", env_var="MMRANK_STEP_RPS", default="2,4,8,16,32",
                   help="offered load of each step, requests/s")  # fmt: skip
    g.add_argument("--step-seconds", env_var="MMRANK_STEP_SECONDS", type=float, default=30.0)
    g.add_argument("--deadline-ms", env_var="MMRANK_DEADLINE_MS", type=float, default=1000.0,
                   help="x-mmrank-deadline-ms header sent with each request")  # fmt: skip
    g.add_argument("--request-log", env_var="MMRANK_REQUEST_LOG", default="",
                   help="CSV file: one row per request")  # fmt: skip
    g.add_argument("--seed", env_var="MMRANK_SEED", type=int, default=0)


def parse_k_mix(text: str) -> list[tuple[int, float]]:
    """``"100:0.5,500:0.3"`` -> ``[(100, 0.5), (500, 0.3)]``; ValueError when malformed."""
    out = []
    for part in text.split(","):
        k, _, w = part.partition(":")
        out.append((int(k), float(w or 1)))
    if not out or any(k < 1 or w <= 0 for k, w in out):
        raise ValueError(f"--k-mix {text!r}: want K:weight pairs with K >= 1, weight > 0")
    return out


def parse_steps(text: str) -> list[float]:
    steps = [float(x) for x in text.split(",") if x.strip()]
    if not steps or any(s <= 0 for s in steps):
        raise ValueError(f"--step-rps {text!r}: want positive requests/s, comma-separated")
    return steps


class Zipf:
    """Zipf(s) over ``ids`` in a seeded random order: rank r has weight 1 / r**s."""

    def __init__(self, ids: list[str], s: float, rng: random.Random) -> None:
        if not ids:
            raise ValueError("no ids to draw from")
        self.ids = ids[:]
        rng.shuffle(self.ids)
        self.weights = [1.0 / (r + 1) ** s for r in range(len(self.ids))]
        self.cum = list(itertools.accumulate(self.weights))

    def one(self, rng: random.Random) -> str:
        return self.ids[bisect.bisect_left(self.cum, rng.random() * self.cum[-1])]

    def distinct(self, k: int, rng: random.Random) -> list[str]:
        """``k`` distinct ids (all of them when ``k`` >= the catalog), Zipf-weighted
        sampling without replacement (Efraimidis-Spirakis for large ``k``)."""
        n = len(self.ids)
        if k >= n:
            return self.ids[:]
        if 4 * k < n:  # draw with replacement, keep first occurrences
            seen: dict[str, None] = {}
            for _ in range(50):
                for i in rng.choices(self.ids, cum_weights=self.cum, k=2 * k):
                    seen.setdefault(i, None)
                if len(seen) >= k:
                    return list(seen)[:k]
        keys = ((rng.random() ** (1.0 / w), i) for w, i in zip(self.weights, self.ids, strict=True))
        return [i for _, i in heapq.nlargest(k, keys)]


class Mix:
    """Everything one request needs, drawn from the options."""

    def __init__(self, opts: Any) -> None:
        with open(opts.ids_file) as f:
            ids = json.load(f)
        rng = random.Random(opts.seed)
        self.users = Zipf([str(u) for u in ids["users"]], opts.zipf_s, rng)
        self.items = Zipf([str(i) for i in ids["items"]], opts.zipf_s, rng)
        self.k_mix = parse_k_mix(opts.k_mix)
        self.unknown_rate, self.missing_rate = opts.unknown_user_rate, opts.missing_item_rate
        self.counter = itertools.count()

    def request(self, rng: random.Random) -> tuple[dict[str, Any], int, bool, set[str]]:
        """(body, K, unknown user?, item ids sent that the store cannot hold)."""
        ks, ws = zip(*self.k_mix, strict=True)
        k = rng.choices(ks, weights=ws)[0]
        n = next(self.counter)
        unknown = rng.random() < self.unknown_rate
        user = f"loadtest-unknown-user-{n}" if unknown else self.users.one(rng)
        cands = self.items.distinct(k, rng)
        missing: set[str] = set()
        if rng.random() < self.missing_rate:
            m = max(1, len(cands) // 100)
            missing = {f"loadtest-missing-item-{n}-{j}" for j in range(m)}
            cands = cands[: len(cands) - m] + sorted(missing)
            rng.shuffle(cands)
        return (
            {"user_id": user, "candidates": cands, "request_id": f"lt-{n}"},
            len(cands),
            unknown,
            missing,
        )


_STATE: dict[str, Any] = {"offered": 0.0}


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    _STATE["mix"] = Mix(opts)
    if opts.request_log:
        f = open(opts.request_log, "w", newline="")  # noqa: SIM115 (closed at test_stop)
        _STATE["log_file"] = f
        _STATE["log"] = csv.writer(f)
        _STATE["log"].writerow(REQUEST_LOG_FIELDS)


@events.test_stop.add_listener
def _stop(**_: Any) -> None:
    f = _STATE.pop("log_file", None)
    if f is not None:
        f.close()
        _STATE.pop("log", None)


class RankUser(FastHttpUser):
    """One client of the ranking API on its own Poisson schedule."""

    _ids: ClassVar[itertools.count[int]] = itertools.count()

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.rate = opts.user_rps
        self.deadline = str(opts.deadline_ms)
        self.rng = random.Random(opts.seed * 1_000_003 + next(self._ids))
        self.next_at = time.monotonic() + self.rng.expovariate(self.rate)

    def wait_time(self) -> float:
        self.next_at += self.rng.expovariate(self.rate)
        return max(0.0, self.next_at - time.monotonic())

    @task
    def rank(self) -> None:
        body, k, unknown, missing = _STATE["mix"].request(self.rng)
        t0 = time.perf_counter()
        error, server_ms, status = "", math.nan, 0
        with self.client.post("/v1/rank", json=body, name=f"/v1/rank K={k}",
                              headers={"x-mmrank-deadline-ms": self.deadline},
                              catch_response=True) as resp:  # fmt: skip
            latency_ms = 1e3 * (time.perf_counter() - t0)
            status = resp.status_code or 0
            if status == 0:  # no HTTP answer: name the client's exception (reset, timeout...)
                error = f"HTTP 0 ({type(resp.error).__name__})"
            elif status != 200:
                error = f"HTTP {status}"
            else:
                try:
                    out = resp.json()
                    server_ms = float(out["timings_ms"]["total"])
                    if len(out["items"]) != k:
                        error = f"{len(out['items'])} items for {k} candidates"
                    elif set(out["missing_items"]) != missing:
                        error = "missing_items differ from the ids the store cannot hold"
                except (ValueError, KeyError, TypeError) as exc:
                    error = f"bad body: {type(exc).__name__}"
            if error:
                resp.failure(error)
            else:
                resp.success()
        w = _STATE.get("log")
        if w is not None:
            w.writerow([f"{time.time():.3f}", _STATE["offered"], k, int(unknown), len(missing),
                        status, f"{latency_ms:.2f}", f"{server_ms:.2f}", error])  # fmt: skip


class StepLoad(LoadTestShape):
    """Offered load in steps: ``--step-rps`` requests/s, each ``--step-seconds`` long;
    users per step = offered / ``--user-rps`` (at least 1). Stops after the last step."""

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options if self.runner else None
        if opts is None:
            return None
        steps = parse_steps(opts.step_rps)
        i = int(self.get_run_time() // opts.step_seconds)
        if i >= len(steps):
            return None
        users = max(1, round(steps[i] / opts.user_rps))
        _STATE["offered"] = users * opts.user_rps
        return users, float(users)
