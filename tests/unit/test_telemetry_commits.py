"""Where the telemetry recorder commits: on the event loop when that costs no wait, else on its writer thread;
the loop never waits for the buffer, and every outcome is counted once either way. Real SQLite files, real
threads, a real second connection holding the write lock."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from strata.agent.telemetry import (
    MAINTAIN_EVERY,
    WAL_CHECKPOINT_BYTES,
    WAL_KEEP_BYTES,
    Outcome,
    TelemetryBuffer,
    TelemetryConfig,
    TelemetryRecorder,
    first_sequence,
)
from strata.core.telemetry import PRIORITY_ERROR, PRIORITY_SLOW, TelemetryBatch, decode_batch

T = 1_800_000_000.0


def outcome(ok: bool = True, latency_us: int = 800, ts: float = T) -> Outcome:
    return Outcome(
        ts=ts, model="digits", version="1", variant="cpu-generic-fp32", latency_us=latency_us, queue_us=10,
        batch=2, ok=ok, status="ok" if ok else "internal",
    )  # fmt: skip


class Statements:
    """Every statement run on the recorder's connection, with the thread that ran it (SQLite's trace hook)."""

    def __init__(self, recorder: TelemetryRecorder) -> None:
        self.seen: list[tuple[int, str]] = []
        self.writer = recorder.call(threading.get_ident)
        recorder.call(lambda: recorder.buffer._db.set_trace_callback(self._trace))

    def _trace(self, sql: str) -> None:
        self.seen.append((threading.get_ident(), sql))

    def threads(self, word: str) -> set[int]:
        return {thread for thread, sql in self.seen if word in sql}

    def threads_of(self, word: str) -> list[int]:
        """The thread of each statement holding `word`, in order."""
        return [thread for thread, sql in self.seen if word in sql]


def batch_of(path: Path) -> TelemetryBatch:
    """Everything in the buffer, sealed by a second connection."""
    other = TelemetryBuffer(path, 64 << 20)
    assert other.seal("n", T, 10_000, 10_000) == first_sequence(T)
    pending = other.read_outbox()
    assert pending is not None
    other.close()
    return decode_batch(pending[1])


def sealed(path: Path) -> tuple[list[tuple[int, int, int]], list[int]]:
    """What a second connection finds in the buffer: the minutes (requests, errors, items) and the events'
    priorities."""
    batch = batch_of(path)
    return [(m.requests, m.errors, m.items) for m in batch.minutes], sorted(e.priority for e in batch.events)


async def ticking_while(work: Callable[[], Awaitable[None]], then: Callable[[], object], gap_s: float) -> float:
    """Run `work` on the loop while a ticker measures the loop's longest gap; `then` runs in a thread after
    `gap_s` (releasing what holds the work up). Returns the longest gap between ticks."""
    longest = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal longest
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    releaser = threading.Timer(gap_s, then)
    releaser.start()
    await work()
    done.set()
    await ticker
    releaser.join()
    return longest


def test_an_event_loop_commits_its_own_outcomes_counted_by_minute_and_kept_as_events_by_priority(
    tmp_path: Path,
) -> None:
    """The outcomes of a turn are committed by the loop itself (no hand-over to the writer and back), the ordinary
    ones only counted in their minute's row, the errors, slow ones and samples kept as events too."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0, slow_us=5_000))
    statements = Statements(recorder)

    async def serve() -> threading.Thread:
        await asyncio.gather(
            *(recorder.record(outcome()) for _ in range(40)),
            recorder.record(outcome(latency_us=9_000)),
            recorder.record(outcome(ok=False)),
        )
        return threading.current_thread()

    loop_thread = asyncio.run(serve())
    assert statements.threads("INSERT INTO minutes") == {loop_thread.ident}
    assert statements.threads("INSERT INTO events") == {loop_thread.ident}
    assert sealed(tmp_path / "t.db") == ([(42, 1, 84)], sorted([PRIORITY_SLOW, PRIORITY_ERROR]))
    recorder.close()


def test_a_loop_never_waits_for_another_serving_processs_write_and_its_outcomes_are_committed_once(
    tmp_path: Path,
) -> None:
    """Another connection (another serving process) holds the write lock for a second: the loop goes on
    (its answers wait, it does not), the writer thread commits the outcomes once the lock is free, each once."""
    path = tmp_path / "t.db"
    recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=0.0))
    statements = Statements(recorder)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    answered: list[str] = []

    async def serve() -> float:
        async def record() -> None:
            # a batch's answers, each resolved with its answer once committed (one of them abandoned meanwhile)
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in range(3)]
            answers = [(future, f"answer {i}", 800, 10, 2, None) for i, future in enumerate(futures)]
            recorder.record_answers("digits", "1", "cpu-generic-fp32", T, answers)
            await asyncio.sleep(0.3)
            assert not any(future.done() for future in futures)  # not before the commit
            futures[1].cancel()
            answered.extend(await asyncio.gather(futures[0], futures[2]))

        async def all_of_them() -> None:
            await asyncio.gather(
                record(), *(recorder.record(outcome()) for _ in range(2)), recorder.record(outcome(ok=False))
            )

        return await ticking_while(all_of_them, lambda: other.execute("COMMIT"), 1.0)

    longest = asyncio.run(serve())
    assert longest < 0.5  # with the commit on the loop waiting out the lock, the loop stopped for 1 s
    assert answered == ["answer 0", "answer 2"]
    assert statements.threads("INSERT INTO minutes") == {statements.writer}
    assert sealed(path) == ([(6, 1, 12)], [PRIORITY_ERROR])  # the abandoned request too: the model answered it
    other.close()
    recorder.close()


def test_a_batchs_answers_recorded_together_are_what_they_are_recorded_one_by_one(tmp_path: Path) -> None:
    """`record_answers` counts a batch's answered requests straight into their minute's row and keeps the same
    ones as events (slow, sampled: the same draws in the same order) as recording each alone does."""
    latencies = [800, 9_000, 1_200, 300, 12_000, 700, 650, 80_000] * 25
    one, together = (
        TelemetryRecorder(TelemetryConfig(path=tmp_path / name, sample_rate=0.3, slow_us=5_000), rng=random.Random(7))
        for name in ("one.db", "together.db")
    )

    async def serve() -> list[str]:
        for latency in latencies:
            await one.record(replace(outcome(latency_us=latency), summary="{}"))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in latencies]
        answers = [
            (f, str(i), latency, 10, 2, lambda: "{}")
            for i, (f, latency) in enumerate(zip(futures, latencies, strict=True))
        ]
        together.record_answers("digits", "1", "cpu-generic-fp32", T, answers)
        return list(await asyncio.gather(*futures))

    assert asyncio.run(serve()) == [str(i) for i in range(len(latencies))]
    one.close()
    together.close()
    first, second = batch_of(tmp_path / "one.db"), batch_of(tmp_path / "together.db")
    assert first.minutes == second.minutes
    assert first.minutes[0].requests == len(latencies)
    assert [(e.latency_us, e.priority) for e in first.events] == [(e.latency_us, e.priority) for e in second.events]
    assert 50 < len(second.events) < len(latencies)  # the slow ones and about a third of the rest


def test_a_loop_never_waits_for_the_writer_thread_and_the_turns_it_commits_together_count_once(
    tmp_path: Path,
) -> None:
    """While the writer thread holds the buffer (sealing a batch for upload, say), the loop's turns go to it;
    it commits the turns queued meanwhile together, each outcome once."""
    path = tmp_path / "t.db"
    recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=0.0))
    statements = Statements(recorder)
    holds, release = threading.Event(), threading.Event()

    def hold() -> None:
        holds.set()
        release.wait(10)

    holding = threading.Thread(target=recorder.call, args=(hold,))
    holding.start()
    assert holds.wait(10)  # the writer runs the command, holding the buffer

    async def serve() -> float:
        async def turns() -> None:
            waiting = []
            for minute in range(3):  # three turns
                waiting += [asyncio.ensure_future(recorder.record(outcome(ts=T + 60 * minute))) for _ in range(4)]
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            waiting += [asyncio.ensure_future(recorder.record(outcome(ok=False, ts=T + 60))) for _ in range(2)]
            await asyncio.gather(*waiting)

        return await ticking_while(turns, release.set, 1.0)

    longest = asyncio.run(serve())
    holding.join()
    assert longest < 0.5
    assert statements.threads("INSERT INTO minutes") == {statements.writer}
    assert [sql for thread, sql in statements.seen if "BEGIN" in sql] == ["BEGIN IMMEDIATE"]  # one commit of all
    assert sealed(path) == ([(4, 0, 8), (6, 2, 12), (4, 0, 8)], [PRIORITY_ERROR] * 2)
    recorder.close()


def test_after_a_slow_commit_on_the_loop_the_writer_thread_commits_for_a_while(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk stalling its writes must not stall the loop twice: a commit on the loop slower than
    `inline_slow_s` (here any) sends the next ones to the writer thread, with a warning."""
    recorder = TelemetryRecorder(TelemetryConfig(path=tmp_path / "t.db", sample_rate=0.0))
    recorder.inline_slow_s = 0.0
    statements = Statements(recorder)

    async def serve() -> int | None:
        await recorder.record(outcome())
        first = statements.seen[-1][0]
        await recorder.record(outcome())
        await recorder.record(outcome())
        return first

    with caplog.at_level(logging.WARNING, logger="strata.agent.telemetry"):
        first = asyncio.run(serve())
    assert first != statements.writer
    assert statements.threads("INSERT INTO minutes") == {first, statements.writer}
    assert [thread for thread, sql in statements.seen if "INSERT INTO minutes" in sql][1:] == [statements.writer] * 2
    assert "the writer thread commits" in caplog.text
    assert sealed(tmp_path / "t.db")[0] == [(3, 0, 6)]
    recorder.close()


def test_the_log_of_commits_made_on_the_loop_is_checkpointed_by_the_writer_thread(tmp_path: Path) -> None:
    """A checkpoint copies the log into the file and syncs both: the writer thread's work, never a loop's (SQLite's
    automatic checkpoint would run it in whichever commit crossed the limit). The log stays short all the same."""
    path = tmp_path / "t.db"
    recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=1.0))  # every outcome an event: a big log
    statements = Statements(recorder)
    largest = 0

    async def serve() -> None:
        nonlocal largest
        for index in range(600):
            await asyncio.gather(*(recorder.record(outcome(ts=T + index)) for _ in range(20)))
            largest = max(largest, Path(f"{path}-wal").stat().st_size)

    asyncio.run(serve())
    assert statements.threads("wal_checkpoint") == {statements.writer}
    assert statements.threads("INSERT INTO events") - {statements.writer}  # most committed on the loop
    assert recorder.call(lambda: recorder.buffer._db.execute("PRAGMA wal_autocheckpoint").fetchone()) == (0,)
    assert largest < 2 * WAL_CHECKPOINT_BYTES
    recorder.close()
    minutes, _ = sealed(path)
    assert sum(requests for requests, _, _ in minutes) == 12_000


def test_a_log_once_large_is_not_checkpointed_at_every_maintenance(tmp_path: Path) -> None:
    """A checkpoint leaves the log's file at WAL_KEEP_BYTES, not empty, so its size says how much the log holds only
    above that: judged by a size under it, every maintenance after the log first grew large checkpointed (two syncs
    each), and the commit on the loop that followed started the log over and synced it. After a checkpoint the writer
    makes that first write itself."""
    path = tmp_path / "t.db"
    recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=1.0))
    statements = Statements(recorder)

    async def serve(turns: int, per_turn: int) -> None:
        for index in range(turns):
            await asyncio.gather(*(recorder.record(outcome(ts=T + index)) for _ in range(per_turn)))

    asyncio.run(serve(600, 20))  # a large log: checkpointed
    checkpoints = len(statements.threads_of("wal_checkpoint"))
    assert checkpoints >= 1
    asyncio.run(serve(640, 1))  # ten maintenances' worth of small commits: up to 4 MB of log
    # the old sizes checkpointed at (nearly) each of the ten; the log may legitimately cross 4 MiB once or twice
    assert len(statements.threads_of("wal_checkpoint")) - checkpoints <= 3
    assert WAL_KEEP_BYTES < WAL_CHECKPOINT_BYTES
    # and the writer went on keeping the buffer in its budget every MAINTAIN_EVERY writes, though the loops
    # committed nearly all of them
    # (each maintenance runs once the writer takes up a loop's request: a little after the 64th write)
    writes = len(statements.threads_of("COMMIT"))
    assert len(statements.threads_of("page_count")) >= writes // (2 * MAINTAIN_EVERY)
    assert statements.threads("'checkpoints'") == {statements.writer}  # the write after each, on the writer thread
    recorder.close()


def test_a_commit_on_the_loop_that_fails_counts_its_outcomes_lost_once_and_still_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails (here: the table gone, as a damaged file would) must not keep answers back nor count
    anything twice: the answers go out, the outcomes are counted lost, and the count is written with the next
    commit that succeeds."""
    path = tmp_path / "t.db"
    recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=0.0))
    other = sqlite3.connect(path)
    other.execute("ALTER TABLE minutes RENAME TO away")
    other.commit()

    async def serve(count: int) -> list[str]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(count)]
        recorder.record_answers("digits", "1", "cpu-generic-fp32", T, [(f, "ok", 800, 10, 2, None) for f in futures])
        return list(await asyncio.gather(*futures))

    with caplog.at_level(logging.ERROR, logger="strata.agent.telemetry"):
        assert asyncio.run(serve(3)) == ["ok"] * 3
    assert "3 outcomes and 0 drift counts not recorded" in caplog.text
    other.execute("ALTER TABLE away RENAME TO minutes")
    other.commit()
    other.close()
    assert asyncio.run(serve(2)) == ["ok"] * 2
    recorder.close()
    batch = batch_of(path)
    assert [m.requests for m in batch.minutes] == [2]
    assert batch.dropped.get("lost") == 3


def test_a_turn_of_shed_requests_only_is_committed_by_the_writer(tmp_path: Path) -> None:
    """Nobody waits for the commit of a shed request's outcome (its 503 went out at once): an overloaded loop leaves
    those to the writer thread."""
    path = tmp_path / "t.db"
    recorder = TelemetryRecorder(TelemetryConfig(path=path, sample_rate=0.0))
    statements = Statements(recorder)

    async def shed() -> None:
        for _ in range(3):
            recorder.record_nowait(replace(outcome(ok=False), status="rejected"))
        await asyncio.sleep(0.01)

    asyncio.run(shed())
    recorder.call(lambda: None)  # what was handed over is committed
    assert statements.threads("INSERT INTO minutes") == {statements.writer}
    recorder.close()
    assert sealed(path)[0] == [(3, 3, 6)]
