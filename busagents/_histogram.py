"""``messaging.process.duration`` aggregated in plain Python, exported with the SDK's other metrics.

The SDK's ``Histogram.record`` checks and hashes the attributes, builds a measurement and walks the
views on every call: 15 to 30 µs, on every handled message, the largest single cost tracing added to
a hop. Here a handler records into its own series (a bucket index and four numbers, about 1 µs);
:class:`WithDurations` wraps the OTLP metric exporter and adds the series to each export as the
histogram the SDK would have sent (explicit buckets, the exporter's temporality).
tests/test_histogram.py compares both, point for point.

Only where busagents configures the SDK itself (``configure_from_env``); a Telemetry given a
MeterProvider of its own records into the SDK's histogram as before.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import AttributeValue

__all__ = ["DURATION_BUCKETS", "DurationHistogram", "Series", "WithDurations"]

#: The bucket boundaries the messaging semantic conventions advise for ``messaging.process.duration`` (s).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Series:
    """One attribute set's distribution: bucket counts, sum, min and max since it began.

    Recorded from one thread (the event loop's); read from the metric reader's thread: the counts
    are copied in one step and the point's count is their total, so a point is always whole.
    """

    __slots__ = ("attributes", "bounds", "counts", "max", "min", "start_ns", "sum")

    def __init__(self, attributes: Mapping[str, AttributeValue], bounds: Sequence[float]) -> None:
        self.attributes = dict(attributes)
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.start_ns = time.time_ns()

    def record(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket i holds (bounds[i-1], bounds[i]]
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


class DurationHistogram:
    """The series of one histogram, by attribute set, and what :class:`WithDurations` exports of them."""

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        scope: InstrumentationScope,
        bounds: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.scope = scope
        self.bounds = tuple(bounds)
        self._series: dict[frozenset[tuple[str, Any]], Series] = {}
        #: delta temporality: what each series had at the last export (counts, sum)
        self._exported: dict[int, tuple[list[int], float]] = {}
        self._last_export_ns = time.time_ns()

    def series(self, attributes: Mapping[str, AttributeValue]) -> Series:
        """The series of ``attributes`` (handlers with the same attributes share one)."""
        key = frozenset(attributes.items())
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(attributes, self.bounds)
        return found

    def metric(self, temporality: AggregationTemporality) -> Metric | None:
        """The histogram as the SDK reports it now, or None when no series has a point to report."""
        now = time.time_ns()
        points = []
        for series in list(self._series.values()):
            counts = list(series.counts)
            total, low, high = series.sum, series.min, series.max
            start = series.start_ns
            if temporality is AggregationTemporality.DELTA:
                before = self._exported.get(id(series))
                self._exported[id(series)] = (counts, total)
                # the interval's min and max: the series starts over for them
                series.min, series.max = math.inf, -math.inf
                if before is not None:
                    counts = [c - b for c, b in zip(counts, before[0], strict=True)]
                    total -= before[1]
                    start = self._last_export_ns
            count = sum(counts)
            if not count:
                continue
            points.append(
                HistogramDataPoint(
                    attributes=series.attributes,
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=count,
                    sum=total,
                    bucket_counts=counts,
                    explicit_bounds=self.bounds,
                    min=low,
                    max=high,
                )
            )
        self._last_export_ns = now
        if not points:
            return None
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(data_points=points, aggregation_temporality=temporality),
        )


def exports_explicit_buckets(exporter: MetricExporter) -> bool:
    """Whether ``exporter`` wants histograms as explicit buckets (not exponential ones)."""
    aggregation = (exporter._preferred_aggregation or {}).get(HistogramInstrument)
    return aggregation is None or isinstance(aggregation, ExplicitBucketHistogramAggregation)


class WithDurations(MetricExporter):
    """A metric exporter that adds busagents' own histograms to every export of ``inner``."""

    def __init__(self, inner: MetricExporter, histograms: Sequence[DurationHistogram], resource: Resource) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality, preferred_aggregation=inner._preferred_aggregation
        )
        self._inner = inner
        self._histograms = tuple(histograms)
        self._resource = resource
        self._temporality = (inner._preferred_temporality or {}).get(
            HistogramInstrument, AggregationTemporality.CUMULATIVE
        )

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        return self._inner.export(self.with_durations(metrics_data), timeout_millis=timeout_millis, **kwargs)

    def with_durations(self, metrics_data: MetricsData) -> MetricsData:
        """``metrics_data`` with the histograms in their scope of this exporter's resource."""
        added = [m for h in self._histograms if (m := h.metric(self._temporality)) is not None]
        if not added:
            return metrics_data
        scope = self._histograms[0].scope
        resources = list(metrics_data.resource_metrics)
        at = next((i for i, rm in enumerate(resources) if rm.resource == self._resource), None)
        if at is None:
            resources.append(ResourceMetrics(self._resource, [ScopeMetrics(scope, added, "")], ""))
            return MetricsData(resources)
        rm = resources[at]
        scopes = list(rm.scope_metrics)
        here = next((i for i, sm in enumerate(scopes) if sm.scope.name == scope.name), None)
        if here is None:
            scopes.append(ScopeMetrics(scope, added, ""))
        else:
            sm = scopes[here]
            scopes[here] = ScopeMetrics(sm.scope, [*sm.metrics, *added], sm.schema_url)
        resources[at] = ResourceMetrics(rm.resource, scopes, rm.schema_url)
        return MetricsData(resources)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)
