"""Telemetry's pure parts: histograms, sampling, drift statistics and the batch format."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zstandard

from strata.core.package import Manifest
from strata.core.telemetry import (
    BATCH_FORMAT,
    BUCKETS,
    DRIFT_BINS,
    DROPPED_KINDS,
    LATENCY_BOUNDS_US,
    MAX_BATCH_EVENTS,
    MAX_BATCH_MINUTES,
    MAX_BATCH_TEXT,
    MAX_COUNT,
    MAX_DROPPED_KIND,
    MAX_TENSOR,
    PRIORITY_ERROR,
    PRIORITY_SAMPLED,
    PRIORITY_SLOW,
    DriftReference,
    DriftRow,
    EventRow,
    MinuteRow,
    TelemetryBatch,
    TelemetryError,
    bin_counts,
    bin_counts_summed,
    bucket_of,
    build_reference,
    chi_square_statistic,
    decode_batch,
    drift_references,
    encode_batch,
    event_priority,
    min_samples,
    percentile_ms,
    psi,
    quantile_us,
)


def test_buckets_and_quantiles() -> None:
    assert bucket_of(10) == 0
    assert bucket_of(50) == 0
    assert bucket_of(51) == 1
    assert bucket_of(10**9) == BUCKETS - 1
    counts = [0] * BUCKETS
    counts[bucket_of(700)] = 100  # all between 500 and 1000 us
    assert 500 <= (quantile_us(counts, 0.5) or 0) <= 1000
    assert quantile_us(counts, 0.5) == pytest.approx(750)
    assert quantile_us([0] * BUCKETS, 0.5) is None
    overflow = [0] * BUCKETS
    overflow[-1] = 3
    assert quantile_us(overflow, 0.99) == LATENCY_BOUNDS_US[-1]


def test_percentiles_rest_on_enough_requests_not_on_one() -> None:
    """A single request was reported as three different percentiles, each interpolated inside its bucket."""
    assert (min_samples(0.5), min_samples(0.95), min_samples(0.99)) == (2, 20, 100)
    counts = [0] * BUCKETS
    counts[bucket_of(700)] = 1
    assert [percentile_ms(counts, q) for q in (0.5, 0.95, 0.99)] == [None, None, None]
    counts[bucket_of(700)] = 19
    assert percentile_ms(counts, 0.5) == pytest.approx(0.75)
    assert percentile_ms(counts, 0.95) is None
    counts[bucket_of(700)] = 20
    assert percentile_ms(counts, 0.95) is not None
    assert percentile_ms(counts, 0.99) is None
    counts[bucket_of(700)] = 100
    assert percentile_ms(counts, 0.99) is not None


def test_sampling_keeps_every_error_and_slow_request() -> None:
    assert event_priority(False, 10, 1000, 0.0, 0.99) == PRIORITY_ERROR
    assert event_priority(True, 5000, 1000, 0.0, 0.99) == PRIORITY_SLOW
    assert event_priority(True, 10, 1000, 0.05, 0.01) == PRIORITY_SAMPLED
    assert event_priority(True, 10, 1000, 0.05, 0.5) is None


def test_psi_and_chi_square_separate_shifted_from_unshifted() -> None:
    rng = np.random.default_rng(0)
    reference = build_reference("x", "input", rng.normal(0, 1, (500, 8)))
    assert reference is not None
    same = bin_counts(reference, rng.normal(0, 1, (200, 8)))
    shifted = bin_counts(reference, rng.normal(0.8, 1, (200, 8)))
    assert psi(reference.counts, same) < 0.05
    assert psi(reference.counts, shifted) > 0.25
    statistic_same, dof = chi_square_statistic(reference.counts, same)
    statistic_shifted, _ = chi_square_statistic(reference.counts, shifted)
    assert dof == len(reference.counts) - 1
    assert statistic_shifted > 10 * statistic_same


def test_reference_of_constant_or_text_tensors_is_none() -> None:
    assert build_reference("x", "input", np.zeros((10, 4))) is None
    assert build_reference("x", "input", np.array([["a"], ["b"]])) is None


def test_what_build_reference_writes_decodes_and_nothing_larger_does() -> None:
    """Review (session 7): DRIFT_BINS was never enforced; a 1,000,001-bin reference cost every node ~113 ms per
    inference. A reference is now what `build_reference` makes, at most DRIFT_BINS bins, or it is refused."""
    rng = np.random.default_rng(3)
    built = build_reference("x", "input", rng.normal(size=(200, 4)))
    assert built is not None
    assert len(built.counts) == DRIFT_BINS
    assert drift_references({"tensors": [json.loads(json.dumps(built.to_json()))]}) == [built]
    good = {"tensor": "x", "kind": "input", "edges": [0, 1.5], "counts": [1, 0, 2]}
    assert drift_references({"tensors": [good]})[0].edges == (0.0, 1.5)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"edges": [float(e) for e in range(DRIFT_BINS)], "counts": [1] * (DRIFT_BINS + 1)}, "has 10 edges"),
        ({"edges": [], "counts": [1]}, "has 0 edges"),
        ({"counts": [1, 2]}, "has 2 edges and 2 counts"),
        ({"edges": [0.0, float("inf")]}, "not a finite number"),
        ({"edges": [0.0, float("nan")]}, "not a finite number"),
        ({"edges": ["0", 1.0]}, "not a finite number"),
        ({"edges": [1.0, 1.0]}, "do not increase"),
        ({"edges": [2.0, 1.0]}, "do not increase"),
        ({"counts": [1, -1, 0]}, "non-negative integer"),
        ({"counts": [1, 0.5, 0]}, "non-negative integer"),
        ({"counts": [1, True, 0]}, "non-negative integer"),
        ({"kind": "weights"}, "'kind' input or output"),
        ({"edges": {"0": 1}}, "must be lists"),
    ]
    for change, words in bad:
        with pytest.raises(TelemetryError, match=words):
            drift_references({"tensors": [{**good, **change}]})
    for section in ({"tensors": 5}, {"tensors": [5]}):
        with pytest.raises(TelemetryError):
            drift_references(section)
    # a node keeps drift by tensor: a second reference of one would count its values twice (and hold them twice)
    other = {**good, "kind": "output"}
    with pytest.raises(TelemetryError, match="more than one reference of tensor 'x'"):
        drift_references({"tensors": [good, other]})


def test_large_tensors_are_strided_not_scanned_whole() -> None:
    reference = DriftReference("x", "input", (0.5,), (1, 1))
    counts = bin_counts(reference, np.ones(1_000_000))
    assert sum(counts) <= 4096


def test_a_batch_counts_what_its_requests_count_alone() -> None:
    """One pass over a batch's tensor gives the sum of the counts its requests get alone: non-finite values left
    out, empty requests counted empty, a request over the stride limit strided on its own (the whole batch is
    then over it too, and is not strided as one)."""
    reference = DriftReference("x", "input", (-1.0, 0.0, 1.0), (1, 2, 3, 4))
    rng = np.random.default_rng(7)
    parts = [rng.normal(size=(2, 3)), np.zeros((0, 3)), rng.normal(size=(1, 3)), rng.normal(size=(2000, 3))]
    parts[0][0, 1] = np.nan
    parts[2][0, 0] = -np.inf
    whole = np.concatenate(parts)

    def summed(counts: list[list[int]]) -> list[int]:
        return [sum(column) for column in zip(*counts, strict=True)]

    alone = [bin_counts(reference, part) for part in parts]
    assert sum(alone[3]) <= 4096 < parts[3].size  # the last request is strided
    assert bin_counts_summed(reference, whole, [part.size for part in parts]) == summed(alone)
    assert bin_counts_summed(reference, whole[:3], [part.size for part in parts[:3]]) == summed(alone[:3])
    # many small requests whose batch is over the limit: each counted whole, so the batch is not strided
    small = [rng.normal(size=(1, 64)) for _ in range(100)]
    assert bin_counts_summed(reference, np.concatenate(small), [64] * 100) == summed(
        [bin_counts(reference, part) for part in small]
    )
    assert sum(bin_counts_summed(reference, np.concatenate(small), [64] * 100)) == 6400
    text = np.array(["a", "b", "c"])
    assert bin_counts_summed(reference, text, [1, 2]) == [0, 0, 0, 0]
    assert bin_counts_summed(reference, np.array([[0, 5], [-3, 1]]), [2, 2]) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="do not split"):
        bin_counts_summed(reference, whole, [1])


def _batch() -> TelemetryBatch:
    latency = [0] * BUCKETS
    latency[3] = 7
    return TelemetryBatch(
        node_id="n1",
        seq=3,
        created=1000.5,
        minutes=[MinuteRow("digits", "1", "cpu-fp32", 29_000_000, 7, 3, 9, 7000, 70, latency, client_errors=1, shed=1)],
        events=[EventRow(1000.25, "digits", "1", "cpu-fp32", 300, 5, 1, "bad_request", "local", 2, '{"shape":[1]}')],
        drift=[DriftRow("digits", "1", 29_000_000, "X", [1, 2, 3])],
        dropped={"events_sampled": 4},
    )


def test_batch_round_trip() -> None:
    batch = _batch()
    decoded = decode_batch(encode_batch(batch))
    assert decoded == batch
    assert (decoded.minutes[0].client_errors, decoded.minutes[0].shed) == (1, 1)


def _recoded(change: dict[str, list[Any]]) -> bytes:
    """`_batch()` encoded with its minutes' columns changed as given."""
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    raw["minutes"].update(change)
    return zstandard.ZstdCompressor().compress(json.dumps(raw).encode())


def test_client_errors_are_a_part_of_the_errors_or_the_batch_is_refused() -> None:
    # 3 errors in the minute: 0..3 of them may be the caller's fault, not 4 and not -1
    assert decode_batch(_recoded({"client_errors": [2]})).minutes[0].client_errors == 2
    with pytest.raises(TelemetryError, match=r"client_errors 4 must be between 0 and its errors \(3\)"):
        decode_batch(_recoded({"client_errors": [4]}))
    with pytest.raises(TelemetryError, match=r"client_errors: a count must be a whole number between 0 and"):
        decode_batch(_recoded({"client_errors": [-1]}))
    with pytest.raises(TelemetryError, match="'client_errors' is missing or has the wrong length"):
        decode_batch(_recoded({"client_errors": [0, 0]}))
    with pytest.raises(TelemetryError, match="malformed"):
        decode_batch(_recoded({"client_errors": ["many"]}))


def test_shed_requests_are_a_part_of_the_errors_not_the_callers_or_the_batch_is_refused() -> None:
    # 3 errors in the minute, 1 the caller's fault: 0..2 of them may have been shed, not 3 (one would be counted
    # twice), not -1
    assert decode_batch(_recoded({"shed": [2]})).minutes[0].shed == 2
    assert decode_batch(_recoded({"shed": [0]})).minutes[0].shed == 0
    with pytest.raises(TelemetryError, match=r"shed 3 must be between 0 and its errors that were not the caller's"):
        decode_batch(_recoded({"shed": [3]}))
    with pytest.raises(TelemetryError, match=r"shed: a count must be a whole number between 0 and"):
        decode_batch(_recoded({"shed": [-1]}))
    with pytest.raises(TelemetryError, match="'shed' is missing or has the wrong length"):
        decode_batch(_recoded({"shed": [0, 0]}))
    with pytest.raises(TelemetryError, match="shed: a count must be a whole number"):
        decode_batch(_recoded({"shed": [True]}))


def test_counts_are_whole_numbers_a_store_can_hold_or_the_batch_is_refused() -> None:
    # A node's batch is a claim: each count must be an int in 0..MAX_COUNT. Infinity raised OverflowError past
    # the decoder (a 500); 2**70 reached the database (SQLite: OverflowError, a 500; PostgreSQL: a 503 'database
    # error' that the node retried for ever); "2", True and 2.9 were taken as 2, 1 and 2.
    for column, wrong in [
        ("client_errors", float("inf")), ("requests", 2**70), ("client_errors", "2"), ("client_errors", True),
        ("client_errors", 1.9), ("items", -1), ("latency_sum_us", MAX_COUNT + 1), ("queue_sum_us", float("nan")),
    ]:  # fmt: skip
        with pytest.raises(TelemetryError, match=f"{column}: a count must be a whole number between 0 and"):
            decode_batch(_recoded({column: [wrong]}))
    latency = [0] * BUCKETS
    latency[0] = -7
    with pytest.raises(TelemetryError, match="latency: a count must be a whole number between 0 and"):
        decode_batch(_recoded({"latency": [latency]}))
    assert decode_batch(_recoded({"items": [MAX_COUNT]})).minutes[0].items == MAX_COUNT
    # the events', drift's and dropped counts and the sequence number as well (an event's batch: an INTEGER column)
    for table, key, wrong in [
        ("events", "batch", [2**31]), ("events", "latency_us", [-1]), ("drift", "counts", [[1, 2**70, 3]]),
        ("dropped", "events_sampled", 2**70), (None, "seq", "3"),
        # an event's time (ms, delta-encoded) went unchecked: infinity and NaN reached the store, where the retention
        # sweep's `ts < cutoff` never deletes them; a time before 1970 was taken too
        ("events", "ts_ms", [float("nan")]), ("events", "ts_ms", [float("inf")]), ("events", "ts_ms", [-1]),
    ]:  # fmt: skip
        raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
        (raw[table] if table else raw)[key] = wrong
        with pytest.raises(TelemetryError, match="a count must be a whole number between 0 and"):
            decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))


def test_texts_longer_than_the_control_planes_columns_are_refused() -> None:
    # An event's status of 33 characters reached PostgreSQL's VARCHAR(32): a 503 'database error' that the node
    # retried for ever (SQLite kept it).
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    raw["strings"][raw["events"]["status"][0]] = "x" * 33
    with pytest.raises(TelemetryError, match="a text of 33 characters where at most 32 fit"):
        decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))
    raw["strings"][raw["events"]["status"][0]] = "x" * 32
    raw["strings"][raw["events"]["summary"][0]] = "s" * 5000  # a summary is TEXT
    assert decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode())).events[0].status == "x" * 32


def test_one_long_text_named_by_many_rows_is_refused_past_a_batchs_size() -> None:
    # Texts travel once and rows name them by index: a 4,000-character summary named by 20,000 events was 80 MB of
    # rows to store from a batch of a few hundred kilobytes.
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    copies = 20_000
    raw["strings"][raw["events"]["summary"][0]] = "s" * 4000
    raw["events"] = {key: column * copies for key, column in raw["events"].items()}
    raw["events"]["ts_ms"] = raw["events"]["ts_ms"][:1] + [0] * (copies - 1)  # deltas: every event at one time
    payload = zstandard.ZstdCompressor().compress(json.dumps(raw).encode())
    assert len(payload) < 1 << 20
    with pytest.raises(TelemetryError, match=f"texts add up to more than {MAX_BATCH_TEXT} characters"):
        decode_batch(payload)
    raw["strings"][raw["events"]["summary"][0]] = "s" * 100  # the same rows with a short summary are a batch
    assert len(decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode())).events) == copies


def test_a_dropped_kind_the_buffer_never_counts_is_refused() -> None:
    # The control plane keeps a row per (node, kind) for good, and its kind column is VARCHAR(32): any other name was
    # taken, so one batch could add a row for each of a million made-up kinds, or reach PostgreSQL's limit.
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    raw["dropped"] = {"x" * 1000: 1}
    with pytest.raises(TelemetryError, match=r"dropped: 'x{39} is not one of events_sampled, "):
        decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))
    raw["dropped"] = dict.fromkeys(DROPPED_KINDS, 1)
    assert decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode())).dropped == raw["dropped"]


def test_a_tensor_name_longer_than_the_drift_column_gets_no_reference_and_no_batch_carries_one() -> None:
    # The control plane keeps drift by tensor name in a VARCHAR(256): a longer name was a database error there,
    # retried for ever on PostgreSQL. Such a tensor gets no reference at build, a package built before that has
    # its reference left out on the node, and a batch that carries one anyway is refused.
    values = np.arange(100, dtype=np.float32).reshape(100, 1)
    long_name, fits = "t" * (MAX_TENSOR + 1), "t" * MAX_TENSOR
    assert build_reference(long_name, "input", values) is None
    kept = build_reference(fits, "input", values)
    assert kept is not None
    old = {**kept.to_json(), "tensor": long_name}
    assert [r.tensor for r in drift_references({"tensors": [kept.to_json(), old]})] == [fits]
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    raw["strings"][raw["drift"]["tensor"][0]] = long_name
    with pytest.raises(TelemetryError, match=f"a text of {MAX_TENSOR + 1} characters where at most {MAX_TENSOR} fit"):
        decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))


def test_a_decoder_leaves_a_minutes_column_it_does_not_know_alone() -> None:
    # What a control plane does with a batch from a newer node (an older control plane with client_errors, too:
    # its decoder reads the columns it names and no others).
    assert decode_batch(_recoded({"from_a_newer_node": [7]})) == _batch()


def test_decode_refuses_garbage_and_bombs() -> None:
    with pytest.raises(TelemetryError, match="does not decode"):
        decode_batch(b"not zstd")
    # A frame that declares its size: python-zstandard inflates it to that size whatever max_output_size says, so
    # the declared size is refused first (this bomb was inflated to 70 MB, then failed as JSON).
    bomb = zstandard.ZstdCompressor().compress(b"0" * (70 << 20))
    with pytest.raises(TelemetryError, match="declares 73400320 bytes, more than 8388608"):
        decode_batch(bomb)
    # One that does not (a streamed frame): max_output_size stops it.
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"0" * (9 << 20))
    with pytest.raises(TelemetryError, match="does not decode"):
        decode_batch(streamed)
    wrong = zstandard.ZstdCompressor().compress(json.dumps({"format": "other"}).encode())
    with pytest.raises(TelemetryError, match=BATCH_FORMAT):
        decode_batch(wrong)


def test_decode_refuses_columns_that_do_not_line_up() -> None:
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    raw["minutes"]["errors"] = [1, 2]
    with pytest.raises(TelemetryError, match="wrong length"):
        decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))
    raw = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    raw["minutes"]["errors"] = [99]
    with pytest.raises(TelemetryError, match="inconsistent"):
        decode_batch(zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))


def test_manifest_keeps_unknown_keys_so_its_digest_survives_a_parse() -> None:
    raw = {
        "schema": "strata.package/v1",
        "name": "m",
        "version": "1",
        "variant": "v",
        "profile": "cpu-generic",
        "runtime": "onnxruntime",
        "precision": "fp32",
        "model_file": "model.onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        "files": [
            {"path": "model.onnx", "size": 1, "sha256": "a" * 64, "role": "model"},
            {"path": "golden.npz", "size": 1, "sha256": "b" * 64, "role": "golden"},
        ],
        "golden": {"file": "golden.npz", "rtol": 0.001, "atol": 0.0001},
        "metrics": {},
        "policy": {},
        "build": {},
        "from_a_newer_strata": {"x": 1},
    }
    from strata.core.hashing import digest_json

    assert Manifest.from_json(raw).digest == digest_json(raw)


def test_every_dropped_kind_fits_the_control_planes_column() -> None:
    assert all(len(kind) <= MAX_DROPPED_KIND for kind in DROPPED_KINDS)


def _as_sent(document: dict[str, Any]) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps(document, separators=(",", ":")).encode())


def test_what_parsing_would_cost_is_refused_before_parsing() -> None:
    """A batch is a node's claim, parsed at the control plane's cost: 8 MiB of `[],` took 0.5 s of the GIL and
    209 MB. Its values and lists are counted first; nesting and tables of the wrong type are refused, not a 500."""
    honest = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(_batch())))
    for junk in ([[]] * 1_000_000, [{}] * 1_000_000, [0] * 2_000_000):
        with pytest.raises(TelemetryError, match="more than a batch holds"):  # counted, never parsed
            decode_batch(_as_sent({**honest, "junk": junk}))
    nested = zstandard.ZstdCompressor().compress(b"[" * 150_000 + b"]" * 150_000)
    with pytest.raises(TelemetryError, match="does not decode"):  # RecursionError: a 500 before
        decode_batch(nested)
    for table, value in (("minutes", []), ("events", "x"), ("drift", 5)):  # AttributeError: a 500 before
        with pytest.raises(TelemetryError, match="malformed"):
            decode_batch(_as_sent({**honest, table: value}))
    strings = [[0] * 1000 if i == 0 else text for i, text in enumerate(honest["strings"])]
    with pytest.raises(TelemetryError, match="string 0 is not a text"):  # str() of a big list cost 0.4 s
        decode_batch(_as_sent({**honest, "strings": strings}))


def test_the_largest_batch_an_agent_seals_is_taken() -> None:
    """Every row a node seals in one batch, with names as long as their columns: within every limit (3.5 MB
    decompressed; refused before, when the texts were held to 8 MiB), and a batch of an agent from before drift
    was sealed in parts (25,000 drift rows) is taken too."""
    m, v, w = "m" * 128, "v" * 128, "w" * 128
    summary = '{{"shape":[1,3,224,224],"mean":{}}}'
    batch = TelemetryBatch(
        node_id="n1",
        seq=1,
        created=1.7e9,
        minutes=[
            MinuteRow(m, v, w, 29_000_000 + i, 123456, 123, 1234567, 12345678901, 1234567890, [123456] * BUCKETS)
            for i in range(MAX_BATCH_MINUTES)
        ],
        events=[
            EventRow(1.7e9 + i, m, v, w, 123456, 2345, 32, "s" * 32, "t" * 16, i % 3, summary.format(i / 7))
            for i in range(MAX_BATCH_EVENTS)
        ],
        drift=[DriftRow(m, v, 29_000_000 + i // 26, "x" * 255 + chr(97 + i % 26), [12345] * 10) for i in range(25_000)],
    )
    decoded = decode_batch(encode_batch(batch))
    assert (len(decoded.minutes), len(decoded.events), len(decoded.drift)) == (2000, 20000, 25000)
