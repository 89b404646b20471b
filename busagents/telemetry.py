"""OpenTelemetry for busagents: one trace across every hop of a conversation.

A :class:`Telemetry` given to a :class:`~busagents.bus.Bus` makes every publish a
PRODUCER span (and every query a CLIENT span) that writes W3C ``traceparent`` /
``tracestate`` into the envelope, and every handled message a CONSUMER span whose
parent is the sender's span, following the OpenTelemetry messaging semantic
conventions. Metrics: messages sent and processed (with their outcome) and the
processing duration. Without a Telemetry the hot path pays nothing.

``configure_from_env`` sets up the SDK with OTLP/HTTP export when the standard
``OTEL_*`` variables ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_TRACES_EXPORTER``...), so traces show in Jaeger, Phoenix or any OTLP backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from .envelope import TRACEPARENT, TRACESTATE, Envelope
from .errors import ConfigError
from .worker import Outcome

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["Telemetry", "configure_from_env"]

_propagator = TraceContextTextMapPropagator()
_SCOPE = "busagents"
_FAILED = {Outcome.DEAD_LETTERED: "dead-lettered", Outcome.RETRY: "failed; redelivered later"}


class Telemetry:
    """Tracer and meter of busagents; uses the global OpenTelemetry providers unless given others."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        from . import __version__

        self.tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self.sent = meter.create_counter(
            "messaging.client.sent.messages", unit="{message}", description="Messages published"
        )
        self.processed = meter.create_counter(
            "messaging.client.consumed.messages", unit="{message}", description="Messages handled, by outcome"
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Time to handle one message"
        )
        # GenAI semantic conventions, recorded by busagents.llm for every model call.
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per model call, by gen_ai.token.type"
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Time of one model call, retries included"
        )

    @contextmanager
    def publish_span(self, subject: str, template: str, envelope: Envelope, *, request: bool = False) -> Iterator[Span]:
        """A PRODUCER (or CLIENT, for a query) span whose context travels in the envelope."""
        operation = "send" if request else "publish"
        with self.tracer.start_as_current_span(
            f"{operation} {template}",
            kind=SpanKind.CLIENT if request else SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.name": operation,
                "messaging.operation.type": "send",
                "messaging.destination.name": subject,
                "messaging.message.id": envelope.id,
                "messaging.message.conversation_id": envelope.conversation_id,
                "busagents.contract": envelope.contract,
                "busagents.sender": envelope.sender or "",
            },
        ) as span:
            carrier: dict[str, str] = {}
            _propagator.inject(carrier)
            envelope.traceparent = carrier.get(TRACEPARENT)
            envelope.tracestate = carrier.get(TRACESTATE)
            self.sent.add(1, {"messaging.destination.name": template, "busagents.contract": envelope.contract})
            yield span

    @contextmanager
    def span(
        self, name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, AttributeValue] | None = None
    ) -> Iterator[Span]:
        """A span of the current trace (an LLM call, a tool call...): raised errors mark it failed."""
        with self.tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span

    def traced_handle(
        self,
        handle: Callable[[Msg], Awaitable[Outcome]],
        *,
        agent: str,
        contract: str,
        template: str,
    ) -> Callable[[Msg], Awaitable[Outcome]]:
        """Wrap a worker's message handler in a CONSUMER span parented by the sender's span.

        The span's status is the outcome ``handle`` returns: an error when the message was
        dead-lettered or is to be retried.
        """
        name = f"process {template}"
        tracer = self.tracer
        base: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": agent,
            "busagents.agent": agent,
            "busagents.contract": contract,
        }
        metric_attrs = {"messaging.destination.name": template, "busagents.agent": agent}

        async def traced(msg: Msg) -> Outcome:
            headers = msg.headers
            parent: OtelContext | None = _propagator.extract(headers) if headers and TRACEPARENT in headers else None
            attributes = dict(base)
            attributes["messaging.destination.name"] = msg.subject
            attributes["messaging.message.body.size"] = len(msg.data)
            if headers:
                attributes["messaging.message.id"] = headers.get("Nats-Msg-Id", "")
                attributes["messaging.message.conversation_id"] = headers.get("Ba-Conversation-Id", "")
            start = time.perf_counter()
            with tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
            ) as span:
                outcome = await handle(msg)
                if outcome is not Outcome.HANDLED:
                    span.set_status(Status(StatusCode.ERROR, _FAILED[outcome]))
                span.set_attribute("busagents.outcome", outcome.value)
            self.duration.record(time.perf_counter() - start, metric_attrs)
            self.processed.add(1, {**metric_attrs, "busagents.outcome": outcome.value})
            return outcome

        return traced


def configure_from_env(service_name: str) -> Telemetry | None:
    """Set up the OpenTelemetry SDK with OTLP/HTTP export when the ``OTEL_*`` variables ask for it.

    Returns None (telemetry off, zero cost) unless ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp`` is set, or
    ``BUSAGENTS_TELEMETRY=1``; ``OTEL_TRACES_EXPORTER=console`` prints spans on stdout
    instead; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turns it off.
    OTLP goes over HTTP (``http/protobuf``): another protocol is a :class:`ConfigError`.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return None
    wanted = (
        env.get("BUSAGENTS_TELEMETRY", "") in {"1", "true", "yes"}
        or "OTEL_EXPORTER_OTLP_ENDPOINT" in env
        or "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in env
        or exporter in {"otlp", "console"}
    )
    if not wanted:
        return None
    if exporter not in {"", "otlp", "console"}:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: busagents exports 'otlp' (over HTTP) or 'console'")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if exporter != "console" and protocol.strip() not in {"", "http/protobuf"}:
        raise ConfigError(
            f"OTLP protocol {protocol!r}: busagents exports OTLP over HTTP (http/protobuf); point "
            "OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (usually 4318) and unset the protocol"
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME", service_name)})
    tracer_provider = TracerProvider(resource=resource)
    if exporter == "console":  # spans as JSON on stdout: a look without a backend
        span_exporter: SpanExporter = ConsoleSpanExporter()
        readers = []
    else:
        span_exporter = OTLPSpanExporter()
        readers = [PeriodicExportingMetricReader(OTLPMetricExporter())]
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider)


def shutdown() -> None:
    """Flush and stop the SDK providers set up by :func:`configure_from_env`."""
    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
    meter_provider: Any = metrics.get_meter_provider()
    if hasattr(meter_provider, "shutdown"):
        meter_provider.shutdown()
