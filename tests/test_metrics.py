"""The data plane's call counts: kept as plain numbers, exposed in Prometheus's format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from berth.daemon.metrics import DURATION_BUCKETS, Metrics


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize(("seconds", "le_first_counted"), [
    (0.0, "0.005"),  # on or under a bound: counted in that bucket (Prometheus's `le`)
    (0.005, "0.005"),
    (0.0051, "0.01"),
    (3600.0, "3600.0"),
    (3600.5, "+Inf"),
])
def test_a_duration_lands_in_the_buckets_at_and_above_it(seconds: float,
                                                          le_first_counted: str) -> None:
    metrics = Metrics()
    metrics.call_ended("m", 200, seconds)
    samples = scraped(metrics)
    bounds = [repr(float(b)) for b in DURATION_BUCKETS] + ["+Inf"]
    counts = [samples[("berth_call_duration_seconds_bucket", (("endpoint", "m"), ("le", b)))]
              for b in bounds]
    first = bounds.index(le_first_counted)
    assert counts == [0.0] * first + [1.0] * (len(bounds) - first)
    assert samples[("berth_call_duration_seconds_sum", (("endpoint", "m"),))] == seconds


def test_calls_are_counted_by_endpoint_and_status() -> None:
    metrics = Metrics()
    for endpoint, status, seconds in [("a", 200, 0.1), ("a", 200, 0.2), ("a", 429, 0.0),
                                      ("b", 504, 30.0)]:
        metrics.call_ended(endpoint, status, seconds)
    samples = scraped(metrics)
    assert {labels: value for (name, labels), value in samples.items()
            if name == "berth_calls_total"} == {
        (("code", "200"), ("endpoint", "a")): 2, (("code", "429"), ("endpoint", "a")): 1,
        (("code", "504"), ("endpoint", "b")): 1}
    assert samples[("berth_call_duration_seconds_count", (("endpoint", "a"),))] == 3
    assert samples[("berth_call_duration_seconds_sum", (("endpoint", "a"),))] == \
        pytest.approx(0.3)
    assert samples[("berth_call_duration_seconds_count", (("endpoint", "b"),))] == 1
