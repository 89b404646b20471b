"""OpenTelemetry for busagents: one trace across every hop of a conversation.

A :class:`Telemetry` given to a :class:`~busagents.bus.Bus` makes every publish a
PRODUCER span (and every query a CLIENT span) that writes W3C ``traceparent`` /
``tracestate`` into the envelope, and every handled message a CONSUMER span whose
parent is the sender's span, following the OpenTelemetry messaging semantic
conventions (a query's handler: a SERVER span; a view's handler: none unless
``BUSAGENTS_TRACE_VIEWS=1``, see :class:`Telemetry`). Metrics: messages sent and processed
(with their outcome), and the processing duration of the messages whose span is sampled.
Without a Telemetry the hot path pays nothing; with one, a span that is not sampled costs
no attributes. When :func:`configure_from_env` exports with busagents' own OTLP encoder, the
message spans are recorded straight to OTLP bytes (``_otlp.SpanRecorder``), not by the SDK.

``configure_from_env`` (called by :meth:`Bus.connect <busagents.bus.Bus.connect>` when it
is given no telemetry) sets up the SDK with OTLP/HTTP export when the standard ``OTEL_*``
variables ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_EXPORTER``...), a
resource per agent, so traces show in Jaeger, Phoenix or any OTLP backend.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

from .envelope import CONVERSATION_ID, MSG_ID, TRACEPARENT, TRACESTATE, Envelope
from .errors import ConfigError
from .worker import Outcome

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from ._histogram import DurationHistogram
    from ._otlp import EncodingSpanProcessor, FixedAttributes, RecordedSpan, Shape, SpanRecorder, UnsampledSpan

__all__ = ["Telemetry", "configure_from_env"]

_SCOPE = "busagents"
_SAMPLED = int(TraceFlags.SAMPLED)
_FAILED = {Outcome.DEAD_LETTERED: "dead-lettered", Outcome.RETRY: "failed; redelivered later"}


def _context_functions() -> tuple[
    Callable[[], Span],
    Callable[[Span], otel_context.Context],
    Callable[[otel_context.Context], Token[otel_context.Context]],
    Callable[[Token[otel_context.Context]], None],
]:
    """The current span, a context with a span set, attach and detach: on every message's path.

    With the API's own context runtime (contextvars, the default), these go to its ContextVar
    directly: one call each instead of three or four through the API. With another runtime
    (``OTEL_PYTHON_CONTEXT``), the API's functions.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    key = getattr(trace.propagation, "_SPAN_KEY", None)
    if type(runtime) is not ContextVarsRuntimeContext or not isinstance(var, ContextVar) or not isinstance(key, str):
        return trace.get_current_span, trace.set_span_in_context, otel_context.attach, otel_context.detach
    get = var.get
    spans: set[type] = set()  # the types of span seen current (isinstance of the Span ABC is slow)

    def current_span() -> Span:
        span = get().get(key)
        if span is None:
            return INVALID_SPAN
        if type(span) in spans:
            return cast(Span, span)
        if isinstance(span, Span):
            spans.add(type(span))
            return span
        return INVALID_SPAN

    def with_span(span: Span) -> otel_context.Context:
        current = get()
        if not current:  # a handler's context holds nothing else, as a rule
            return otel_context.Context({key: span})
        values = dict(current)
        values[key] = span
        return otel_context.Context(values)

    return current_span, with_span, var.set, var.reset


_current_span, _with_span, _attach, _detach = _context_functions()


class Telemetry:
    """Tracer and meter of busagents; uses the global OpenTelemetry providers unless given others.

    ``provider_for`` gives the tracer provider of one agent (a resource of its own, so that each
    agent shows as its own service); without it every span uses ``tracer_provider``.
    ``parent_based``: the providers' sampler drops every span whose parent was not sampled (the
    standard ``parentbased_*`` samplers do), so such a hop skips making one: it carries its
    parent's context on, at no cost.
    ``trace_views``: a view handler's message (``@on(C, view=True)``) gets a CONSUMER span too.
    By default it gets none: a view is an agent's state, not a hop of the conversation; every
    replica reads every message, and a replica that starts replays the whole stream, which
    would add spans to conversations long over. A view handler still runs in the sender's
    trace context (what it publishes continues the trace) and is counted in the metrics.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        provider_for: Callable[[str], trace.TracerProvider] | None = None,
        parent_based: bool = False,
        trace_views: bool = False,
    ) -> None:
        from . import __version__
        from ._histogram import DURATION_BUCKETS

        self._version = __version__
        self.tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        self._provider_for = provider_for
        self._parent_based = parent_based
        self.trace_views = trace_views
        self._tracers: dict[str, trace.Tracer] = {}
        # Set by configure_from_env when its spans go to busagents' own OTLP encoder: message spans
        # are then recorded by a SpanRecorder per tracer instead of the SDK (see _otlp.SpanRecorder).
        self._recorder_of: Callable[[trace.Tracer], SpanRecorder] | None = None
        self._recorders: dict[str | None, SpanRecorder] = {}
        self._publish_fixed: dict[tuple[bool, str, str, str | None], tuple[Shape, FixedAttributes]] = {}
        self._own_span: type | None = None  # RecordedSpan, once spans are recorded
        self._unsampled: type | None = None  # UnsampledSpan, likewise
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        # Counted in plain ints on the hot path, read by the SDK when it collects.
        self._sent: dict[tuple[str, str], int] = {}
        self._processed: dict[tuple[str, str, str], int] = {}
        meter.create_observable_counter(
            "messaging.client.sent.messages",
            callbacks=[self._observe_sent],
            unit="{message}",
            description="Messages published",
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            callbacks=[self._observe_processed],
            unit="{message}",
            description="Messages handled, by outcome",
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Time to handle one message",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        # Set by configure_from_env when its metric exporter adds busagents' own aggregation of
        # the durations (a Python series per handler, not the SDK's Histogram.record: see _histogram).
        self._durations: DurationHistogram | None = None
        #: False when configure_from_env exports no metrics (OTEL_METRICS_EXPORTER=none): durations are
        #: not measured (the SDK's Histogram.record costs 15 to 30 µs a message, for no reader).
        self._metrics = True
        # GenAI semantic conventions, recorded by busagents.llm for every model call.
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per model call, by gen_ai.token.type"
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Time of one model call, retries included"
        )

    def tracer_for(self, service: str | None) -> trace.Tracer:
        """The tracer of one agent (or sender), under its own service name when configured so."""
        if service is None or self._provider_for is None:
            return self.tracer
        tracer = self._tracers.get(service)
        if tracer is None:
            provider = self._provider_for(service)
            tracer = self._tracers[service] = trace.get_tracer(_SCOPE, self._version, tracer_provider=provider)
        return tracer

    def _recorder(self, service: str | None) -> SpanRecorder | None:
        """The recorder of ``service``'s message spans, or None (the SDK makes them)."""
        if self._recorder_of is None:
            return None
        recorder = self._recorders.get(service)
        if recorder is None:
            recorder = self._recorders[service] = self._recorder_of(self.tracer_for(service))
        return recorder

    def _observe_sent(self, options: CallbackOptions) -> Iterable[Observation]:
        for (template, contract), n in list(self._sent.items()):
            yield Observation(n, {"messaging.destination.name": template, "busagents.contract": contract})

    def _observe_processed(self, options: CallbackOptions) -> Iterable[Observation]:
        for (template, agent, outcome), n in list(self._processed.items()):
            attributes = {"messaging.destination.name": template, "busagents.agent": agent}
            yield Observation(n, {**attributes, "busagents.outcome": outcome})

    @contextmanager
    def publish_span(self, subject: str, template: str, envelope: Envelope, *, request: bool = False) -> Iterator[Span]:
        """A PRODUCER (or CLIENT, for a query) span whose context travels in the envelope.

        The span is not made current (nothing runs inside a send); its attributes are computed
        only when it is recorded (sampled). :meth:`start_publish` without the ``with``.
        """
        span = self.start_publish(subject, template, envelope, request=request)
        if span is None:
            yield trace.get_current_span()
            return
        try:
            yield span
        except BaseException as exc:
            self.failed(span, exc)
            raise
        finally:
            span.end()

    def start_publish(self, subject: str, template: str, envelope: Envelope, *, request: bool = False) -> Span | None:
        """Start the span of one send and write its context into the envelope (see :meth:`publish_span`).

        The caller ends it (and calls :meth:`failed` if the send raised). None: no span to end,
        the conversation is not sampled and its context was passed on as it came.
        """
        key = (template, envelope.contract)
        self._sent[key] = self._sent.get(key, 0) + 1
        current, own, parent, unsampled = self._parent()
        if self._parent_based and unsampled:  # its conversation is not sampled: pass it on
            self._carry(envelope, current)
            return None
        recorder = self._recorder(envelope.sender)
        span: Span
        if recorder is not None:
            shape, fixed = self._publish_parts(recorder, request, template, envelope)
            attributes: dict[str, AttributeValue] = {
                "messaging.destination.name": subject,
                "messaging.message.id": envelope.id,
                "messaging.message.conversation_id": envelope.conversation_id,
            }
            span = self._record(recorder, shape, fixed, attributes, own, parent)
        else:
            name = f"send {template}" if request else f"publish {template}"
            kind = SpanKind.CLIENT if request else SpanKind.PRODUCER
            span = self.tracer_for(envelope.sender).start_span(name, kind=kind)
            if span.is_recording():
                span.set_attributes(
                    {
                        "messaging.system": "nats",
                        "messaging.operation.name": "send" if request else "publish",
                        "messaging.operation.type": "send",
                        "messaging.destination.name": subject,
                        "messaging.message.id": envelope.id,
                        "messaging.message.conversation_id": envelope.conversation_id,
                        "busagents.contract": envelope.contract,
                        "busagents.agent": envelope.sender or "",
                    }
                )
        self._carry(envelope, span)
        return span

    def start_batch(self, sends: Sequence[tuple[str, str, Envelope]]) -> Span | None:
        """Start the one span of a batch send and write its context into every envelope of it.

        ``sends``: (subject, template, envelope) of each message, in order, all from one sender.
        The messaging conventions allow a batch one PRODUCER span whose context every message
        carries (no span per message): ``messaging.batch.message_count`` says how many; the
        destination, its template, the contract and the conversation are set when the messages
        share them. The caller ends it (and calls :meth:`failed` if a send raised). None: no
        span to end, the conversation is not sampled and its context was passed on as it came.
        """
        for _, template, envelope in sends:
            key = (template, envelope.contract)
            self._sent[key] = self._sent.get(key, 0) + 1
        first = sends[0][2]
        current, own, parent, unsampled = self._parent()
        if self._parent_based and unsampled:  # its conversation is not sampled: pass it on
            self._carry_all(sends, current)
            return None
        sender = first.sender
        subjects = {subject for subject, _, _ in sends}
        templates = {template for _, template, _ in sends}
        contracts = {envelope.contract for _, _, envelope in sends}
        conversations = {envelope.conversation_id for _, _, envelope in sends}
        template = templates.pop() if len(templates) == 1 else ""
        contract = contracts.pop() if len(contracts) == 1 else ""
        attributes: dict[str, AttributeValue] = {"messaging.batch.message_count": len(sends)}
        if len(subjects) == 1:
            attributes["messaging.destination.name"] = subjects.pop()
        if template:
            attributes["messaging.destination.template"] = template
        if len(conversations) == 1:
            attributes["messaging.message.conversation_id"] = conversations.pop()
        name = f"publish {template}" if template else "publish"
        fixed_attributes: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.name": "publish",
            "messaging.operation.type": "send",
            "busagents.agent": sender or "",
        }
        if contract:
            fixed_attributes["busagents.contract"] = contract
        span: Span
        recorder = self._recorder(sender)
        if recorder is not None:
            shape, fixed = recorder.shape(name, SpanKind.PRODUCER), recorder.fixed(fixed_attributes)
            span = self._record(recorder, shape, fixed, attributes, own, parent)
        else:
            span = self.tracer_for(sender).start_span(name, kind=SpanKind.PRODUCER)
            if span.is_recording():
                span.set_attributes({**fixed_attributes, **attributes})
        self._carry_all(sends, span)
        return span

    def _carry_all(self, sends: Sequence[tuple[str, str, Envelope]], span: Span) -> None:
        """Write ``span``'s context into the envelope of every send of a batch."""
        first = sends[0][2]
        self._carry(first, span)
        for _, _, envelope in sends[1:]:
            envelope.traceparent, envelope.tracestate = first.traceparent, first.tracestate

    def _parent(self) -> tuple[Span, RecordedSpan | None, SpanContext | None, bool]:
        """The current span; it again as busagents' own span (a handler's: its ids as they are, no
        SpanContext made), else its context; and whether its conversation is not sampled."""
        current = _current_span()
        if current is INVALID_SPAN:  # no span current: a root (a feed's send)
            return current, None, None, False
        if type(current) is self._own_span:
            own = cast("RecordedSpan", current)
            return current, own, None, not own._flags & 1
        parent = current.get_span_context()
        return current, None, parent, parent is not None and parent.is_valid and not parent.trace_flags.sampled

    def _record(
        self,
        recorder: SpanRecorder,
        shape: Shape,
        fixed: FixedAttributes,
        attributes: dict[str, AttributeValue],
        own: RecordedSpan | None,
        parent: SpanContext | None,
    ) -> Span:
        """A send span recorded by busagents, child of ``own`` or of ``parent`` (none valid: a root)."""
        if own is not None:
            return recorder.child(
                shape,
                own._trace_id,
                own._span_id,
                own._flags,
                own._trace_state,
                False,
                fixed,
                attributes,
                parent_based=self._parent_based,
            )
        if parent is None or not parent.is_valid:
            return recorder.root(shape, fixed, attributes)
        return recorder.start(shape.name, shape.kind, parent, fixed, attributes, parent_based=self._parent_based)

    def _carry(self, envelope: Envelope, span: Span) -> None:
        """Write ``span``'s context into the envelope (``traceparent``, ``tracestate``)."""
        if type(span) is self._own_span:
            recorded = cast("RecordedSpan", span)
            envelope.traceparent = recorded.traceparent()
            envelope.tracestate = recorded._trace_state.to_header() if recorded._trace_state else None
        elif type(span) is self._unsampled:  # a root the sampler dropped: its ids as they are
            unsampled = cast("UnsampledSpan", span)
            envelope.traceparent, envelope.tracestate = unsampled.traceparent(), None
        elif type(span) is _Carried and span.get_span_context().is_valid:  # a sender's context, passed on as it came
            envelope.traceparent, envelope.tracestate = span._raw, span._state
        else:
            sc = span.get_span_context()
            envelope.traceparent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
            envelope.tracestate = sc.trace_state.to_header() if sc.trace_state else None

    @staticmethod
    def failed(span: Span, exc: BaseException) -> None:
        """Mark a span failed by ``exc``: an exception event and error status."""
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def _publish_parts(
        self, recorder: SpanRecorder, request: bool, template: str, envelope: Envelope
    ) -> tuple[Shape, FixedAttributes]:
        """The encoded name, kind and fixed attributes of a send, kept per sender, contract and subject."""
        key = (request, template, envelope.contract, envelope.sender)
        parts = self._publish_fixed.get(key)
        if parts is None:
            if len(self._publish_fixed) >= 4096:
                self._publish_fixed.clear()
            name = f"send {template}" if request else f"publish {template}"
            shape = recorder.shape(name, SpanKind.CLIENT if request else SpanKind.PRODUCER)
            fixed = recorder.fixed(
                {
                    "messaging.system": "nats",
                    "messaging.operation.name": "send" if request else "publish",
                    "messaging.operation.type": "send",
                    "busagents.contract": envelope.contract,
                    "busagents.agent": envelope.sender or "",
                }
            )
            parts = self._publish_fixed[key] = (shape, fixed)
        return parts

    @contextmanager
    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        agent: str | None = None,
    ) -> Iterator[Span]:
        """A span of the current trace (an LLM call, a tool call...) of ``agent``: raised errors mark it failed."""
        if agent is not None:
            attributes = {**(attributes or {}), "busagents.agent": agent}
        with self.tracer_for(agent).start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span

    def traced_handle(
        self,
        handle: Callable[[Msg], Awaitable[Outcome]],
        *,
        agent: str,
        contract: str,
        template: str,
        query: bool = False,
        view: bool = False,
    ) -> Callable[[Msg], Awaitable[Outcome]]:
        """Wrap a worker's message handler in a CONSUMER span (SERVER for a query) parented by the sender's span.

        The span is current while the handler runs, so what it publishes or asks is its child.
        Its status is the outcome ``handle`` returns: an error when the message was
        dead-lettered or is to be retried. ``view``: the handler of a view, which gets no span
        unless :attr:`trace_views` (it runs in the sender's context, and is counted).
        """
        name = f"process {template}"
        tracer = self.tracer_for(agent)
        kind = SpanKind.SERVER if query else SpanKind.CONSUMER
        base: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": agent,
            "busagents.agent": agent,
            "busagents.contract": contract,
        }
        processed = self._processed
        keys = {outcome: (template, agent, outcome.value) for outcome in Outcome}
        handled, handled_key = Outcome.HANDLED, keys[Outcome.HANDLED]
        parent_based = self._parent_based

        async def carried(msg: Msg, raw: str | None, headers: Mapping[str, str] | None) -> Outcome:
            """No span: the handler runs in the sender's context (``raw``, its ``traceparent``, read only
            if something asks for it: :class:`_Carried`), and is counted."""
            if raw is None or len(raw) != 55:
                outcome = await handle(msg)
            else:
                token = _attach(_with_span(_Carried(raw, headers.get(TRACESTATE) if headers else None)))
                try:
                    outcome = await handle(msg)
                finally:
                    _detach(token)
            key = handled_key if outcome is handled else keys[outcome]
            processed[key] = processed.get(key, 0) + 1
            return outcome

        if view and not self.trace_views:

            def viewed(msg: Msg) -> Awaitable[Outcome]:  # no coroutine of its own: carried's
                headers = msg.headers
                return carried(msg, headers.get(TRACEPARENT) if headers else None, headers)

            return viewed

        metric_attrs = {"messaging.destination.name": template, "busagents.agent": agent}
        record: Callable[[float], None]
        if self._durations is not None:
            record = self._durations.series(metric_attrs).record
        elif not self._metrics:

            def record(seconds: float) -> None:  # no metric is exported: nothing to measure
                pass

        else:
            sdk_record = self.duration.record

            def record(seconds: float) -> None:
                sdk_record(seconds, metric_attrs)

        recorder = self._recorder(agent)
        fixed = recorder.fixed(base) if recorder is not None else None
        shape = recorder.shape(name, kind) if recorder is not None else None
        outcomes = {outcome: outcome.value for outcome in Outcome}
        handled_value = outcomes[Outcome.HANDLED]
        own_span = self._own_span

        joinable = not query  # a query's reply is its own: one SERVER span per request
        # the spans of messages being handled now, by the sender's traceparent: the first message's
        # alone (a tuple: nothing to allocate for a message no other joins), else a _Together
        together: dict[str, _First | _Together] = {}

        def start_span(
            msg: Msg, headers: Mapping[str, str] | None, sender: _Sender | None, later: bool
        ) -> tuple[Span, bool]:
            """The CONSUMER (SERVER) span of ``msg``, child of its sender's; and whether it records.
            ``later``: an SDK span that may be shared gets its message's attributes when it ends
            (:class:`_Together`); busagents' own span gets them now (those not shared are dropped)."""
            if recorder is not None and fixed is not None and shape is not None:
                attributes = _message_attributes(msg.subject, headers)
                if sender is not None:
                    trace_id, parent_id, flags, state = sender
                    started = recorder.child(
                        shape, trace_id, parent_id, flags, state, True, fixed, attributes, parent_based=parent_based
                    )
                else:  # no sender's span: the current one, as the SDK would take
                    parent = _current_span().get_span_context()
                    started = recorder.start(name, kind, parent, fixed, attributes, parent_based=parent_based)
                return started, type(started) is own_span
            context = None if sender is None else trace.set_span_in_context(NonRecordingSpan(_span_context(sender)))
            span = tracer.start_span(name, context=context, kind=kind)
            recording = span.is_recording()
            if recording:
                span.set_attributes(base if later else {**base, **_message_attributes(msg.subject, headers)})
            return span, recording

        # busagents' own spans and a parent-based sampler: a sampled sender's child is kept without asking
        quick = recorder if parent_based and own_span is not None and fixed is not None and shape is not None else None
        new_span_id = quick._new_span_id if quick is not None else None

        async def traced(msg: Msg) -> Outcome:
            headers = msg.headers
            raw = None
            sender = None
            if headers:
                raw = headers.get(TRACEPARENT)
                if raw is not None:
                    if joinable:
                        entry = together.get(raw)
                        if entry is not None:  # sent under the span of messages being handled now: their span
                            if type(entry) is tuple:  # the first to join: the first message's span becomes shared
                                entry = together[raw] = _Together(raw, *entry)
                            return await along(cast("_Together", entry), msg, headers)
                    sender = _sender(raw, headers.get(TRACESTATE))
                    if sender is not None and parent_based and not sender[2]:
                        return await carried(msg, raw, headers)  # its conversation is not sampled: carry it on
            shareable = joinable and sender is not None
            span: Span
            if quick is not None and sender is not None and headers and new_span_id is not None:  # child(), inline
                trace_id, parent_id, _, state = sender
                span = own_span(  # type: ignore[misc]
                    quick,
                    shape,
                    trace_id,
                    new_span_id(),
                    _SAMPLED,
                    state,
                    parent_id,
                    True,
                    fixed,
                    {
                        "messaging.destination.name": msg.subject,
                        "messaging.message.id": headers.get(MSG_ID, ""),
                        "messaging.message.conversation_id": headers.get(CONVERSATION_ID, ""),
                    },
                    None,
                )
                recording = own = True
            else:
                span, recording = start_span(msg, headers, sender, shareable)
                own = type(span) is own_span
            context = _with_span(span)
            first: _First | None = None
            if shareable and recording and raw is not None:  # the next message of its batch may join it while it runs
                first = together[raw] = (span, own, context, msg.subject, headers)
            token = _attach(context)
            start = time.perf_counter()
            try:
                outcome = await handle(msg)
            except BaseException as exc:
                if recording:
                    span.record_exception(exc)
                    why = f"{type(exc).__name__}: {exc}"
                    span.set_status(Status(StatusCode.ERROR, why))
                    if first is not None and raw is not None:
                        shared(raw, first, why, None)
                raise
            else:
                if recording:
                    value = handled_value if outcome is handled else outcomes[outcome]
                    if outcome is not handled:
                        span.set_status(Status(StatusCode.ERROR, _FAILED[outcome]))
                        if first is not None and raw is not None:
                            shared(raw, first, _FAILED[outcome], value)
                    if own:
                        cast("RecordedSpan", span)._attributes["busagents.outcome"] = value  # not ended yet
                    else:
                        span.set_attribute("busagents.outcome", value)
            finally:
                _detach(token)
                if first is None:
                    span.end()
                else:
                    entry = together[raw]  # type: ignore[index]
                    if entry is first:  # alone, as nearly every message is
                        del together[raw]  # type: ignore[arg-type]
                        if not own:  # an SDK span that might have been shared: its message's attributes now
                            span.set_attributes(_message_attributes(msg.subject, headers))
                        span.end()
                    else:
                        leave(cast("_Together", entry))
            if recording:  # durations are a distribution: sampled messages tell it (counts stay exact)
                record(time.perf_counter() - start)
            key = handled_key if outcome is handled else keys[outcome]
            processed[key] = processed.get(key, 0) + 1
            return outcome

        def shared(raw: str, first: _First, why: str, outcome: str | None) -> None:
            """The first message of a span failed: counted in it if others have joined it."""
            entry = together[raw]
            if entry is not first:
                cast("_Together", entry).failure(why, outcome)

        def leave(joined: _Together) -> None:
            """One message of a shared span is done: the last one ends it."""
            joined.running -= 1
            if not joined.running:
                del together[joined.raw]
                joined.end(template)

        async def along(joined: _Together, msg: Msg, headers: Mapping[str, str] | None) -> Outcome:
            """Handle ``msg`` in the span of the messages of its sender's span handled now (:class:`_Together`)."""
            joined.join(msg.subject, headers)
            token = _attach(joined.context)
            start = time.perf_counter()
            try:
                outcome = await handle(msg)
            except BaseException as exc:
                joined.span.record_exception(exc)
                joined.failure(f"{type(exc).__name__}: {exc}", None)
                raise
            else:
                if outcome is not handled:
                    joined.failure(_FAILED[outcome], outcomes[outcome])
            finally:
                _detach(token)
                leave(joined)
            record(time.perf_counter() - start)
            key = handled_key if outcome is handled else keys[outcome]
            processed[key] = processed.get(key, 0) + 1
            return outcome

        return traced


#: The span of a message that others of its batch may join: span, busagents' own, its context, subject, headers.
_First = tuple[Span, bool, otel_context.Context, str, "Mapping[str, str] | None"]


class _Together:
    """The one CONSUMER span of messages sent under one span (a batch send) and handled at the same time.

    When a handler waits (on a reply, a store) and the next message of the same batch is taken
    meanwhile, that message is handled in the span of the first, as the messaging conventions allow
    for a batch: its context is current in each, ``messaging.batch.message_count`` says how many, and
    it ends when the last of them is done. What the messages do not share is left out (their ids;
    their subject or conversation when those differ); a failed message makes it an error that says
    how many failed and why. A message handled alone has the span it would have had anyway.
    """

    __slots__ = (
        "context",
        "conversation",
        "count",
        "failed",
        "headers",
        "outcome",
        "own",
        "raw",
        "running",
        "span",
        "subject",
    )

    def __init__(
        self,
        raw: str,
        span: Span,
        own: bool,
        context: otel_context.Context,
        subject: str,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.raw = raw
        self.span = span
        self.own = own  # busagents' own span: its message's attributes are set; else set at the end
        self.context = context
        self.subject: str | None = subject
        self.headers: Mapping[str, str] = headers or {}  # the first message's
        self.conversation: str | None = None  # known once a second message joins
        self.count = 1
        self.running = 1
        self.failed: dict[str, int] | None = None  # why -> how many
        self.outcome: str | None = None  # the first failed outcome

    def join(self, subject: str, headers: Mapping[str, str] | None) -> None:
        if self.count == 1:
            self.conversation = self.headers.get(CONVERSATION_ID, "")
        self.count += 1
        self.running += 1
        if subject != self.subject:
            self.subject = None
        if self.conversation is not None and (headers.get(CONVERSATION_ID, "") if headers else "") != self.conversation:
            self.conversation = None

    def failure(self, why: str, outcome: str | None) -> None:
        failed = self.failed
        if failed is None:
            failed = self.failed = {}
        failed[why] = failed.get(why, 0) + 1
        if self.outcome is None and outcome is not None:
            self.outcome = outcome

    def end(self, template: str) -> None:
        """End the span (``template``: the subscribed subject, said when the messages are more than one)."""
        span = self.span
        if self.count == 1:  # alone: its own message's attributes, its outcome and status already set
            if not self.own:
                span.set_attributes(_message_attributes(self.subject or "", self.headers))
            span.end()
            return
        attributes: dict[str, AttributeValue] = {
            "messaging.batch.message_count": self.count,
            "messaging.destination.template": template,
        }
        if self.subject is not None:
            attributes["messaging.destination.name"] = self.subject
        if self.conversation is not None:
            attributes["messaging.message.conversation_id"] = self.conversation
        if self.outcome is not None:
            attributes["busagents.outcome"] = self.outcome
        if self.failed:
            why = "; ".join(f"{n} of {self.count}: {reason}" for reason, n in self.failed.items())
            span.set_status(Status(StatusCode.ERROR, why))
        if self.own:
            recorded = cast("RecordedSpan", span)
            for key in ("messaging.message.id", "messaging.destination.name", "messaging.message.conversation_id"):
                if key not in attributes:
                    recorded._attributes.pop(key, None)
            for key, value in attributes.items():
                recorded.set_own(key, value)
        else:
            span.set_attributes(attributes)
        span.end()


def _message_attributes(subject: str, headers: Mapping[str, str] | None) -> dict[str, AttributeValue]:
    """The attributes of a consumer span that are its message's own: subject, id, conversation."""
    return {
        "messaging.destination.name": subject,
        "messaging.message.id": headers.get(MSG_ID, "") if headers else "",
        "messaging.message.conversation_id": headers.get(CONVERSATION_ID, "") if headers else "",
    }


#: A sender's span as its ``traceparent`` header gives it: trace id, span id, sampled (1 or 0), trace state.
_Sender = tuple[int, int, int, "TraceState | None"]


def _traceparent(headers: Mapping[str, str] | None) -> _Sender | None:
    """The sender's span from a W3C ``traceparent`` header, or None (a malformed one starts a new trace)."""
    if not headers:
        return None
    value = headers.get(TRACEPARENT)
    return None if value is None else _sender(value, headers.get(TRACESTATE))


def _sender(value: str, state: str | None) -> _Sender | None:
    """The sender's span from its ``traceparent`` and ``tracestate`` header values; None if malformed."""
    if len(value) != 55:
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-" or value[:2] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(value[3:35], 16), int(value[36:52], 16), int(value[53:], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags & 1, TraceState.from_header([state]) if state else None


class _Carried(NonRecordingSpan):
    """The sender's span, current while a handler that records no span of its own runs (a view's).

    Its context is read from the ``traceparent`` header only when something asks for it (the
    handler sends, or starts a span): most view handlers send nothing, and pay for no parsing.
    A malformed header gives an invalid context, so what the handler sends starts a new trace.
    """

    __slots__ = ("_raw", "_state")

    def __init__(self, raw: str, state: str | None) -> None:
        self._raw = raw
        self._state = state
        self._context = None  # type: ignore[assignment]  # read on first use

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            sender = _sender(self._raw, self._state)
            context = self._context = trace.INVALID_SPAN_CONTEXT if sender is None else _span_context(sender)
        return context


def _span_context(sender: _Sender) -> SpanContext:
    trace_id, span_id, flags, state = sender
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags), trace_state=state)


#: Span processor settings unless the ``OTEL_BSP_*`` variables say otherwise: a queue that holds
#: a burst (a span dropped is a hop missing from a trace), large batches (one HTTP request per
#: 2048 spans), exported every second off the event loop's thread (spans are encoded as they end:
#: busagents._otlp.EncodingSpanProcessor).
_BATCH = {
    "OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_size", 65536),
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay_millis", 1000),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_export_batch_size", 2048),
}


def _batch_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The span processor's settings: the ``OTEL_BSP_*`` variables, else busagents' defaults."""
    settings: dict[str, Any] = {}
    for name, (arg, default) in _BATCH.items():
        raw = env.get(name, "").strip()
        try:
            settings[arg] = int(raw) if raw else default
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    return settings


_from_env: list[Telemetry | None] = []  # the process's telemetry, once configure_from_env ran


def configure_from_env(service_name: str) -> Telemetry | None:
    """Set up the OpenTelemetry SDK with OTLP/HTTP export when the ``OTEL_*`` variables ask for it.

    Returns None (telemetry off, zero cost) unless ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp`` is set, or
    ``BUSAGENTS_TELEMETRY=1``; ``OTEL_TRACES_EXPORTER=console`` prints spans on stdout
    instead; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turns it off, and
    ``OTEL_METRICS_EXPORTER=none`` exports traces without metrics.
    OTLP goes over HTTP (``http/protobuf``): another protocol is a :class:`ConfigError`.

    Configured once per process (the first call's ``service_name`` names the process's own
    spans; ``OTEL_SERVICE_NAME`` wins over it and also becomes every resource's
    ``service.namespace``); later calls return the same :class:`Telemetry`. Each agent (and
    each sender, like a feed) exports under a resource of its own, ``service.name`` = its name.
    The sampler is the standard one from ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``.
    """
    if not _from_env:
        _from_env.append(_configure(service_name))
    return _from_env[0]


def _configure(service_name: str) -> Telemetry | None:
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
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from . import __version__
    from ._histogram import DurationHistogram, WithDurations, exports_explicit_buckets

    base: dict[str, AttributeValue] = {
        SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name,
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
    }
    if env.get("OTEL_SERVICE_NAME"):
        base["service.namespace"] = env["OTEL_SERVICE_NAME"]
    resource = Resource.create(base)
    batch = _batch_settings(env)
    processor: SpanProcessor
    encoding: EncodingSpanProcessor | None = None
    durations: DurationHistogram | None = None
    scope = InstrumentationScope(_SCOPE, __version__)  # busagents' spans and metrics
    if exporter == "console":  # spans as JSON on stdout: a look without a backend
        processor = BatchSpanProcessor(ConsoleSpanExporter(), **batch)
        readers: list[MetricReader] = []
    else:
        from ._otlp import EncodingSpanProcessor, FastOTLPSpanExporter

        span_exporter = FastOTLPSpanExporter()
        if span_exporter.fast:
            processor = encoding = EncodingSpanProcessor(span_exporter, **batch)
        else:  # another release of the exporter: its own batch processor
            processor = BatchSpanProcessor(span_exporter, **batch)
        # OTEL_METRICS_EXPORTER=none: traces only (Phoenix, for one, takes no metrics)
        none = env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none"
        if none:
            readers = []
        else:
            metric_exporter: MetricExporter = OTLPMetricExporter()
            if exports_explicit_buckets(metric_exporter):  # durations aggregated by busagents (_histogram)
                durations = DurationHistogram(
                    "messaging.process.duration",
                    "s",
                    "Time to handle one message",
                    scope,
                )
                metric_exporter = WithDurations(metric_exporter, [durations], resource)
            readers = [PeriodicExportingMetricReader(metric_exporter)]
    tracer_provider = TracerProvider(resource=resource)  # flushes the shared processor at exit
    tracer_provider.add_span_processor(processor)

    def provider_for(service: str) -> trace.TracerProvider:
        provider = TracerProvider(resource=resource.merge(Resource({SERVICE_NAME: service})), shutdown_on_exit=False)
        provider.add_span_processor(processor)
        return provider

    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    parent_based = sampler in {"", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"}
    trace_views = env.get("BUSAGENTS_TRACE_VIEWS", "") in {"1", "true", "yes"}
    telemetry = Telemetry(
        tracer_provider, meter_provider, provider_for=provider_for, parent_based=parent_based, trace_views=trace_views
    )
    telemetry._durations = durations
    telemetry._metrics = bool(readers)
    if encoding is not None:  # every provider's one processor: message spans can skip the SDK
        from opentelemetry.sdk.trace import Tracer as SdkTracer

        from ._otlp import RecordedSpan, SpanRecorder, UnsampledSpan

        def recorder_of(tracer: trace.Tracer) -> SpanRecorder:
            assert isinstance(tracer, SdkTracer)
            return SpanRecorder(encoding, tracer, scope)

        telemetry._recorder_of = recorder_of
        telemetry._own_span = RecordedSpan
        telemetry._unsampled = UnsampledSpan
    return telemetry


def shutdown() -> None:
    """Flush and stop the SDK providers set up by :func:`configure_from_env`."""
    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
    meter_provider: Any = metrics.get_meter_provider()
    if hasattr(meter_provider, "shutdown"):
        meter_provider.shutdown()
