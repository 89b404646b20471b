"""busagents' own aggregation of messaging.process.duration: the points the SDK's histogram would make."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Sequence

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from busagents._histogram import DURATION_BUCKETS, DurationHistogram, WithDurations
from busagents.testing import OtlpReceiver

SCOPE = InstrumentationScope("busagents", "test")
A = {"messaging.destination.name": "flight.status.*", "busagents.agent": "flight-monitor"}
B = {"messaging.destination.name": "flight.delayed", "busagents.agent": "flight-reasoner"}


def _values(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    # every bucket, its edges included (a value on a bound belongs to the bucket below it)
    return [rng.choice([rng.expovariate(20), rng.choice(DURATION_BUCKETS), 0.0, 12.5]) for _ in range(n)]


def _sdk_points(reader: InMemoryMetricReader) -> list[HistogramDataPoint]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "messaging.process.duration" and isinstance(m.data, Histogram)
        for p in m.data.data_points
    ]


def _same(ours: Sequence[HistogramDataPoint], sdk: Sequence[HistogramDataPoint]) -> None:
    def key(p: HistogramDataPoint) -> str:
        return str(sorted((p.attributes or {}).items()))

    assert len(ours) == len(sdk) > 0
    for mine, theirs in zip(sorted(ours, key=key), sorted(sdk, key=key), strict=True):
        assert dict(mine.attributes or {}) == dict(theirs.attributes or {})
        assert mine.count == theirs.count
        assert list(mine.bucket_counts) == list(theirs.bucket_counts)
        assert list(mine.explicit_bounds) == list(theirs.explicit_bounds)
        assert mine.sum == pytest.approx(theirs.sum)
        assert (mine.min, mine.max) == (theirs.min, theirs.max)


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA])
def test_the_series_make_the_points_the_sdk_histogram_makes(temporality: AggregationTemporality) -> None:
    reader = InMemoryMetricReader(preferred_temporality={HistogramInstrument: temporality})
    sdk = (
        MeterProvider(metric_readers=[reader])
        .get_meter("busagents")
        .create_histogram("messaging.process.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
    )
    ours = DurationHistogram("messaging.process.duration", "s", "Time to handle one message", SCOPE)
    a, b = ours.series(A), ours.series(B)
    assert ours.series(dict(A)) is a  # one series per attribute set
    for round_ in range(3):  # three exports: deltas are each interval's, cumulative ones grow
        for value in _values(500, round_):
            a.record(value)
            sdk.record(value, A)
        for value in _values(40 * round_, 10 + round_):  # B has nothing in the first interval
            b.record(value)
            sdk.record(value, B)
        metric = ours.metric(temporality)
        assert metric is not None and isinstance(metric.data, Histogram)
        assert metric.data.aggregation_temporality is temporality
        _same(metric.data.data_points, _sdk_points(reader))


class _Kept(MetricExporter):
    def __init__(self) -> None:
        super().__init__(preferred_temporality={HistogramInstrument: AggregationTemporality.DELTA})
        self.exported: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        pass


def test_the_exporter_adds_the_histogram_to_its_scope_and_keeps_the_rest() -> None:
    resource = Resource({"service.name": "probe"})
    inner = _Kept()
    durations = DurationHistogram("messaging.process.duration", "s", "Time to handle one message", SCOPE)
    exporter = WithDurations(inner, [durations], resource)
    assert exporter._preferred_temporality == inner._preferred_temporality  # the reader asks the wrapper
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    provider.get_meter("busagents").create_counter("sent").add(3)
    provider.get_meter("other").create_counter("elsewhere").add(1)
    data = reader.get_metrics_data()
    assert data is not None
    exporter.export(data)
    assert inner.exported[-1] is data  # nothing recorded: the export is the SDK's, untouched
    durations.series(A).record(0.02)
    exporter.export(data)
    (resource_metrics,) = inner.exported[-1].resource_metrics
    scopes = {sm.scope.name: [m.name for m in sm.metrics] for sm in resource_metrics.scope_metrics}
    assert scopes == {"busagents": ["sent", "messaging.process.duration"], "other": ["elsewhere"]}
    exporter.export(data)  # delta: no new duration since, so no point
    names = [m.name for rm in inner.exported[-1].resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    assert "messaging.process.duration" not in names


_PROBE = """
import asyncio
from nats.aio.msg import Msg
from busagents.envelope import Envelope
from busagents.telemetry import configure_from_env, shutdown
from busagents.worker import Outcome

t = configure_from_env("probe")
handled = {"n": 0}

async def handler(msg):
    handled["n"] += 1
    return Outcome.HANDLED if handled["n"] % 10 else Outcome.DEAD_LETTERED

handle = t.traced_handle(handler, agent="probe-agent", contract="Probe", template="probe.a.*")

async def main():
    for _ in range(250):
        envelope = Envelope.new("Probe", 1, sender="probe-feed")
        with t.publish_span("probe.a.1", "probe.a.*", envelope):
            pass
        await handle(Msg(None, subject="probe.a.1", data=b"{}", headers=envelope.to_headers()))

asyncio.run(main())
shutdown()
"""


def test_handled_messages_reach_the_collector_as_the_duration_histogram() -> None:
    with OtlpReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        bodies = list(receiver.metric_requests)
    assert bodies  # shutdown() flushed the metrics
    request = ExportMetricsServiceRequest.FromString(bodies[-1])
    found = [
        (rm, m)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        if sm.scope.name == "busagents"
        for m in sm.metrics
        if m.name == "messaging.process.duration"
    ]
    assert len(found) == 1
    resource, metric = found[0]
    services = [a.value.string_value for a in resource.resource.attributes if a.key == "service.name"]
    assert services == ["probe"]
    assert metric.unit == "s"
    (point,) = metric.histogram.data_points
    attributes = {a.key: a.value.string_value for a in point.attributes}
    assert attributes == {"messaging.destination.name": "probe.a.*", "busagents.agent": "probe-agent"}
    assert point.count == 250  # dead-lettered ones too: a duration per handled message
    assert sum(point.bucket_counts) == 250
    assert list(point.explicit_bounds) == list(DURATION_BUCKETS)
    assert 0 < point.min <= point.max and point.sum >= point.max
    assert metric.histogram.aggregation_temporality == 2  # cumulative, the exporter's default
