"""PostgreSQL, Redis and RabbitMQ servers a test owns: its own ports, its own files.

Fault tests restart and kill servers. The machine's shared servers (5432,
6379, 5672) serve other people's tests at the same time, so a fault test
starts private instances in a temporary directory and restarts or kills only
those. Every instance is stopped by :meth:`stop` (also after a failure, when
used as a context manager); nothing here touches a process it did not start.

Used by ``tests/distributed/test_soak.py`` and ``scripts/soak``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "PrivatePostgres",
    "PrivateRabbitMQ",
    "PrivateRedis",
    "ServiceUnavailable",
    "free_port",
    "port_open",
]


class ServiceUnavailable(RuntimeError):
    """A private server cannot be run on this machine (binary missing, ...)."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, held together so the OS cannot hand out one twice."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def _wait(what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            raise RuntimeError(f"{what} exited while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f}s")
        time.sleep(0.1)


def _kill_group(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Signal the session ``proc`` leads (it was started with ``start_new_session``)."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _end(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left; reap the leader."""
    if proc is None:
        return
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    _kill_group(proc, signal.SIGKILL)  # children a dead leader left behind
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


class _Service:
    name = "service"

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop, and remove what only this instance used."""
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()


# -- PostgreSQL -----------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ServiceUnavailable("PostgreSQL's initdb is not installed")
    return Path(initdb).parent


class PrivatePostgres(_Service):
    """A PostgreSQL cluster in a temporary directory, on its own port, trust auth.

    ``initdb`` refuses to run as root: as root the cluster belongs to the
    ``postgres`` account (its directory is created for it under the system's
    temporary directory, which that account can reach).
    """

    name = "PostgreSQL"

    def __init__(self, port: int | None = None, database: str = "soak") -> None:
        self.bin = _postgres_bin()
        self.port = port or free_port()
        self.database = database
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceUnavailable("running as root and no 'postgres' account") from None
            self.user = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="deepwork-soak-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "postgres.log"
        self.initialised = False
        self.created = False
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, argv: list[str], *, check: bool = True, timeout: float = 120) -> str:
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv!r} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def _initdb(self) -> None:
        self.sockets.mkdir()
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            for path in (self.root, self.sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._run([
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
            "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C",
        ])  # fmt: skip
        # fsync and full_page_writes guard against an OS crash, which a soak
        # does not cause. synchronous_commit stays on: a server killed with
        # "immediate" would otherwise forget commits it had confirmed, and a
        # soak would report that as the library running an attempt twice.
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockets}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self.initialised = True

    def start(self) -> None:
        if not self.initialised:
            self._initdb()
        self._run([
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", "60", "start",
        ])  # fmt: skip
        self.running = True
        if not self.created:
            self._run([
                str(self.bin / "createdb"), "-h", str(self.sockets), "-p", str(self.port),
                "-U", "postgres", self.database,
            ])  # fmt: skip
            self.created = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: ``fast`` or ``immediate``, pg_ctl's)."""
        if not self.initialised or not (self.data / "postmaster.pid").exists():
            self.running = False
            return
        self._run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"],
            check=False,
        )
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():  # pg_ctl could not stop it: end the postmaster we started
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        self.running = False

    def crash_restart(self) -> None:
        """Stop without a checkpoint (as on a crash), then start again: recovery runs."""
        self.stop(mode="immediate")
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def terminate_backends(self, connect: Callable[[], Any]) -> int:
        """``pg_terminate_backend`` every client connection but the caller's; how many."""
        with connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            ).fetchall()
        return sum(1 for (ended,) in rows if ended)


# -- Redis ----------------------------------------------------------------------------


class PrivateRedis(_Service):
    """A ``redis-server`` child process without persistence (a restart empties it)."""

    name = "Redis"

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceUnavailable("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="deepwork-soak-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def cleanup(self) -> None:
        self.stop()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--dir", str(self.workdir)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        proc = self.proc
        _wait("redis-server", lambda: port_open(self.port), 30, lambda: proc.poll() is None)

    def stop(self) -> None:
        _end(self.proc)
        self.proc = None

    def kill(self) -> None:
        _kill_group(self.proc, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self.proc = None


# -- RabbitMQ -------------------------------------------------------------------------


def _rabbitmq_sbin() -> Path:
    """The server's own scripts (the packaged wrapper in /usr/sbin switches to the
    ``rabbitmq`` account and the system node's files, which a private node must not use)."""
    for pattern in ("/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"):
        for found in sorted(glob.glob(pattern), reverse=True):
            if (Path(found) / "rabbitmq-server").exists():
                return Path(found)
    server = shutil.which("rabbitmq-server")
    if server is None:
        raise ServiceUnavailable("rabbitmq-server is not installed")
    return Path(server).parent


def _epmd() -> str | None:
    found = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"), reverse=True)
    return found[0] if found else shutil.which("epmd")


class PrivateRabbitMQ(_Service):
    """A second RabbitMQ node (``soak<port>@localhost``) with its own ports and files.

    It has its own Erlang port mapper (``ERL_EPMD_PORT``), so it never meets
    the machine's node, and keeps its Erlang cookie, database and logs under
    its own directory. No plugins. ``guest`` may connect over TCP. The port
    mapper outlives restarts of the node; :meth:`cleanup` ends it.
    """

    name = "RabbitMQ"

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.sbin = _rabbitmq_sbin()
        ports = free_ports(3)
        self.port = port or ports[0]
        self.dist_port, self.epmd_port = ports[1], ports[2]
        self.node = f"soak{self.port}@localhost"
        self.owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="deepwork-soak-rabbit-"))
        self.home = self.workdir / "home"
        self.home.mkdir(exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = false\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_PID_FILE=str(self.workdir / "rabbitmq.pid"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
        )
        return env

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env(), capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def start(self) -> None:
        with open(self.workdir / "server.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.sbin / "rabbitmq-server")],
                env=self.env(), cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        proc = self.proc
        _wait("rabbitmq-server", lambda: port_open(self.port), 120, lambda: proc.poll() is None)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", timeout=60)
        _end(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        """Stop the node and its port mapper."""
        self.stop()
        epmd = _epmd()
        if epmd is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [epmd, "-port", str(self.epmd_port), "-kill"],
                    capture_output=True, timeout=30, check=False,
                )  # fmt: skip
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the node (the broker crashes; durable queues survive)."""
        _kill_group(self.proc, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self.proc = None
