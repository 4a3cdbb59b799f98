"""Small HTTP pieces ``vgg serve`` needs, without a dependency: Prometheus text, a per-client rate limit, a body limit.

prometheus_client would add a dependency for four metrics; the text format is a few lines (see ``Metrics``).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# A body over the limit is read (and dropped) up to this many times the limit before the 413 is sent.
DRAIN_FACTOR = 4


class Metrics:
    """Prometheus text by hand: four metrics do not need a client library."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        if path == "/predict":
            self.latency[_bucket(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def observe_batch(self, size: int) -> None:
        self.batches[_bucket(BATCH_BUCKETS, size)] += 1
        self.batch_sum += size

    def render(self) -> str:
        lines = ["# TYPE vgg_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'vgg_requests_total{{path="{path}",status="{status}"}} {n}')
        lines.append("# TYPE vgg_errors_total counter")
        lines += [f'vgg_errors_total{{kind="{kind}"}} {n}' for kind, n in sorted(self.errors.items())]
        lines += _histogram("vgg_request_seconds", LATENCY_BUCKETS, self.latency, self.latency_sum)
        lines += _histogram("vgg_batch_size", BATCH_BUCKETS, self.batches, self.batch_sum)
        return "\n".join(lines) + "\n"


def _bucket(bounds: tuple, value: float) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def _histogram(name: str, bounds: tuple, counts: list[int], total: float) -> list[str]:
    lines, running = [f"# TYPE {name} histogram"], 0
    for bound, n in zip([*bounds, math.inf], counts, strict=True):
        running += n
        lines.append(f'{name}_bucket{{le="{"+Inf" if bound == math.inf else bound}"}} {running}')
    return [*lines, f"{name}_sum {total}", f"{name}_count {running}"]


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests, refilled continuously; a bounded table of clients."""

    def __init__(self, per_minute: int, max_clients: int = 10_000):
        self.capacity = float(per_minute)
        self.refill = per_minute / 60.0
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, now: float) -> bool:
        tokens, last = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.refill)
        allowed = tokens >= 1.0
        self.buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)  # the least recently seen client starts afresh
        return allowed


BODY_STATE = "vgg.body"


def body_too_large(scope: dict) -> bool:
    """Whether ``BodyLimit`` cut this request's body short."""
    return bool(scope.get(BODY_STATE, {}).get("too_large"))


class BodyLimit:
    """ASGI middleware: a body (chunked or not) past ``limit`` bytes is cut short, and flagged for the route.

    The route sees an ended body and ``body_too_large(scope)``; raising here instead would surface in another
    task (Starlette's middleware reads bodies in a task group) as a 500.
    """

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        state = scope[BODY_STATE] = {"too_large": False}

        async def limited() -> dict:
            nonlocal received
            if state["too_large"]:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # Read and drop the rest, up to a bound, so that a client still sending can read the 413:
                # closing on unread data resets the connection, and the client sees a broken pipe instead.
                while message.get("more_body") and received <= DRAIN_FACTOR * self.limit:
                    message = await receive()
                    received += len(message.get("body", b""))
                state["too_large"] = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        await self.app(scope, limited, send)
