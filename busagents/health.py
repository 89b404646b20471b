"""``/healthz`` and ``/metrics`` of an agent process, for probes and scrapers.

``busagents run NAME --http-port 8080`` (or ``BUSAGENTS_HTTP_PORT``) serves, on
``BUSAGENTS_HTTP_HOST`` (127.0.0.1 unless set, e.g. to 0.0.0.0 in a container):

- ``GET /healthz``: ``200`` with ``{"status": "serving", ...}`` while the worker serves and its
  NATS connection is up; ``503`` while it starts, drains or is stopped, or while NATS is away
  (``status`` says which, ``connected`` and ``draining`` say why). A readiness probe takes it
  as it is; a liveness probe should allow for an outage of NATS (nats-py reconnects).
- ``GET /metrics``: Prometheus text, through the OpenTelemetry Prometheus exporter, of each
  agent's counters in this process: ``busagents_messages_handled_total``,
  ``busagents_messages_dead_lettered_total``, ``busagents_messages_published_total`` and the
  ``busagents_messages_in_flight`` gauge, labelled ``agent``.

The exporter gets a registry of its own per server: two workers in one process (tests) do not
see each other's counters.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["HealthServer"]

log = logging.getLogger("busagents.health")


class HealthServer:
    """Serves ``/healthz`` and ``/metrics`` of ``worker`` on ``host:port`` (0: a free port)."""

    def __init__(self, worker: Worker, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=True)
        names = ", ".join(a.name for a in worker.agents)
        self._meters = MeterProvider(
            metric_readers=[
                PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=self.registry)
            ],
            resource=Resource({"service.name": names}),
        )
        meter = self._meters.get_meter("busagents.health")
        for field, help_ in (
            ("handled", "messages handled (the handler returned)"),
            ("dead_lettered", "messages sent to the dead-letter subject"),
            ("published", "messages the agent published"),
        ):
            meter.create_observable_counter(
                f"busagents.messages.{field}", callbacks=[self._observe(field)], unit="1", description=help_
            )
        meter.create_observable_up_down_counter(
            "busagents.messages.in_flight", callbacks=[self._observe("in_flight")], unit="1", description="in hand now"
        )
        self._runner: web.AppRunner | None = None

    def _observe(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(s, field), {"agent": name}) for name, s in self.worker.stats.items()]

        return observe

    def health(self) -> tuple[int, dict[str, object]]:
        """The status code and the body of ``/healthz``."""
        state = self.worker.state
        connected = self.worker.bus.nc.is_connected
        status = state if connected or state != "serving" else "disconnected"
        body: dict[str, object] = {
            "status": status,
            "connected": connected,
            "draining": state in ("draining", "stopped"),
            "agents": [a.name for a in self.worker.agents],
        }
        return (200 if status == "serving" else 503), body

    async def _healthz(self, request: web.Request) -> web.Response:
        code, body = self.health()
        return web.json_response(body, status=code)

    async def _metrics(self, request: web.Request) -> web.Response:
        data = generate_latest(self.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        """Start serving; returns the port (the one chosen when ``port`` was 0)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server((self.host, self.port), reuse_port=False)  # bound here: 0 picks a free port
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()
        log.info("serving /healthz and /metrics on http://%s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._meters.shutdown()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
