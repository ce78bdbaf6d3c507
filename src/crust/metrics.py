"""Prometheus exporter for :meth:`crust.Service.statistics` (optional extra ``crust[metrics]``).

::

    async with MetricsExporter(svc, port=9464) as exporter:   # http://127.0.0.1:9464/metrics
        ...

Every integer field of :class:`crust.types.Statistics` becomes a ``crust_<field>`` metric
(counters get the ``_total`` suffix; ``peers`` and ``connections`` are gauges); the
``<name>_by_<label>`` dict fields become one metric with that label, e.g.
``crust_bytes_sent_by_transport_total{transport="quic"}``.  The values are read from the
service at each scrape, on the event loop (a small asyncio HTTP server, no threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from crust.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from crust.service import Service
    from crust.types import Statistics

log = logging.getLogger("crust.metrics")

GAUGES = frozenset({"peers", "connections"})
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigError(
            "the Prometheus exporter needs the metrics extra: pip install 'crust[metrics]'",
            field="metrics_port",
        ) from exc
    return prometheus_client


class StatisticsCollector:
    """A prometheus_client collector reading a service's statistics at each collect."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats: Statistics = self.svc.statistics()
        for f in dataclasses.fields(stats):
            value = getattr(stats, f.name)
            name = "crust_" + f.name
            doc = f"crust statistics: {f.name.replace('_', ' ')}"
            if isinstance(value, dict):
                label = f.name.rsplit("_by_", 1)[-1] if "_by_" in f.name else "key"
                items = sorted(value.items(), key=lambda kv: str(kv[0]))
                if any(isinstance(n, tuple) for _, n in items):
                    # (attempts, successes) pairs: one counter each
                    for i, part in enumerate(("attempts", "successes")):
                        family = CounterMetricFamily(f"{name}_{part}", doc, labels=[label])
                        for key, n in items:
                            family.add_metric([str(key)], n[i])
                        yield family
                    continue
                family = CounterMetricFamily(name, doc, labels=[label])
                for key, n in items:
                    family.add_metric([str(key)], n)
                yield family
            elif isinstance(value, int) and not isinstance(value, bool):
                if f.name in GAUGES:
                    yield GaugeMetricFamily(name, doc, value=value)
                else:
                    yield CounterMetricFamily(name, doc, value=value)


def render(svc: Service) -> bytes:
    """The statistics in the Prometheus text exposition format."""
    prom = _require()
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(StatisticsCollector(svc))
    data: bytes = prom.generate_latest(registry)
    return data


class MetricsExporter:
    """Serves ``GET /metrics`` on ``host:port`` (loopback by default; port 0 picks one)."""

    def __init__(self, svc: Service, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if type(port) is not int or not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be 0..65535, not {port!r}", field="metrics_port")
        _require()
        self.svc = svc
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port}: {exc}", field="metrics_port"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsExporter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, ctype = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a slow, truncated or oversized request: just close
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > MAX_REQUEST_HEAD:
            return "431 Request Header Fields Too Large", b"", "text/plain"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET\n", "text/plain"
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/metrics", b"/"):
            return "404 Not Found", b"see /metrics\n", "text/plain"
        body = render(self.svc)
        prom = _require()
        return "200 OK", b"" if parts[0] == b"HEAD" else body, str(prom.CONTENT_TYPE_LATEST)


__all__ = ["MetricsExporter", "StatisticsCollector", "render"]
