"""The node's telemetry buffer, recorder and uploader on a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from strata.agent.metrics import FAILURE_REASONS
from strata.agent.serving import NOT_THE_MODELS_FAULT, is_client_fault, is_shed
from strata.agent.telemetry import (
    DRIFT_WRITE_S,
    Outcome,
    TelemetryBuffer,
    TelemetryConfig,
    TelemetryRecorder,
    TelemetryUploader,
    first_sequence,
)
from strata.core.errors import StrataError, TransportError
from strata.core.telemetry import (
    BUCKETS,
    MAX_BATCH_DRIFT,
    PRIORITY_ERROR,
    PRIORITY_SAMPLED,
    PRIORITY_SLOW,
    DriftReference,
    decode_batch,
    minute_of,
)

T = 1_800_000_000.0


def outcome(ts: float, ok: bool = True, latency_us: int = 800, status: str = "bad_request") -> Outcome:
    return Outcome(
        ts=ts, model="digits", version="1", variant="cpu-generic-fp32", latency_us=latency_us, queue_us=10,
        batch=1, ok=ok, status="ok" if ok else status, summary='{"shape":[1,64]}',
    )  # fmt: skip


def test_only_a_malformed_request_is_the_callers_fault() -> None:
    # Shed by admission control (the node was busy), unavailable (stopping) and internal (the runtime failed) are
    # the node's or the model's; the probation and the gates leave the shed ones out too, and telemetry counts
    # them apart (`shed`), so that its error rate leaves them out as the gates' does.
    faults = {reason: is_client_fault(reason) for reason in FAILURE_REASONS}
    assert faults == {"bad_request": True, "unavailable": False, "internal": False, "rejected": False}
    assert {reason: is_shed(reason) for reason in FAILURE_REASONS} == {**dict.fromkeys(faults, False), "rejected": True}
    assert not is_client_fault("ok")
    assert not is_shed("ok")
    assert {"bad_request", "rejected"} == NOT_THE_MODELS_FAULT


def test_failures_are_counted_and_the_callers_faults_and_the_shed_ones_apart(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", 64 << 20)
    statuses = ["bad_request", "bad_request", "rejected", "unavailable", "internal"]
    buffer.write([outcome(T), *(outcome(T + 1, ok=False, status=s) for s in statuses)], [None] * 6)
    buffer.write(  # the same minute's row, added to
        [outcome(T + 2, ok=False, status="bad_request"), outcome(T + 3, ok=False, status="rejected")], [None] * 2
    )
    assert buffer.seal("n", T + 60, 100, 100) == first_sequence(T + 60)
    pending = buffer.read_outbox()
    assert pending is not None
    [minute] = decode_batch(pending[1]).minutes
    assert (minute.requests, minute.errors, minute.client_errors, minute.shed) == (8, 7, 3, 2)


@pytest.mark.parametrize("added", [(), ("client_errors",)], ids=["before-client-errors", "before-shed"])
def test_a_buffer_made_by_an_older_agent_gets_the_columns(tmp_path: Path, added: tuple[str, ...]) -> None:
    # The minutes table as agents before `client_errors` (or before `shed`) made it, with a row of theirs: an agent
    # upgraded in place opens this file, adds to that row and sends it, none of its old errors told apart.
    path = tmp_path / "telemetry.db"
    buckets = [f"b{i}" for i in range(BUCKETS)]
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE minutes (model TEXT NOT NULL, version TEXT NOT NULL, variant TEXT NOT NULL,"
            " minute INTEGER NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL, items INTEGER NOT NULL,"
            " latency_sum_us INTEGER NOT NULL, queue_sum_us INTEGER NOT NULL,"
            f" {', '.join(f'{b} INTEGER NOT NULL' for b in buckets)},"
            f" {''.join(f'{column} INTEGER NOT NULL DEFAULT 0, ' for column in added)}"
            " PRIMARY KEY (model, version, variant, minute))"
        )
        latency = [0] * BUCKETS
        latency[4] = 4
        old_row = ("digits", "1", "cpu-generic-fp32", int(T // 60), 4, 2, 4, 3200, 40, *latency, *(0 for _ in added))
        placeholders = ", ".join("?" * len(old_row))  # one per column of the old schema; the values are bound
        db.execute(f"INSERT INTO minutes VALUES ({placeholders})", old_row)  # noqa: S608 - only '?' placeholders
    db.close()
    buffer = TelemetryBuffer(path, 64 << 20)
    TelemetryBuffer(path, 64 << 20).close()  # a second serving process opening it finds the column there
    written = [outcome(T + 1, ok=False), outcome(T + 2, ok=False, status="rejected"), outcome(T + 61, ok=False)]
    buffer.write(written, [None] * 3)
    assert buffer.seal("n", T + 120, 100, 100) == first_sequence(T + 120)
    pending = buffer.read_outbox()
    assert pending is not None
    minutes = [(m.requests, m.errors, m.client_errors, m.shed) for m in decode_batch(pending[1]).minutes]
    assert minutes == [(6, 4, 1, 1), (1, 1, 1, 0)]


def test_a_buffer_that_cannot_be_opened_is_one_clear_error_and_is_left_as_it_was(tmp_path: Path) -> None:
    # sqlite3's own exception came out of the agent's start as a traceback
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite " * 500)
    with pytest.raises(StrataError, match=r"cannot open the telemetry buffer .*garbage\.db: file is not a database"):
        TelemetryBuffer(garbage, 64 << 20)
    assert garbage.read_bytes() == b"not sqlite " * 500
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(StrataError, match=r"cannot open the telemetry buffer .*folder\.db: unable to open"):
        TelemetryBuffer(tmp_path / "folder.db", 64 << 20)


def test_every_outcome_is_counted_and_only_kept_ones_become_events(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", 64 << 20)
    outcomes = [outcome(T + i) for i in range(100)] + [outcome(T + 200, ok=False)]
    priorities = [None] * 98 + [PRIORITY_SAMPLED, PRIORITY_SLOW, PRIORITY_ERROR]
    buffer.write(outcomes, priorities, {("digits", "1", minute_of(T), "X"): [100, 201]})
    buffer.write([], [], {("digits", "1", minute_of(T), "X"): [1, 1]})  # summed into the minute's row
    seq = buffer.seal("node-1", T + 300, 1000, 1000)
    assert seq == first_sequence(T + 300)
    pending = buffer.read_outbox()
    assert pending is not None
    batch = decode_batch(pending[1])
    assert sum(m.requests for m in batch.minutes) == 101
    assert sum(m.errors for m in batch.minutes) == 1
    assert len(batch.minutes) == 3  # minutes of T .. T+99 (two) and of T+200
    assert sorted(e.priority for e in batch.events) == [PRIORITY_SAMPLED, PRIORITY_SLOW, PRIORITY_ERROR]
    assert [(d.minute, d.tensor, d.counts) for d in batch.drift] == [(minute_of(T), "X", [101, 202])]


def test_a_pending_batch_is_resent_until_acknowledged_even_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    buffer = TelemetryBuffer(path, 64 << 20)
    buffer.write([outcome(T)], [None])
    seq = first_sequence(T)
    assert buffer.seal("n", T, 100, 100) == seq
    first = buffer.read_outbox()
    buffer.write([outcome(T + 1)], [None])
    assert buffer.seal("n", T, 100, 100) == seq  # one batch in flight at a time
    # The process dies here (no close); a new one opens the same file.
    reopened = TelemetryBuffer(path, 64 << 20)
    assert reopened.read_outbox() == first
    reopened.ack(seq, T + 5)
    assert reopened.seal("n", T + 6, 100, 100) == seq + 1
    stats = reopened.stats()
    assert stats.uploaded_batches == 1
    assert stats.last_upload == int(T + 5)


def test_a_new_buffer_numbers_its_batches_after_every_older_buffer_of_the_node(tmp_path: Path) -> None:
    """The control plane stores each (node, seq) once. A node replaced by a new machine (enrolled again under its id)
    or whose damaged buffer was moved aside starts a new buffer: had it counted from 1 again, its batches would be
    acknowledged as resends of the old buffer's and never stored."""
    old = TelemetryBuffer(tmp_path / "old.db", 64 << 20)
    sent = []
    for i in range(50):  # months of batches, squeezed: one every 10 s
        old.write([outcome(T + 10 * i)], [None])
        seq = old.seal("n", T + 10 * i, 100, 100)
        assert seq is not None
        old.ack(seq, T + 10 * i)
        sent.append(seq)
    assert sent == list(range(sent[0], sent[0] + 50))  # one after another
    new = TelemetryBuffer(tmp_path / "new.db", 64 << 20)  # the replacement, a minute after the old one's last
    new.write([outcome(T + 560)], [None])
    assert (new.seal("n", T + 560, 100, 100) or 0) > sent[-1]


def test_budget_drops_low_priority_first_and_counts_it(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", 256 << 10)
    big = "x" * 400
    for i in range(40):
        batch = [Outcome(T + i, "m", "1", "v", 10, 0, 1, True, "ok", summary=big) for _ in range(50)] + [
            Outcome(T + i, "m", "1", "v", 10, 0, 1, False, "internal", summary=big)
        ]
        buffer.write(batch, [PRIORITY_SAMPLED] * 50 + [PRIORITY_ERROR])
    buffer.enforce_budget()
    stats = buffer.stats()
    assert stats.disk_bytes <= 256 << 10
    assert stats.dropped["events_sampled"] > 0
    assert stats.dropped["events_error"] == 0  # errors outlive samples
    seq = buffer.seal("n", T, 100_000, 100_000)
    assert seq is not None
    pending = buffer.read_outbox()
    assert pending is not None
    batch = decode_batch(pending[1])
    assert batch.dropped["events_sampled"] == stats.dropped["events_sampled"]  # drops are reported, not silent
    assert sum(m.requests for m in batch.minutes) == 40 * 51  # aggregates were never dropped
    assert buffer.stats().dropped["events_sampled"] == 0  # counters restart once reported


def test_recorder_resolves_after_the_commit(tmp_path: Path) -> None:
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0), rng=random.Random(1))

    async def many() -> None:
        await asyncio.gather(*(recorder.record(outcome(T + i % 60)) for i in range(500)))

    asyncio.run(many())
    # A second connection sees every outcome: each was committed before its record() returned.
    other = TelemetryBuffer(tmp_path / "t.db", 64 << 20)
    assert other.stats().minutes >= 1
    assert other.seal("n", T, 10_000, 10_000) == first_sequence(T)
    pending = other.read_outbox()
    assert pending is not None
    assert sum(m.requests for m in decode_batch(pending[1]).minutes) == 500
    recorder.close()


def test_shed_outcomes_of_the_last_loop_turn_are_kept_when_the_recorder_closes(tmp_path: Path) -> None:
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))

    async def shed_then_stop() -> None:
        for i in range(3):  # 503s, recorded without waiting; their turn's hand-over has not run yet
            recorder.record_nowait(outcome(T + i, ok=False))
        recorder.close()

    asyncio.run(shed_then_stop())
    other = TelemetryBuffer(tmp_path / "t.db", 64 << 20)
    assert other.seal("n", T, 10_000, 10_000) == first_sequence(T)
    pending = other.read_outbox()
    assert pending is not None
    assert sum(m.errors for m in decode_batch(pending[1]).minutes) == 3


def test_the_drift_of_versions_no_longer_served_is_forgotten(tmp_path: Path) -> None:
    """A node runs for months through many versions: the recorder keeps the drift references and windows of the
    version it serves and of those with counts in the last `drift_window_minutes`, not of every version ever."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0, drift_window_minutes=10))
    reference = DriftReference(tensor="X", kind="input", edges=(0.5,), counts=(10, 10))

    async def serve(version: str, minute: int) -> None:
        recorder.set_references("digits", version, (reference,))
        recorder.add_drift("digits", version, [("X", [1, 2])], ts=T + minute * 60)
        await recorder.record(replace(outcome(T + minute * 60), version=version))

    for index in range(30):  # a new version every minute for half an hour
        asyncio.run(serve(str(index), index))
    psi = recorder.drift_psi()
    assert {version for _, version, _ in psi} == {str(index) for index in range(20, 30)}  # the last ten minutes'
    assert recorder.references("digits", "29") == (reference,)
    assert recorder.references("digits", "19") == ()
    # a version without drift counts (its model has no references, or no traffic) is kept only while current
    recorder.set_references("other", "1", (reference,))
    recorder.set_references("other", "2", (reference,))
    assert recorder.references("other", "2") == (reference,)
    assert recorder.references("other", "1") == ()
    recorder.close()


def test_drift_is_summed_in_memory_and_written_within_seconds_before_a_seal_and_at_close(tmp_path: Path) -> None:
    """Drift is kept per minute, so the recorder sums each batch's counts in memory instead of writing them with
    every outcome: `drift_psi` shows them at once, the writer writes them within DRIFT_WRITE_S even when no
    request follows, a batch sealed for upload holds every count made before the seal, and closing writes the
    rest."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))
    reference = DriftReference(tensor="X", kind="input", edges=(0.5,), counts=(10, 30))
    recorder.set_references("digits", "1", (reference,))
    now = time.time()
    recorder.add_drift("digits", "1", [("X", [3, 1])], ts=now)
    recorder.add_drift("digits", "1", [("X", [2, 14])], ts=now)
    assert recorder.drift_psi() == {("digits", "1", "X"): pytest.approx(0.0)}  # 5:15, as the reference's 10:30
    other = sqlite3.connect(tmp_path / "t.db")
    rows: list[tuple[str, str]] = []
    deadline = time.monotonic() + 10 * DRIFT_WRITE_S
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = other.execute("SELECT tensor, counts FROM drift").fetchall()
    assert rows == [("X", "[5, 15]")]
    assert recorder.drift_psi() == {("digits", "1", "X"): pytest.approx(0.0)}  # counted once, written or not
    recorder.add_drift("digits", "1", [("X", [1, 0])], ts=now)
    assert recorder.call(lambda: recorder.buffer.seal("n", now, 1000, 1000)) is not None
    pending = recorder.call(recorder.buffer.read_outbox)
    assert pending is not None
    assert [(d.tensor, d.counts) for d in decode_batch(pending[1]).drift] == [("X", [6, 15])]
    recorder.add_drift("digits", "1", [("X", [7, 7])], ts=now)
    recorder.close()
    assert other.execute("SELECT tensor, counts FROM drift").fetchall() == [("X", "[7, 7]")]
    other.close()


def test_uploader_acks_in_order_and_keeps_what_failed(tmp_path: Path) -> None:
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", batch_max_minutes=1))
    asyncio.run(recorder.record(outcome(T)))
    asyncio.run(recorder.record(outcome(T + 120)))
    sent: list[int] = []
    fail = [True]

    def send(seq: int, payload: bytes) -> bool:
        if fail[0]:
            raise TransportError("server away")
        sent.append(seq)
        return True

    uploader = TelemetryUploader(recorder, send, lambda: "n", clock=lambda: T)
    with pytest.raises(TransportError):
        uploader.drain()
    assert recorder.stats().outbox == 1
    fail[0] = False
    assert uploader.drain() == 2
    assert sent == [first_sequence(T), first_sequence(T) + 1]
    assert recorder.stats().outbox == 0
    recorder.close()


def test_no_statement_on_the_recorders_connection_runs_on_the_uploaders_thread(tmp_path: Path) -> None:
    """The uploader's thread once read the outbox on the recorder's connection itself. Its open read held a
    snapshot inside the writer's next BEGIN IMMEDIATE, which then failed at once ("database is locked") whenever
    another serving process had committed since: those outcomes were lost (CI, two serving processes). The
    connection is used by the writer thread and by event loops committing their outcomes, one at a time."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db"))
    writer = recorder.call(threading.get_ident)
    threads: set[int] = set()
    recorder.call(lambda: recorder.buffer._db.set_trace_callback(lambda sql: threads.add(threading.get_ident())))

    loop_thread = threading.Thread(target=asyncio.run, args=(recorder.record(outcome(T)),))  # not the uploader's
    loop_thread.start()
    loop_thread.join()
    uploader = TelemetryUploader(recorder, lambda seq, payload: True, lambda: "n", clock=lambda: T)
    assert uploader.drain() == 1
    assert recorder.stats().outbox == 0
    assert threads == {writer, loop_thread.ident}
    recorder.close()


def test_two_serving_processes_and_the_uploader_lose_no_outcome(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two recorders on one file (two serving processes: two connections) write while the uploader drains
    without pause; the old code lost outcomes to "database is locked" a few times a second here."""
    config = TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0)
    recorders = [TelemetryRecorder(config), TelemetryRecorder(config)]
    stop = threading.Event()
    written = [0, 0]

    def write(index: int) -> None:
        while not stop.is_set():
            recorders[index].record_nowait(outcome(T))
            written[index] += 1
            time.sleep(0.0005)

    writers = [threading.Thread(target=write, args=(index,)) for index in (0, 1)]
    for thread in writers:
        thread.start()
    received: list[int] = []

    def send(seq: int, payload: bytes) -> bool:
        received.append(sum(m.requests for m in decode_batch(payload).minutes))
        return True

    uploader = TelemetryUploader(recorders[0], send, lambda: "n", clock=lambda: T)
    with caplog.at_level(logging.ERROR, logger="strata.agent.telemetry"):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            uploader.drain()
        stop.set()
        for thread in writers:
            thread.join()
        for recorder in recorders:
            recorder.call(lambda: None)  # every outcome handed over so far is committed
        uploader.drain()
    assert [r.message for r in caplog.records] == []
    assert sum(received) == sum(written)
    for recorder in recorders:
        recorder.close()


def test_a_batch_the_server_refuses_for_good_is_dropped_and_counted(tmp_path: Path) -> None:
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db"))
    asyncio.run(recorder.record(outcome(T)))
    uploader = TelemetryUploader(recorder, lambda seq, payload: False, lambda: "n", clock=lambda: T)
    assert uploader.drain() == 1
    assert recorder.stats().dropped["rejected"] == 1
    recorder.close()


def test_drift_rows_past_what_one_batch_may_hold_go_in_the_next_batch(tmp_path: Path) -> None:
    """The control plane refuses a batch of more than MAX_BATCH_DRIFT drift rows (a node's claim, parsed at its
    cost), so a node back from a long outage seals its drift in batches of at most that many, losing none."""
    buffer = TelemetryBuffer(tmp_path / "t.db", 64 << 20)
    tensors = 101
    minutes = MAX_BATCH_DRIFT // tensors + 2  # 20,200 rows
    outcomes = [outcome(T + 60 * m) for m in range(minutes)]
    drift = {("digits", "1", minute_of(T + 60 * m), f"X{t}"): [1, 2] for m in range(minutes) for t in range(tensors)}
    buffer.write(outcomes, [None] * len(outcomes), drift)
    seen, seq = [], buffer.seal("n", T + 60 * minutes, 1000, 1000)
    while seq is not None:
        pending = buffer.read_outbox()
        assert pending is not None
        batch = decode_batch(pending[1])  # what the control plane checks
        seen.append(len(batch.drift))
        buffer.ack(pending[0], T + 60 * minutes)
        seq = buffer.seal("n", T + 60 * minutes, 1000, 1000)
    assert seen == [MAX_BATCH_DRIFT, tensors * minutes - MAX_BATCH_DRIFT]
