"""Short-lived helper children: the agent keeps `cryptography`, tpm2-pytss, cel-python and python-tuf out of its own
process (its memory budget) and runs the key, signing, TPM, policy-rule and supply-chain work as
`python [-OO] -m <module>` children instead, all through `run_child`.

A child gets its request on stdin and answers on stdout, within a time limit and a size limit on what it writes;
one that runs past its time or writes more than it may is killed. Only the end of its stderr is kept, for the error
message.

Most helpers import cryptography (about 33 MB resident; the supply-chain verifier about 72 MB), and so does the
vault worker, which stays up to a minute after its last call. `make_room` runs before every helper starts: the agent
stops its vault worker there (it starts again on its next call), so the process tree holds the agent and at most
one helper, and peaks at the agent plus its largest helper rather than their sum. The helpers run one at a time
from the agent's loop thread; on a relaying node a relay request may start the vault worker again meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Final

from strata.core.errors import ConfigError

MAX_OUTPUT_BYTES: Final = 4 << 20
"""The most a helper child may write to stdout: its answers are a key, a CSR, a signature or a JSON verdict."""
STDERR_TAIL_BYTES: Final = 64 << 10
"""How much of the end of a child's stderr is kept (its last line goes into the error message)."""
_READ_BYTES: Final = 1 << 16

_make_room: Callable[[], None] | None = None


def set_make_room(stop: Callable[[], None] | None) -> None:
    """Have `stop` run before each helper child starts (one agent per process: the last call wins)."""
    global _make_room
    _make_room = stop


def make_room() -> None:
    """Stop what `set_make_room` named; `run_child` calls it before it starts a child."""
    if _make_room is not None:
        _make_room()


class ChildFailed(ConfigError):
    """A helper child could not start, ran past its time, or wrote more than it may (it was killed).

    `reason` says which without naming the helper, for callers that word the error in their own terms.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Finished:
    """A helper child that ran to its end: its exit status, its stdout, and the end of its stderr."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def last_words(self) -> str | None:
        """Its last line of stderr; None when it wrote none."""
        lines = self.stderr.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else None

    def failure(self, silent: str | None = None) -> str:
        """Why it failed, for an error message: its last line of stderr or, when it wrote none, `silent` (by
        default its exit status); `killed by SIGNAL` first when a signal ended it."""
        words = self.last_words
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}" + (f" ({words})" if words else "")
        return words or silent or f"exit status {self.returncode}"


def run_child(
    module: str,
    args: Sequence[str] = (),
    stdin: bytes = b"",
    *,
    timeout_s: float,
    what: str,
    python: str = sys.executable,
    optimize: bool = True,
    max_output: int = MAX_OUTPUT_BYTES,
) -> Finished:
    """Run `PYTHON [-OO] -m MODULE ARGS` with `stdin`, whatever its exit status (see `Finished.failure`).

    Raises:
        ChildFailed: it could not start, ran past `timeout_s`, or wrote more than `max_output` bytes to stdout
            (then it is killed).
    """
    argv = [python, *(["-OO"] if optimize else []), "-m", module, *args]
    make_room()
    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise ChildFailed(f"{what} could not start: {exc}", str(exc)) from exc
    # All three are pipes, as asked above.
    assert child.stdin is not None
    assert child.stdout is not None
    assert child.stderr is not None
    out, err = bytearray(), bytearray()
    overflow = threading.Event()

    def feed(stream: IO[bytes]) -> None:
        # A child that exits or closes its stdin without reading it all breaks the pipe: its exit status says why.
        with contextlib.suppress(OSError), stream:
            stream.write(stdin)

    def collect(stream: IO[bytes], into: bytearray, limit: int, tail: bool) -> None:
        while chunk := os.read(stream.fileno(), _READ_BYTES):
            into += chunk
            if tail:
                del into[:-limit]
            elif len(into) > limit:
                overflow.set()
                child.kill()
                break
        stream.close()

    threads = [
        threading.Thread(target=feed, args=(child.stdin,), daemon=True),
        threading.Thread(target=collect, args=(child.stdout, out, max_output, False), daemon=True),
        threading.Thread(target=collect, args=(child.stderr, err, STDERR_TAIL_BYTES, True), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        returncode = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        child.kill()
        child.wait()
        reason = f"it did not finish in {timeout_s:g} s"
        raise ChildFailed(f"{what} did not finish in {timeout_s:g} s", reason) from exc
    finally:
        if child.returncode is None:  # interrupted while waiting (KeyboardInterrupt, SystemExit): no orphan left
            child.kill()
            child.wait()
        for thread in threads:
            # The pipes close when the child exits; a grandchild that holds them open is not waited for.
            thread.join(timeout=5.0)
    if overflow.is_set():
        reason = f"it wrote more than {max_output} bytes"
        raise ChildFailed(f"{what} wrote more than {max_output} bytes to stdout", reason)
    return Finished(returncode, bytes(out), bytes(err))


def run_module(module: str, args: Sequence[str], stdin: bytes = b"", *, timeout_s: float, what: str) -> bytes:
    """Run `python -OO -m MODULE ARGS` with `stdin`; what it wrote to stdout.

    Raises:
        ConfigError: it could not start, ran past `timeout_s`, wrote too much (`ChildFailed`), or failed (its last
            line of stderr is kept, or that a signal killed it).
    """
    done = run_child(module, args, stdin, timeout_s=timeout_s, what=what)
    if done.returncode != 0:
        raise ConfigError(f"{what} failed: {done.failure()}")
    return done.stdout
