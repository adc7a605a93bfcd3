"""Drift counted through a tap: a batch's values are buffered and counted with other batches', with the counts of
each batch counted alone, in the minute it was served in, and nothing held is lost (a real recorder, a real SQLite
buffer)."""

from __future__ import annotations

import json
import sqlite3
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from strata.agent.telemetry import (
    DRIFT_BUFFER_ELEMENTS,
    DRIFT_TAP_MAX_VALUES,
    DRIFT_WRITE_S,
    DriftCounts,
    DriftTap,
    TelemetryConfig,
    TelemetryRecorder,
)
from strata.core.telemetry import DRIFT_MAX_ELEMENTS, DriftReference, bin_counts, minute_of

T = 1_800_000_000.0  # the start of a minute
X = DriftReference(tensor="X", kind="input", edges=(-1.0, 0.0, 1.0), counts=(10, 10, 10, 10))
Y = DriftReference(tensor="Y", kind="output", edges=(0.5, 2.5), counts=(5, 5, 5))


def drift_rows(path: Path, version: str = "1") -> dict[tuple[int, str], list[int]]:
    other = sqlite3.connect(path)
    try:
        rows = other.execute("SELECT minute, tensor, counts FROM drift WHERE version=?", (version,)).fetchall()
    finally:
        other.close()
    return {(minute, tensor): json.loads(counts) for minute, tensor, counts in rows}


def test_a_taps_counts_are_each_batchs_counted_alone_in_the_minute_it_was_served(tmp_path: Path) -> None:
    """Many small batches (floats with NaN and infinities, ints, the dtype changing, more values than a buffer
    holds), a request too large to go unstrided and a tensor of text, over a minute's change: the buffer holds
    exactly what `bin_counts` of each batch alone counts, summed per minute."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))
    tap = recorder.drift_tap("m", "1", (X, Y))
    rng = np.random.default_rng(7)
    expected: dict[tuple[int, str], Counter[int]] = {}

    def serve(ts: float, x: np.ndarray, y: np.ndarray | None) -> None:
        values = [(0, x)] + ([] if y is None else [(1, y)])
        tap.add(values, [], ts=ts)
        for reference, array in [(X, x), (Y, y)]:
            if array is not None:
                counts = bin_counts(reference, array)
                expected.setdefault((minute_of(ts), reference.tensor), Counter()).update(dict(enumerate(counts)))

    for index in range(400):  # ~ 400 * 3 * 64 values of X: a buffer fills several times in a minute
        x = rng.normal(0, 1.5, (int(rng.integers(1, 6)), 64)).astype(np.float32)
        x[0, index % 64] = [np.nan, np.inf, -np.inf, 0.0][index % 4]
        serve(T + index * 0.1, x, rng.integers(0, 4, (x.shape[0],)))
    serve(T + 45, rng.normal(0, 1, (1, 64)).astype(np.float64), None)  # X's dtype changes within the minute
    serve(T + 46, rng.normal(0, 1, (3 * DRIFT_MAX_ELEMENTS,)).astype(np.float32), None)  # strided, alone
    serve(T + 61, rng.normal(0, 1, (2, 64)).astype(np.float32), np.array([7, 1]))  # the next minute
    tap.add([(0, np.array(["a", "b"]))], [], ts=T + 62)  # text: no counts, as `bin_counts` gives none
    recorder.close()

    got = drift_rows(tmp_path / "t.db")
    want = {
        key: [counter[i] for i in range(len(X.counts if key[1] == "X" else Y.counts))]
        for key, counter in expected.items()
    }
    assert got == want
    assert sum(got[(minute_of(T), "Y")]) > 1000  # the batches were really counted, not only the last ones
    assert set(got) == {(minute_of(T), "X"), (minute_of(T), "Y"), (minute_of(T) + 1, "X"), (minute_of(T) + 1, "Y")}


def test_a_tap_holds_at_most_its_buffer_and_counts_when_it_is_full() -> None:
    """What a tap holds is bounded: values past its buffer's room are counted at once, not kept (a node serving
    a burst must not hold a second of its inputs); a tap told nothing of what it holds stays quiet."""
    sunk: list[tuple[DriftCounts, float]] = []
    started: list[bool] = []
    tap = DriftTap((X,), lambda counts, ts: sunk.append((counts, ts)), lambda: started.append(True), capacity=4096)
    batch = np.zeros((4, 64), np.float32)  # 256 values: 16 batches fill the buffer
    for index in range(16):
        tap.add([(0, batch)], [], ts=T + index)
    assert sunk == []  # held
    assert started == [True]  # and the recorder told once
    tap.add([(0, batch)], [], ts=T + 16)
    assert sunk == [([("X", [0, 4096, 0, 0])], T)]  # the full buffer counted, in its minute
    assert tap.take() == [(minute_of(T), [("X", [0, 256, 0, 0])])]
    assert tap.take() == []


def test_values_a_tap_holds_are_written_within_seconds_with_no_other_traffic(tmp_path: Path) -> None:
    """A tap's first values tell the writer that drift is due: with no outcome to take them along, they are
    counted and written within DRIFT_WRITE_S, and `drift_psi` shows them at once."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))
    tap = recorder.drift_tap("m", "1", (X,))
    tap.add([(0, np.array([[-2.0, -0.5, 0.5, 2.0]], np.float32))], [])
    assert recorder.drift_psi() == {("m", "1", "X"): pytest.approx(0.0)}  # one value in each bin, as the reference
    deadline = time.monotonic() + 10 * DRIFT_WRITE_S
    rows: dict[tuple[int, str], list[int]] = {}
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = drift_rows(tmp_path / "t.db")
    assert list(rows.values()) == [[1, 1, 1, 1]]
    recorder.close()


def test_a_version_activated_again_or_let_go_loses_nothing_its_tap_held(tmp_path: Path) -> None:
    """The same version activated again gets a new tap; what the old one held is counted, and a batch still
    running on the old one counts at once. A version no longer served keeps its counts too."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))
    values = [(0, np.array([-2.0, 2.0], np.float32))]
    old = recorder.drift_tap("m", "1", (X,))
    old.add(values, [], ts=T)
    new = recorder.drift_tap("m", "1", (X,))
    old.add(values, [], ts=T)  # a batch that started before the swap
    new.add(values, [], ts=T)
    other = recorder.drift_tap("m", "2", (X,))  # version 2 replaces 1 as the model's current
    other.add(values, [], ts=T)
    new.add(values, [], ts=T)
    recorder.close()
    assert drift_rows(tmp_path / "t.db") == {(minute_of(T), "X"): [4, 0, 0, 4]}
    assert drift_rows(tmp_path / "t.db", "2") == {(minute_of(T), "X"): [1, 0, 0, 1]}


@pytest.mark.slow
def test_the_writer_never_misses_values_a_fold_moves_while_it_looks(tmp_path: Path) -> None:
    """A fold (here `drift_psi`'s) empties the new counts before it fills the unwritten ones, and counting what
    many taps hold takes a while: a writer that looked at both midway saw no drift and slept with no time limit,
    leaving the counts unwritten (4 tries in 10 lost them so, with 100 tensors). Each try must be written within
    seconds."""
    references = tuple(
        DriftReference(tensor=f"X{i}", kind="input", edges=(-1.0, 0.0, 1.0), counts=(10, 10, 10, 10))
        for i in range(100)
    )
    values = [(index, np.array([[-2.0, -0.5, 0.5, 2.0]], np.float32)) for index in range(len(references))]
    for attempt in range(8):
        path = tmp_path / f"{attempt}.db"
        recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=0.0))
        recorder.drift_tap("m", "1", references).add(values, [])
        recorder.drift_psi()
        deadline = time.monotonic() + 3 * DRIFT_WRITE_S + 2
        while not drift_rows(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        written = len(drift_rows(path))
        recorder.close()
        assert written == len(references), f"try {attempt}: {written} of {len(references)} tensors written in time"


def test_values_a_scrape_folds_before_their_tap_says_so_are_written_within_seconds(tmp_path: Path) -> None:
    """A scrape's fold can take a batch's values between the tap's adding them and its telling the recorder: the
    writer, waiting with no time limit, must still be woken, or the counts wait in memory for the next seal or the
    close (a kill loses them)."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))
    tap = recorder.drift_tap("m", "1", (X,))
    time.sleep(0.2)  # the writer has looked: no drift, no time limit
    told = tap._pending

    def scraped_first() -> None:
        recorder.drift_psi()
        told()

    tap._pending = scraped_first
    tap.add([(0, np.array([-2.0, -0.5, 0.5, 2.0], np.float32))], [])
    deadline = time.monotonic() + 3 * DRIFT_WRITE_S + 2
    while not drift_rows(tmp_path / "t.db") and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = drift_rows(tmp_path / "t.db")
    recorder.close()
    assert list(rows.values()) == [[1, 1, 1, 1]]


def test_a_package_with_many_references_costs_a_tap_no_more_than_its_cap(tmp_path: Path) -> None:
    """A package's drift references are its claim, and a manifest holds hundreds of thousands: a tap buffers the
    first DRIFT_TAP_MAX_VALUES worth and counts the rest at once, so its memory is bounded whatever the package says,
    and every reference is still counted."""
    references = tuple(
        DriftReference(tensor="X", kind="input", edges=(-1.0, 0.0, 1.0), counts=(10, 10, 10, 10)) for _ in range(2000)
    )
    sunk: list[DriftCounts] = []
    tap = DriftTap(references, lambda counts, ts: sunk.append(counts), lambda: None)
    batch = np.zeros((8, 64), np.float64)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tap.add([(index, batch) for index in range(len(references))], [], ts=T)
        kept = tracemalloc.get_traced_memory()[0] - before  # what the tap holds on to (other threads of the test
    finally:  # process may allocate meanwhile: a bound with room, far below what unbounded buffers take)
        tracemalloc.stop()
    assert kept < 4 << 20  # its buffers: 16 of 4,096 float64, 0.5 MiB; 2,000 of them would be 62.5 MiB
    buffered = DRIFT_TAP_MAX_VALUES // DRIFT_BUFFER_ELEMENTS
    assert len(sunk[0]) == len(references) - buffered  # counted at once, as before taps
    held = tap.take()
    assert len(held[0][1]) == buffered
    assert all(counts == [0, 512, 0, 0] for _, counts in sunk[0] + held[0][1])
