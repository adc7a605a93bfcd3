"""What telemetry costs: bytes on the wire per event and per aggregate minute, and disk for a 72-hour outage.

Drives the real node buffer (SQLite) and batch encoder with a synthetic load of 100 inferences per second
(log-normal latency around 1 ms, 0.1% errors, 1% sampling, one drift-tracked input tensor) for HOURS hours
of simulated time, then:
- seals one batch of aggregates only and one of kept events only, and divides their compressed sizes;
- measures the buffer's disk use per simulated hour and projects it to 72 hours (it grows linearly: the
  ratio of the two measured hours is printed so you can check);
- baseline in the same run: every request as a JSON line, gzip-compressed (what shipping raw access logs
  costs). Anchors that are not measured here: Prometheus stores 1-2 bytes per sample; remote write sends
  about 50 bytes per sample.
Prints one JSON object.
"""

from __future__ import annotations

import gzip
import json
import random
import tempfile
from pathlib import Path

from strata.agent.telemetry import Outcome, TelemetryBuffer
from strata.core.telemetry import decode_batch, event_priority

RATE = 100  # inferences per second
HOURS = 2
T0 = 1_800_000_000.0
SAMPLE_RATE = 0.01
SLOW_US = 250_000


def simulate(buffer: TelemetryBuffer, start_minute: int, minutes: int, rng: random.Random) -> list[bytes]:
    """Write `minutes` minutes of traffic; return the baseline's JSON lines of the first minute."""
    lines: list[bytes] = []
    for m in range(start_minute, start_minute + minutes):
        outcomes, priorities = [], []
        ts = T0 + m * 60
        for _ in range(RATE * 60):
            ts += rng.expovariate(RATE)  # Poisson arrivals
            ok = rng.random() > 0.001
            latency = int(rng.lognormvariate(6.9, 0.35))  # ~1 ms
            drift = (("X", tuple(rng.choices(range(40), k=7))),)
            summary = json.dumps({"shape": [1, 64], "mean": round(rng.gauss(0.31, 0.05), 4)}, separators=(",", ":"))
            outcome = Outcome(ts, "digits", "7", "x86_64-avx2-int8", latency, rng.randrange(5, 60), 1, ok,
                              "ok" if ok else "internal", summary=summary, drift=drift)  # fmt: skip
            outcomes.append(outcome)
            priorities.append(event_priority(ok, latency, SLOW_US, SAMPLE_RATE, rng.random()))
            if m == start_minute:
                lines.append(
                    json.dumps(
                        {
                            "ts": ts,
                            "model": "digits",
                            "version": "7",
                            "variant": "x86_64-avx2-int8",
                            "latency_us": latency,
                            "status": outcome.status,
                            "batch": 1,
                            "node": "edge-0042",
                        }
                    ).encode()
                )
            if len(outcomes) == 500:  # group commits of a busy node
                buffer.write(outcomes, priorities)
                outcomes, priorities = [], []
        buffer.write(outcomes, priorities)
    return lines


def main() -> None:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        buffer = TelemetryBuffer(Path(tmp) / "telemetry.db", 10 << 30)
        baseline_lines = simulate(buffer, 0, 60, rng)
        hour_one = buffer.used_bytes()
        simulate(buffer, 60, 60 * (HOURS - 1), rng)
        total = buffer.used_bytes()
        stats = buffer.stats()
        requests = RATE * 3600 * HOURS

        # Aggregates alone: seal with no events allowed.
        seq = buffer.seal("edge-0042", T0, 0, 10**9)
        pending = buffer.read_outbox()
        assert seq is not None
        assert pending is not None
        aggregates_batch = decode_batch(pending[1])
        aggregate_bytes = len(pending[1])
        buffer.ack(pending[0], T0)
        # Kept events alone (the aggregates are gone now).
        buffer.seal("edge-0042", T0, 10**9, 0)
        pending = buffer.read_outbox()
        assert pending is not None
        events_batch = decode_batch(pending[1])
        event_bytes = len(pending[1])
        buffer.close()

    minute_rows = len(aggregates_batch.minutes)
    kept = len(events_batch.events)
    baseline = gzip.compress(b"\n".join(baseline_lines), 6)
    baseline_per_event = len(baseline) / len(baseline_lines)
    per_event_aggregate = aggregate_bytes / requests
    print(
        json.dumps(
            {
                "benchmark": "telemetry_wire",
                "rate_per_s": RATE,
                "simulated_hours": HOURS,
                "requests": requests,
                "aggregate_minutes": minute_rows,
                "aggregate_batch_bytes": aggregate_bytes,
                "bytes_per_aggregate_minute": round(aggregate_bytes / minute_rows, 1),
                "bytes_per_sampled_out_event": round(per_event_aggregate, 4),
                "kept_events": kept,
                "kept_event_share": round(kept / requests, 4),
                "bytes_per_kept_event": round(event_bytes / max(kept, 1), 1),
                "wire_bytes_per_request_all_in": round((aggregate_bytes + event_bytes) / requests, 3),
                "baseline_gzip_json_lines_bytes_per_event": round(baseline_per_event, 1),
                "ratio_all_in_to_baseline": round((aggregate_bytes + event_bytes) / requests / baseline_per_event, 4),
                "disk_bytes_first_hour": hour_one,
                "disk_bytes_per_hour": round(total / HOURS),
                "linearity_last_hour_over_first": round((total - hour_one) / (HOURS - 1) / hour_one, 3),
                "disk_bytes_72h_outage_projected": round(total / HOURS * 72),
                "disk_mb_72h_outage_projected": round(total / HOURS * 72 / 2**20, 1),
                "dropped": dict(stats.dropped),
                "anchors": {"prometheus_tsdb_bytes_per_sample": "1-2", "remote_write_bytes_per_sample": "~50"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
