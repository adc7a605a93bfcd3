"""Prometheus text exposition of strata.agent.metrics: format, escaping, histograms, thread safety."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable

import pytest

from strata import __version__
from strata.agent.metrics import (
    LATENCY_BUCKETS,
    InferenceMetrics,
    MetricsRegistry,
    escape_label_value,
    format_value,
)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_exposition(text: str) -> tuple[dict[str, str], Samples]:
    """Parse text format 0.0.4 strictly enough to catch mistakes: returns ({family: type}, samples).

    Checks that every sample belongs to a family whose HELP and TYPE came before it, and that the text ends
    with a newline.
    """
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helps, f"TYPE before HELP for {name}"
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, label_text, value = match.groups()
        labels: set[tuple[str, str]] = set()
        if label_text:
            consumed = "".join(m.group(0) for m in _LABEL.finditer(label_text))
            assert consumed == label_text, f"malformed labels in {line!r}"
            labels = {(label, _unescape(raw)) for label, raw in _LABEL.findall(label_text)}
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} has no TYPE line before it"
        samples[(name, frozenset(labels))] = float(value.replace("+Inf", "inf"))
    return types, samples


def sample(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def test_counter_lines_are_exact() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("requests", "Requests served", ("model", "version"))
    counter.inc("digits", "1")
    counter.inc("digits", "1", by=2)
    counter.inc("other", "7", by=0.5)

    assert registry.render() == (
        "# HELP requests Requests served\n"
        "# TYPE requests counter\n"
        'requests{model="digits",version="1"} 3\n'
        'requests{model="other",version="7"} 0.5\n'
    )


def test_label_values_and_help_are_escaped() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("odd", "Help with \\ and\nnewline", ("name",))
    gauge.set('a"b\\c\nd', value=1)

    text = registry.render()

    assert "# HELP odd Help with \\\\ and\\nnewline\n" in text
    assert 'odd{name="a\\"b\\\\c\\nd"} 1\n' in text
    _, samples = parse_exposition(text)
    assert sample(samples, "odd", name='a"b\\c\nd') == 1
    assert escape_label_value('"') == '\\"'


def test_unlabelled_family_has_no_braces() -> None:
    registry = MetricsRegistry()
    registry.gauge("temperature_celsius", "Board temperature").set(value=41.5)
    assert "temperature_celsius 41.5\n" in registry.render()


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    registry = MetricsRegistry()
    histogram = registry.histogram("latency_seconds", "Latency", ("model",), buckets=(0.1, 0.5, 1.0))
    for value in (0.05, 0.1, 0.3, 0.5, 2.0):
        histogram.observe("m", value=value)

    types, samples = parse_exposition(registry.render())

    assert types["latency_seconds"] == "histogram"
    buckets = {le: sample(samples, "latency_seconds_bucket", model="m", le=le) for le in ("0.1", "0.5", "1.0", "+Inf")}
    assert buckets == {"0.1": 2, "0.5": 4, "1.0": 4, "+Inf": 5}
    assert sample(samples, "latency_seconds_count", model="m") == 5
    assert sample(samples, "latency_seconds_sum", model="m") == pytest.approx(2.95)
    assert histogram.count("m") == 5


def test_histogram_refuses_unordered_buckets() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        MetricsRegistry().histogram("h", "h", buckets=(1.0, 0.5))


def test_gauge_replace_drops_series_not_given() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("active", "Active", ("model",))
    gauge.replace({("a",): 1, ("b",): 1})
    gauge.replace({("b",): 1})
    _, samples = parse_exposition(registry.render())
    assert set(samples) == {("active", frozenset({("model", "b")}))}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.counter("bad name", "x"), "invalid metric name"),
        (lambda r: r.counter("ok", "x", ("le",)), "invalid label name"),
        (lambda r: r.counter("ok", "x", ("__reserved",)), "invalid label name"),
        (lambda r: r.counter("ok", "x", ("model",)).inc("a", "b"), "takes labels"),
        (lambda r: r.counter("ok", "x").inc(by=-1), "cannot go down"),
        (lambda r: [r.gauge("twice", "x"), r.gauge("twice", "x")], "already registered"),
    ],
)
def test_misuse_raises_value_error(call: Callable[[MetricsRegistry], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(MetricsRegistry())


def test_format_value() -> None:
    assert [format_value(v) for v in (3, 0.25, math.inf, -math.inf, math.nan)] == ["3", "0.25", "+Inf", "-Inf", "NaN"]


def test_counters_and_histograms_are_thread_safe() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("hits", "Hits", ("k",))
    histogram = registry.histogram("seconds", "Seconds", ("k",))
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(5000):
            counter.inc("a")
            histogram.observe("a", value=0.001)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert counter.value("a") == 40_000
    assert histogram.count("a") == 40_000


def test_inference_metrics_use_triton_names_and_units() -> None:
    metrics = InferenceMetrics(agent_version="9.9.9")
    metrics.record_success("digits", "2", batch=16, request_ns=2_500_000, queue_ns=40_000, compute_ns=1_800_000)
    metrics.record_success("digits", "2", batch=4, request_ns=1_500_000, queue_ns=10_000, compute_ns=1_000_000)
    metrics.record_execution("digits", "2")  # the two requests shared one runtime call
    metrics.record_failure("digits", "2", "bad_request")
    metrics.record_failure("digits", "2", "rejected")
    metrics.pending_requests.set("digits", "2", value=3)
    metrics.set_active_models([("digits", "2", "cpu-generic-fp32")])

    types, samples = parse_exposition(metrics.render())

    labels = {"model": "digits", "version": "2"}
    assert sample(samples, "nv_inference_request_success", **labels) == 2
    assert sample(samples, "nv_inference_request_failure", **labels, reason="bad_request") == 1
    assert sample(samples, "nv_inference_count", **labels) == 20
    assert sample(samples, "nv_inference_request_failure", **labels, reason="rejected") == 1
    assert sample(samples, "nv_inference_exec_count", **labels) == 1
    assert sample(samples, "nv_inference_pending_request_count", **labels) == 3
    assert sample(samples, "nv_inference_request_duration_us", **labels) == 4000
    assert sample(samples, "nv_inference_queue_duration_us", **labels) == 50
    assert sample(samples, "nv_inference_compute_infer_duration_us", **labels) == 2800
    assert sample(samples, "strata_inference_request_duration_seconds_count", **labels) == 2
    assert sample(samples, "strata_inference_request_duration_seconds_sum", **labels) == pytest.approx(0.004)
    assert sample(samples, "strata_inference_request_duration_seconds_bucket", **labels, le="0.001") == 0
    assert sample(samples, "strata_inference_request_duration_seconds_bucket", **labels, le="0.0025") == 2
    assert sample(samples, "strata_model_active", model="digits", version="2", variant="cpu-generic-fp32") == 1
    assert sample(samples, "strata_agent_info", version="9.9.9") == 1
    assert types["nv_inference_count"] == "counter"
    assert types["strata_model_active"] == "gauge"
    assert len(LATENCY_BUCKETS) + 1 == sum(1 for key in samples if key[0].endswith("_bucket"))


def test_a_batchs_requests_counted_together_count_as_each_counted_alone() -> None:
    """The server counts a batch's answered requests in one call (`record_successes`): every series, the
    histogram's buckets and the probation's latencies come out as they do counted one request at a time."""
    answered = [(1, 900_600, 10_000, 400_000, 300_000), (3, 2_600_500, 1_500, 400_000, None), (2, 1_000_999, 0, 5, 7)]
    together, alone = InferenceMetrics(clock=lambda: 5.0), InferenceMetrics(clock=lambda: 5.0)
    together.record_successes("digits", "2", answered)
    for batch, request_ns, queue_ns, compute_ns, model_ns in answered:
        alone.record_success(
            "digits", "2", batch=batch, request_ns=request_ns, queue_ns=queue_ns, compute_ns=compute_ns,
            model_ns=model_ns,
        )  # fmt: skip
    assert together.render() == alone.render()
    assert together.serving.take() == alone.serving.take()  # the latencies probation and the gates judge
    _, samples = parse_exposition(together.render())
    assert sample(samples, "nv_inference_request_duration_us", model="digits", version="2") == 900 + 2600 + 1000
    assert sample(samples, "strata_inference_request_duration_seconds_count", model="digits", version="2") == 3


def test_inference_metrics_refuse_unknown_failure_reasons() -> None:
    with pytest.raises(ValueError, match="unknown failure reason"):
        InferenceMetrics().record_failure("m", "1", "teapot")


def test_other_parts_of_the_agent_add_families_to_the_same_page() -> None:
    metrics = InferenceMetrics()
    buffered = metrics.registry.gauge("strata_telemetry_buffered_records", "Records waiting to be sent")
    buffered.set(value=12)
    types, samples = parse_exposition(metrics.render())
    assert types["strata_telemetry_buffered_records"] == "gauge"
    assert sample(samples, "strata_telemetry_buffered_records") == 12


def test_other_processes_snapshots_add_up_to_one_page() -> None:
    """A node serving from several processes shows one page: counters, gauges and histograms summed per series,
    series only another process has included, and the families left out of a snapshot counted once."""
    agent, worker = InferenceMetrics(process="0"), InferenceMetrics(process="1")
    for metrics, rows in ((agent, 1), (worker, 3)):
        metrics.record_success("m", "1", batch=rows, request_ns=2_000_000, queue_ns=0, compute_ns=1_000_000)
    worker.record_success("m", "2", batch=1, request_ns=2_000_000, queue_ns=0, compute_ns=1_000_000)
    worker.record_failure("m", "1", "internal")
    snapshot = worker.registry.snapshot(leave_out=("strata_agent_info",))
    assert "strata_agent_info" not in snapshot
    _, samples = parse_exposition(agent.render([snapshot]))

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("nv_inference_request_success", model="m", version="1") == 2
    assert value("nv_inference_request_success", model="m", version="2") == 1
    assert value("nv_inference_count", model="m", version="1") == 4
    assert value("nv_inference_request_failure", model="m", version="1", reason="internal") == 1
    assert value("strata_inference_request_duration_seconds_count", model="m", version="1") == 2
    assert value("strata_inference_request_duration_seconds_bucket", model="m", version="1", le="0.0025") == 2
    assert value("strata_serving_process_requests", process="0") == 1
    assert value("strata_serving_process_requests", process="1") == 3
    assert value("strata_agent_info", version=__version__) == 1
