"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temporary folder, one postmaster on a free
loopback port, databases made by cloning a template, everything gone when it stops.

The binaries are Debian's (`/usr/lib/postgresql/<version>/bin`, from `tools/install-pg-deps`), or whatever
`STRATA_PG_BIN` names, or `initdb` on the PATH. PostgreSQL refuses to run as root: under root the cluster belongs to
the `postgres` user the Debian package creates. The postmaster is this process's child and gets SIGQUIT (an
immediate shutdown) when this process dies, however it dies, so no cluster outlives the tests that made it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from strata.core.errors import StrataError

# How long a fresh cluster may take to accept connections.
START_TIMEOUT_S: Final = 30.0
SUPERUSER: Final = "strata"
# Settings for a cluster whose data may be lost: no fsync, small memory, quick checkpoints.
_TEST_SETTINGS: Final = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "log_min_messages": "warning",
}
_PR_SET_PDEATHSIG: Final = 1


class PostgresUnavailable(StrataError):
    """A PostgreSQL cluster could not be made or started here; the message says why and what to install."""

    code = "postgres_unavailable"


def find_bin_dir() -> Path:
    """The folder holding `initdb`, `postgres` and `psql`: `STRATA_PG_BIN`, else Debian's newest, else the PATH's.

    Raises:
        PostgresUnavailable: none is installed.
    """
    if os.environ.get("STRATA_PG_BIN"):  # an explicit choice: no fallback behind the operator's back
        chosen = Path(os.environ["STRATA_PG_BIN"])
        if (chosen / "initdb").is_file() and (chosen / "postgres").is_file():
            return chosen
        raise PostgresUnavailable(f"STRATA_PG_BIN={chosen} has no initdb and postgres")
    candidates: list[Path] = []
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version_key(p.parent.name))
    candidates.extend(reversed(debian))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, postgres) in /usr/lib/postgresql/*/bin, $STRATA_PG_BIN or the PATH; "
        "install Debian's postgresql package: tools/install-pg-deps"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _owner() -> pwd.struct_passwd | None:
    """The user the cluster runs as: None for this process's own user, `postgres` when this process is root.

    Raises:
        PostgresUnavailable: running as root and there is no `postgres` user.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "PostgreSQL does not run as root and there is no 'postgres' user to run it as; "
            "Debian's postgresql package creates one: tools/install-pg-deps"
        ) from None


def _child_setup(owner: pwd.struct_passwd | None, die_with_parent: bool) -> Callable[[], None]:
    """What a child runs before exec: become `owner`, then ask for SIGQUIT when this process dies (the death signal
    is cleared by a change of user, so it is set after)."""

    def setup() -> None:
        if owner is not None:
            os.setgroups([])
            os.setgid(owner.pw_gid)
            os.setuid(owner.pw_uid)
        if die_with_parent:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)

    return setup


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresCluster:
    """One running cluster: its superuser connects over TCP on 127.0.0.1 with a password (scram-sha-256), or over
    the unix socket in its folder without one. `stop()` (or leaving the `with` block) ends it and deletes it."""

    def __init__(self, root: Path, bin_dir: Path, owner: pwd.struct_passwd | None) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.data_dir = root / "data"
        self.log_path = root / "postgres.log"
        self.password = secrets.token_hex(16)
        self.port = 0
        self._owner = owner
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: Any = None  # a psycopg connection, once `execute` needs one

    @classmethod
    def start(cls, parent: Path | None = None) -> PostgresCluster:
        """initdb a new cluster in a fresh folder under `parent` (the system's temporary folder by default) and
        start it on a free loopback port.

        Raises:
            PostgresUnavailable: the binaries or the `postgres` user are missing, or initdb or the server failed
                (with the end of its log).
        """
        bin_dir = find_bin_dir()
        owner = _owner()
        root = Path(tempfile.mkdtemp(prefix="strata-pg-", dir=parent))
        cluster = cls(root, bin_dir, owner)
        try:
            if owner is not None:
                os.chown(root, owner.pw_uid, owner.pw_gid)
            cluster._initdb()
            cluster._run_postmaster()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self, argv: list[str], what: str) -> None:
        try:
            done = subprocess.run(
                argv,
                cwd=self.root,
                capture_output=True,
                timeout=120,
                preexec_fn=_child_setup(self._owner, die_with_parent=True),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{what} failed: {exc}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()[-2000:]
            raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {output}")

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._owner is not None:
            os.chown(pwfile, self._owner.pw_uid, self._owner.pw_gid)
        try:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "--pgdata",
                    str(self.data_dir),
                    "--username",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop the postmaster the hard way (every connection dropped, as a crash or a failover does) and start it
        again on the same port with the same data.

        Raises:
            PostgresUnavailable: it did not come back (with the end of its log).
        """
        self._kill()
        self._run_postmaster(port=self.port)

    def _run_postmaster(self, port: int | None = None) -> None:
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between choosing it and binding it
            self.port = port or _free_port()
            argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
            argv += ["-k", str(self.root)]
            for name, value in _TEST_SETTINGS.items():
                argv += ["-c", f"{name}={value}"]
            log = self.log_path.open("ab")
            try:
                self._process = subprocess.Popen(
                    argv,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup(self._owner, die_with_parent=True),
                )
            except OSError as exc:
                raise PostgresUnavailable(f"cannot run {argv[0]}: {exc}") from exc
            finally:
                log.close()
            if self._wait_ready():
                return
            last_error = self._log_tail()
            self._kill()
        raise PostgresUnavailable(f"PostgreSQL did not start: {last_error}")

    def _wait_ready(self) -> bool:
        """True once the postmaster says it accepts connections; False when it exited or took too long."""
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-2000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)  # immediate shutdown: nothing here is worth keeping
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the postmaster (immediate shutdown) and delete the cluster's folder."""
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the postmaster is up."""
        return self._process is not None and self._process.poll() is None

    def url(self, database: str = "postgres", *, driver: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL of `database` for the superuser over TCP, password included."""
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql over the unix socket as the superuser; its output.

        Raises:
            PostgresUnavailable: psql failed (the message has its error).
        """
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"psql failed: {exc}") from exc
        if done.returncode != 0:
            raise PostgresUnavailable(f"psql failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()

    def execute(self, sql: str) -> None:
        """Run one statement as the superuser on database `postgres`, outside a transaction (CREATE DATABASE may
        not run in one), over a connection kept open through the unix socket (psycopg, from `strata[postgres]`).

        Raises:
            PostgresUnavailable: psycopg is not installed, or the statement failed (the message has its error).
        """
        try:
            import psycopg
        except ImportError as exc:
            raise PostgresUnavailable(f"psycopg is not installed: pip install 'strata[postgres]' ({exc})") from exc
        try:
            if self._admin is None or self._admin.closed:
                self._admin = psycopg.connect(
                    host=str(self.root), port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
                )
            self._admin.execute(sql.encode())
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"{sql.split(' (')[0]} failed: {exc}") from exc

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database `name` (a file copy of `template` when given: a few hundredths of a second); its
        SQLAlchemy URL.

        Raises:
            PostgresUnavailable: the database could not be created (a name taken, a template in use).
        """
        sql = f'CREATE DATABASE "{_identifier(name)}"'
        if template is not None:
            # FILE_COPY: copying a small template's files beats WAL-logging every block (PostgreSQL 15's default).
            sql += f' TEMPLATE "{_identifier(template)}" STRATEGY FILE_COPY'
        self.execute(sql)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, closing any connection still open to it.

        Raises:
            PostgresUnavailable: it could not be dropped.
        """
        self.execute(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')


def _identifier(name: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name


@contextlib.contextmanager
def postgres_cluster(parent: Path | None = None) -> Iterator[PostgresCluster]:
    """A started cluster for the length of the block.

    Raises:
        PostgresUnavailable: it could not be started (the reason is in the message).
    """
    cluster = PostgresCluster.start(parent)
    try:
        yield cluster
    finally:
        cluster.stop()
