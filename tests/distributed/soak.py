"""The fault soak: the distributed deployment under HTTP retry load while things break.

:class:`Soak` starts private PostgreSQL, Redis and RabbitMQ servers
(:mod:`private_services`), migrates a schema, and runs the deployment of
:mod:`soak_app`: two web processes, an outbox relay, a reaper, a Celery
worker on Redis and a Dramatiq worker on RabbitMQ. Then, for the configured
time:

- a feeder adds tasks to the projects and assigns them (the relay sends them);
- HTTP clients list blocked tasks and retry them, each retry with an
  ``Idempotency-Key`` that the client sends again (same key) after a dropped
  connection, a 503 or a 409 "still in progress", until it has an answer;
- a fault injector, driven by a seeded RNG, at random moments terminates the
  library's database connections, restarts PostgreSQL, Redis or RabbitMQ, or
  ``kill -9``s a web process, the relay, the reaper or a worker (and starts it
  again after a random downtime).

Then the faults and the load stop, every client finishes its retry, and the
deployment must converge: every task ``done`` or ``blocked``, nothing left in
the outbox to send. The checks of :meth:`SoakReport.failures` follow.

``tests/distributed/test_soak.py`` runs a short soak; ``scripts/soak`` a long one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from private_services import PrivatePostgres, PrivateRabbitMQ, PrivateRedis, free_ports, port_open

from deepwork_retry import ExecutorService
from deepwork_retry.exceptions import AlreadyExists, InvalidTransition, StorageError
from deepwork_retry.storage.postgres import PostgresStorage, migrate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent
SCHEMA = "soak"
TOKEN = "soak-token"
PREFIX = "/api/deep-work"
UNEXPECTED_DETAIL = "could not handle this request"
"""Part of the 503 the API answers for an error it did not expect (a defect, logged)."""

FAULTS = (
    "pg_terminate_backends",
    "pg_restart",
    "redis_restart",
    "rabbitmq_restart",
    "kill_web",
    "kill_relay",
    "kill_reaper",
    "kill_celery_worker",
    "kill_dramatiq_worker",
)


@dataclass
class SoakConfig:
    seconds: float = 90.0
    """How long load and faults run."""
    seed: int | None = None
    """The fault injector's and the clients' seed (random when None; always printed)."""
    clients: int = 3
    projects: int = 4
    """Half run on Celery (Redis), half on Dramatiq (RabbitMQ)."""
    tasks_per_second: float = 2.0
    fail_percent: int = 50
    """How many attempts the host's function fails (fixed per attempt)."""
    fault_gap: tuple[float, float] = (4.0, 9.0)
    downtime: tuple[float, float] = (0.5, 3.0)
    settle: float = 240.0
    """Deadline for the deployment to converge once the faults stop."""
    lease: float = 6.0
    start_timeout: float = 12.0
    workdir: Path | None = None
    log: Callable[[str], None] = print


@dataclass
class Fault:
    kind: str
    at: float
    detail: str = ""


@dataclass
class SoakReport:
    seed: int
    seconds: float
    converge_seconds: float | None = None
    requests: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    answers: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    """Idempotency key -> ``(project, task, attempt)`` of each retry answered 200."""
    replays: int = 0
    resends: int = 0
    unresolved: list[tuple[str, str, str]] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    watchdog: list[str] = field(default_factory=list)
    """Celery workers restarted because they stopped consuming (see ``Soak._watchdog``)."""
    tasks_created: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    runs: int = 0
    deliveries: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)
    """``(check, passed, detail)``; ``passed`` is None for a check skipped with a reason."""

    def check(self, name: str, ok: bool | None, detail: str = "") -> None:
        self.checks.append((name, ok, detail))

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, ok, detail in self.checks if ok is False]

    def table(self) -> str:
        kinds = Counter(f.kind for f in self.faults)
        rows: list[tuple[str, str]] = [
            ("seed", str(self.seed)),
            ("load and faults (s)", f"{self.seconds:.0f}"),
            ("converged after (s)", "-" if self.converge_seconds is None
             else f"{self.converge_seconds:.1f}"),
            ("HTTP requests", str(sum(self.requests.values()))),
            ("  by answer", ", ".join(f"{k}: {v}" for k, v in sorted(self.requests.items()))),
            ("faults injected", str(len(self.faults))),
            *((f"  {kind}", str(kinds[kind])) for kind in FAULTS),
            ("retries answered 200", str(len(self.answers))),
            ("  resent after a fault", str(self.resends)),
            ("  answered by replay", str(self.replays)),
            ("stuck Celery workers restarted", str(len(self.watchdog))),
            ("tasks", str(self.tasks_created)),
            ("  final states", ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))),
            ("attempts", str(self.attempts)),
            ("delivered entries not yet pruned", str(self.deliveries)),
            ("host function runs", str(self.runs)),
            ("duplicates", str(len(self.duplicates))),
            ("lost", str(len(self.lost))),
        ]  # fmt: skip
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append("")
        for name, ok, detail in self.checks:
            mark = "ok  " if ok else ("skip" if ok is None else "FAIL")
            lines.append(f"[{mark}] {name}" + (f": {detail}" if detail and not ok else ""))
        return "\n".join(lines)


class Proc:
    """One component process (in its own session, so ``kill -9`` takes its children too)."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path,
        ready: Callable[[Proc], bool],
    ) -> None:  # fmt: skip
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0

    def output(self) -> str:
        """What the process wrote since its last start."""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self, timeout: float = 90.0) -> None:
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=HERE, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ready(self):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` the process and everything it started."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        self.kill()


def _says(text: str) -> Callable[[Proc], bool]:
    return lambda proc: text in proc.output()


def _listens(port: int) -> Callable[[Proc], bool]:
    return lambda proc: port_open(port)


PRUNE_WHILE_LOADED = ["--delivered-outbox-days", "0.0002"]
"""The prune the soak runs every 10 s under load: delivered entries older than about
17 s go, and idempotency keys once their life (``SOAK_KEY_LIFE``) has passed."""

PRUNE_FINAL = ["--delivered-outbox-days", "0.000001"]
"""The prune after convergence: every delivered entry the rule lets go (0.1 s old)."""


def prune_command(dsn: str, schema: str) -> list[str]:
    """``deepwork-retry prune`` against the soak's database."""
    return [str(BIN / "deepwork-retry"), "prune", "--dsn", dsn, "--schema", schema]


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.cfg = config
        seed = config.seed
        self.seed = seed if seed is not None else random.SystemRandom().randrange(10**6)
        self.report = SoakReport(seed=self.seed, seconds=config.seconds)
        self.lock = threading.Lock()
        self.stop_faults = threading.Event()
        self.stop_load = threading.Event()
        self.give_up = threading.Event()
        self.stop_watchdog = threading.Event()
        self.procs: dict[str, Proc] = {}
        self.procs_lock = threading.Lock()
        self.task_ids: dict[str, list[str]] = {}
        self.started = time.monotonic()
        self.prune_sizes: list[tuple[int, int]] = []
        self.prune_errors: list[str] = []

    def log(self, message: str) -> None:
        self.cfg.log(f"[soak {time.monotonic() - self.started:7.1f}s] {message}")

    # -- setup ------------------------------------------------------------------------
    def run(self) -> SoakReport:
        self.log(f"seed {self.seed} (pass --seed {self.seed} to repeat the fault schedule)")
        workdir = self.cfg.workdir or Path(tempfile.mkdtemp(prefix="deepwork-soak-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.runs_file = workdir / "runs.log"
        with contextlib.ExitStack() as stack:
            self.pg = stack.enter_context(PrivatePostgres())
            self.redis = stack.enter_context(PrivateRedis(workdir=_mkdir(workdir / "redis")))
            self.mq = stack.enter_context(PrivateRabbitMQ(workdir=_mkdir(workdir / "rabbitmq")))
            self.log(f"PostgreSQL :{self.pg.port}, Redis :{self.redis.port}, "
                     f"RabbitMQ :{self.mq.port} ({self.mq.node}); files in {workdir}")  # fmt: skip
            migrate(self.pg.dsn, schema=SCHEMA)
            stack.callback(self._stop_processes)
            self._start_processes()
            self._create_projects()
            watchdog = self._thread("watchdog", self._watchdog)
            watchdog.start()
            try:
                self._soak()
                self._converge()
            finally:
                self.stop_watchdog.set()
                watchdog.join(timeout=120)
            self._check()
        return self.report

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
            PYTHONUNBUFFERED="1",
            SOAK_DSN=self.pg.dsn,
            SOAK_SCHEMA=SCHEMA,
            SOAK_REDIS=self.redis.url,
            SOAK_RABBITMQ=self.mq.url,
            SOAK_QUEUE="deepwork_soak",
            SOAK_RUNS=str(self.runs_file),
            SOAK_LEASE=str(self.cfg.lease),
            SOAK_START_TIMEOUT=str(self.cfg.start_timeout),
            SOAK_TOKEN=TOKEN,
        )
        return env

    def _start_processes(self) -> None:
        env = self.env()
        py = sys.executable
        self.web_ports = free_ports(2)
        specs: list[tuple[str, list[str], Callable[[Proc], bool]]] = [
            (f"web{i}", [py, "soak_app.py", "web", str(port)], _listens(port))
            for i, port in enumerate(self.web_ports)
        ]
        specs += [
            ("relay", [py, "soak_app.py", "relay"], _says("relay ready")),
            ("reaper", [py, "soak_app.py", "reaper"], _says("reaper ready")),
            ("celery_worker", [
                str(BIN / "celery"), "-A", "soak_celery", "worker", "--pool=prefork",
                "--concurrency=2", "-Q", "deepwork_soak", "-n", "soak@%h", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "--loglevel=INFO",
            ], _says("ready.")),
            ("dramatiq_worker", [
                str(BIN / "dramatiq"), "soak_dramatiq", "-p", "1", "-t", "2", "-Q", "deepwork_soak",
            ], _says("ready for action")),
        ]  # fmt: skip
        for name, argv, ready in specs:
            proc = Proc(name, argv, env, self.workdir / f"{name}.log", ready)
            self.procs[name] = proc
            proc.start()
        self.log("started " + ", ".join(self.procs))

    def _stop_processes(self) -> None:
        for proc in self.procs.values():
            proc.stop()

    def storage(self) -> PostgresStorage:
        return PostgresStorage(self.pg.dsn, schema=SCHEMA, migrate=False, timeout=3)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'SET search_path TO "{SCHEMA}"')
            return conn.execute(query, params).fetchall()

    def _create_projects(self) -> None:
        storage = self.storage()
        try:
            service = ExecutorService(storage)
            half = max(1, self.cfg.projects // 2)
            for n in range(self.cfg.projects):
                project = f"{'celery' if n < half else 'dramatiq'}-{n}"
                service.create_project(project, name=f"Soak project {n}")
                self.task_ids[project] = []
        finally:
            storage.close()

    # -- the load -----------------------------------------------------------------------
    def _soak(self) -> None:
        threads = [
            self._thread("feeder", self._feeder),
            self._thread("faults", self._faults),
            self._thread("monitor", self._monitor),
        ]
        clients = [
            self._thread(f"client-{n}", functools.partial(self._client, n))
            for n in range(self.cfg.clients)
        ]
        threads.append(self._thread("prune", self._pruner))
        for thread in threads + clients:
            thread.start()
        self.stop_faults.wait(self.cfg.seconds)
        self.stop_faults.set()
        self.log("faults stop; waiting for the injector to bring everything back")
        threads[1].join(timeout=300)
        self.stop_load.set()
        self.log("load stops; clients finish the retries they have started")
        deadline = time.monotonic() + 240
        for thread in clients:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in clients):
            self.give_up.set()
            for thread in clients:
                thread.join(timeout=30)
        for thread in threads:
            thread.join(timeout=60)

    def _thread(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """A soak thread whose crash is reported as a failure, not lost on stderr."""

        def run() -> None:
            try:
                target()
            except Exception:  # noqa: BLE001 - reported in the checks
                message = f"soak thread {name} crashed:\n{traceback.format_exc()}"
                self.log(message)
                with self.lock:
                    self.report.unexpected_exits.append(message)

        return threading.Thread(target=run, name=f"soak-{name}", daemon=True)

    def _durably(self, action: Callable[[], object], done: tuple[type[Exception], ...]) -> None:
        """Do ``action`` until it succeeds or raises one of ``done`` (it happened before)."""
        delay = 0.2
        deadline = time.monotonic() + 300
        while True:
            try:
                action()
                return
            except done:
                return
            except StorageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _feeder(self) -> None:
        storage = self.storage()
        rng = random.Random(self.seed * 7 + 1)
        service = ExecutorService(storage)  # no dispatcher: the relay sends every attempt
        number = 0
        try:
            while not self.stop_faults.is_set():
                project = rng.choice(sorted(self.task_ids))
                number += 1
                self._add(service, project, f"t{number:06d}")
                self.stop_faults.wait(1 / self.cfg.tasks_per_second)
        finally:
            storage.close()

    def _add(self, service: ExecutorService, project: str, task_id: str) -> None:
        """Add a task and assign it, surviving outages (a repeat finds it done)."""
        metadata = {"fail_percent": self.cfg.fail_percent}
        self._durably(
            lambda: service.add_task(project, task_id, max_retries=1, metadata=metadata),
            (AlreadyExists,),
        )
        with self.lock:
            self.task_ids[project].append(task_id)
            self.report.tasks_created += 1
        self._durably(lambda: service.assign(project, task_id), (InvalidTransition,))

    def _count(self, what: str) -> None:
        with self.lock:
            self.report.requests[what] += 1

    def _client(self, number: int) -> None:
        import httpx

        rng = random.Random(self.seed * 1000 + number)
        bases = [f"http://127.0.0.1:{port}{PREFIX}" for port in self.web_ports]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(headers=headers, timeout=15) as client:
            while not self.stop_load.is_set():
                project = rng.choice(sorted(self.task_ids))
                base = rng.choice(bases)
                roll = rng.random()
                if roll < 0.1:
                    self._get(client, f"{base}/projects/{project}/progress")
                    continue
                if roll < 0.2:
                    with self.lock:
                        known = list(self.task_ids[project])
                    if known:  # most are not blocked: 400, nothing changes
                        self._retry(client, bases, rng, project, rng.choice(known))
                    continue
                page = self._get(client, f"{base}/projects/{project}/tasks?limit=50")
                blocked = [t["id"] for t in (page or {}).get("tasks", [])]
                if blocked:
                    self._retry(client, bases, rng, project, rng.choice(blocked))
                else:
                    time.sleep(0.2)

    def _get(self, client: Any, url: str) -> dict[str, Any] | None:
        import httpx

        try:
            response = client.get(url)
        except httpx.TransportError:
            self._count("connection error")
            time.sleep(0.2)
            return None
        self._note(response, url)
        if response.status_code != 200:
            time.sleep(0.2)
            return None
        body: dict[str, Any] = response.json()
        return body

    def _note(self, response: Any, what: str) -> None:
        status = response.status_code
        self._count(str(status))
        if status >= 500 and (status != 503 or UNEXPECTED_DETAIL in response.text):
            with self.lock:
                self.report.bad_responses.append(f"{status} {what}: {response.text[:300]}")

    def _retry(
        self, client: Any, bases: list[str], rng: random.Random, project: str, task: str
    ) -> None:
        """One manual retry: the same ``Idempotency-Key`` until an answer comes."""
        import httpx

        key = uuid.UUID(int=rng.getrandbits(128)).hex
        body = json.dumps({"reason": "soak"})
        first = rng.randrange(len(bases))
        sends = 0
        while True:
            if self.give_up.is_set():
                with self.lock:
                    self.report.unresolved.append((project, task, key))
                return
            base = bases[(first + sends) % len(bases)]  # after a failure, the other web process
            sends += 1
            if sends > 1:
                with self.lock:
                    self.report.resends += 1
            url = f"{base}/projects/{project}/tasks/{task}/retry"
            try:
                response = client.post(
                    url, content=body,
                    headers={"Idempotency-Key": key, "Content-Type": "application/json"},
                )  # fmt: skip
            except httpx.TransportError:
                self._count("connection error")
                time.sleep(0.3)
                continue
            self._note(response, f"POST {url}")
            status = response.status_code
            if status == 200:
                answer = response.json()
                attempt = int(answer["task"]["attempt"])
                with self.lock:
                    self.report.answers[key] = (project, task, attempt)
                    if response.headers.get("idempotent-replayed") == "true":
                        self.report.replays += 1
                return
            retry_after = response.headers.get("retry-after")
            if status == 503 or (status == 409 and retry_after is not None):
                time.sleep(min(float(retry_after or 1), 2.0) * rng.uniform(0.5, 1.0))
                continue
            return  # a refusal (409 not blocked, 404, ...): nothing changed

    # -- faults -----------------------------------------------------------------------
    def _faults(self) -> None:
        rng = random.Random(self.seed)
        plan = list(FAULTS)
        rng.shuffle(plan)  # every kind once first, then at random
        while not self.stop_faults.wait(rng.uniform(*self.cfg.fault_gap)):
            kind = plan.pop(0) if plan else rng.choice(FAULTS)
            down = rng.uniform(*self.cfg.downtime)
            at = time.monotonic() - self.started
            try:
                detail = self._inject(kind, down, rng)
            except Exception as exc:  # noqa: BLE001 - reported as a soak failure
                detail = f"injection failed: {exc!r}"
                with self.lock:
                    self.report.unexpected_exits.append(f"{kind}: {detail}")
            self.log(f"fault {kind} {detail}")
            with self.lock:
                self.report.faults.append(Fault(kind, at, detail))

    def _inject(self, kind: str, down: float, rng: random.Random) -> str:
        if kind == "pg_terminate_backends":
            ended = self.pg.terminate_backends(
                lambda: psycopg.connect(self.pg.dsn, autocommit=True, connect_timeout=5)
            )
            return f"ended {ended} connections"
        if kind == "pg_restart":
            with self.procs_lock:
                self.pg.stop(mode="immediate")
                time.sleep(down)
                self.pg.start()
            return f"down {down:.1f}s"
        if kind in ("redis_restart", "rabbitmq_restart"):
            server = self.redis if kind == "redis_restart" else self.mq
            with self.procs_lock:
                server.stop()
                time.sleep(down)
                server.start()
            return f"down {down:.1f}s"
        name = kind.removeprefix("kill_")
        if name == "web":
            name = rng.choice([n for n in self.procs if n.startswith("web")])
        proc = self.procs[name]
        with self.procs_lock:
            proc.kill()
            time.sleep(down)
            proc.start()
        return f"{name} down {down:.1f}s"

    def _monitor(self) -> None:
        """Restart a component that exited by itself, and report it (a defect)."""
        while not self.stop_load.wait(1.0):
            with self.procs_lock:
                for proc in self.procs.values():
                    if proc.proc is not None and not proc.alive():
                        message = f"{proc.name} exited ({proc.proc.returncode}):\n{proc.tail()}"
                        self.log(message)
                        with self.lock:
                            self.report.unexpected_exits.append(message)
                        proc.start()

    def _watchdog(self, patience: float = 20.0) -> None:
        """Restart the Celery worker when it stops consuming, as a liveness probe would.

        A Celery worker on Redis can stop consuming for good after the broker
        restarts (its ack fails with "Couldn't ack ... ConnectionError" and the
        consumer never reconnects: celery/celery#9054, #10205, #10302). The
        library's side holds meanwhile (the reaper hands the attempts out again
        every start timeout), but nothing runs until the worker is restarted,
        which is what a deployment's liveness check does. The probe: messages
        wait in the queue and the worker has logged nothing for ``patience``
        seconds (it logs every task it receives).
        """
        import redis

        proc = self.procs["celery_worker"]
        last_size, quiet_since = -1, time.monotonic()
        while not self.stop_watchdog.wait(2.0):
            size = proc.log.stat().st_size
            if size != last_size:
                last_size, quiet_since = size, time.monotonic()
                continue
            try:
                client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
                try:
                    waiting = int(client.llen("deepwork_soak"))
                finally:
                    client.close()
            except redis.RedisError:
                continue
            if waiting == 0 or time.monotonic() - quiet_since < patience:
                continue
            with self.procs_lock:
                proc.kill()
                proc.start()
            message = (
                f"celery worker consumed nothing for {patience:.0f}s with {waiting} "
                "message(s) waiting; restarted"
            )
            self.log(message)
            with self.lock:
                self.report.watchdog.append(message)
            last_size, quiet_since = -1, time.monotonic()

    def _pruner(self) -> None:
        argv = prune_command(self.pg.dsn, SCHEMA) + PRUNE_WHILE_LOADED
        while not self.stop_load.wait(10.0):
            self._prune(argv)

    def _prune(self, argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0 and not self.stop_load.is_set():
            # Refused while the database restarts is expected; record the rest.
            if "unavailable" not in (done.stdout + done.stderr).lower():
                self.prune_errors.append(f"{argv!r}: {done.returncode} {done.stderr[-300:]}")
            return
        with contextlib.suppress(psycopg.Error):
            ((keys,),) = self.sql("SELECT count(*) FROM idempotency")
            ((sent,),) = self.sql("SELECT count(*) FROM outbox WHERE state = 'delivered'")
            self.prune_sizes.append((int(keys), int(sent)))

    # -- convergence and checks ---------------------------------------------------------
    def _unsettled(self) -> tuple[int, int]:
        ((moving,),) = self.sql(
            "SELECT count(*) FROM tasks WHERE status NOT IN ('done', 'blocked')"
        )
        ((queued,),) = self.sql(
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'deferred')"
        )
        return int(moving), int(queued)

    def _converge(self) -> None:
        for proc in self.procs.values():  # a crash after the monitor stopped
            if not proc.alive():
                self.report.unexpected_exits.append(f"{proc.name} exited:\n{proc.tail()}")
                proc.start()
        start = time.monotonic()
        deadline = start + self.cfg.settle
        last = (-1, -1)
        while True:
            try:
                state = self._unsettled()
            except psycopg.Error:
                state = last
            if state == (0, 0):
                self.report.converge_seconds = time.monotonic() - start
                self.log(f"converged in {self.report.converge_seconds:.1f}s")
                return
            if state != last:
                self.log(
                    f"converging: {state[0]} task(s) moving, {state[1]} outbox entries to send"
                )
                last = state
            if time.monotonic() > deadline:
                self.log("did not converge")
                return
            time.sleep(0.5)

    def _check(self) -> None:
        rep = self.report
        tasks = self.sql("SELECT project_id, id, status, blocked_reason, error_message FROM tasks")
        rep.statuses = Counter(status for _, _, status, _, _ in tasks)
        attempts = self.sql("SELECT project_id, task_id, number, trigger, outcome FROM attempts")
        rep.attempts = len(attempts)
        ((rep.deliveries,),) = self.sql("SELECT count(*) FROM outbox WHERE state = 'delivered'")
        runs: Counter[tuple[str, str, int]] = Counter()
        if self.runs_file.exists():
            for line in self.runs_file.read_text().splitlines():
                project, task, attempt, _ = line.split()
                runs[(project, task, int(attempt))] += 1
        rep.runs = sum(runs.values())

        rep.check(
            "converged: no task left assigned or in progress, nothing left to send",
            rep.converge_seconds is not None,
            f"not within {self.cfg.settle:.0f}s: {self._unsettled()} (tasks moving, outbox)",
        )
        rep.check(
            "no 500 (nor an unexpected-error 503) was answered",
            not rep.bad_responses, "; ".join(rep.bad_responses[:5]),
        )  # fmt: skip
        rep.check(
            "every client's retry got its answer",
            not rep.unresolved, f"{len(rep.unresolved)} unresolved: {rep.unresolved[:5]}",
        )  # fmt: skip

        manual = {(p, t, n) for p, t, n, trigger, _ in attempts if trigger == "manual_retry"}
        by_attempt: dict[tuple[str, str, int], list[str]] = {}
        for key, answer in rep.answers.items():
            by_attempt.setdefault(answer, []).append(key)
        rep.duplicates += [
            f"retry answered 200 to {len(keys)} keys for one attempt {a}"
            for a, keys in by_attempt.items() if len(keys) > 1
        ]  # fmt: skip
        rep.lost += [
            f"200 for {a} but no manual retry attempt" for a in by_attempt if a not in manual
        ]
        unanswered = sorted(manual - by_attempt.keys())
        rep.check(
            "every 200 retry appears exactly once in the attempt history",
            not [d for d in rep.duplicates if "200" in d] and not rep.lost and not unanswered,
            f"duplicates {rep.duplicates[:3]}, lost {rep.lost[:3]}, "
            f"manual retries nobody was answered 200 for {unanswered[:3]}",
        )

        twice = [f"{a} ran {n} times" for a, n in runs.items() if n > 1]
        rep.duplicates += twice
        reported = {
            (p, t, n) for p, t, n, _, outcome in attempts if outcome in ("succeeded", "failed")
        }
        unrun = sorted(a for a in reported if runs[a] == 0)
        ghost = sorted(a for a in runs if a not in {(p, t, n) for p, t, n, _, _ in attempts})
        rep.lost += [f"{a} reported without a run" for a in unrun]
        rep.check(
            "every attempt ran the host function at most once",
            not twice and not unrun and not ghost,
            f"ran twice {twice[:3]}, reported but never ran {unrun[:3]}, "
            f"ran unrecorded {ghost[:3]}",
        )

        stranded = [
            f"{p}/{t} {status}" for p, t, status, reason, message in tasks
            if status != "done" and (status != "blocked" or reason is None or not message)
        ]  # fmt: skip
        created = sum(len(ids) for ids in self.task_ids.values())
        rep.lost += (
            [f"{created - len(tasks)} created task(s) missing"] if created != len(tasks) else []
        )
        rep.check(
            "no task stranded: each is done, or blocked with its reason",
            not stranded and created == len(tasks),
            f"{stranded[:5]} (created {created}, stored {len(tasks)})",
        )

        storage = self.storage()
        try:
            wrong = []
            counted = Counter((p, status) for p, _, status, _, _ in tasks)
            for project in sorted(self.task_ids):
                progress = storage.progress(project)
                for status in ("inbox", "assigned", "in_progress", "review", "done", "blocked",
                               "skipped"):  # fmt: skip
                    if getattr(progress, status) != counted[(project, status)]:
                        wrong.append(f"{project}.{status}: {getattr(progress, status)} "
                                     f"!= {counted[(project, status)]}")  # fmt: skip
                if progress.total != sum(n for (p, _), n in counted.items() if p == project):
                    wrong.append(f"{project}.total: {progress.total}")
        finally:
            storage.close()
        rep.check("every project's counters equal a recount", not wrong, "; ".join(wrong[:5]))

        rep.check(
            "no component exited by itself, every fault was injected",
            not rep.unexpected_exits, "\n".join(rep.unexpected_exits[:3]),
        )  # fmt: skip
        self._check_pruned()

    def _check_pruned(self) -> None:
        """After the last prune nothing the retention rule lets go is left: no expired
        idempotency key, no delivered entry of a task no longer waiting to start."""
        # Keys that expire while the prune runs are the next prune's: count those
        # expired when it started.
        ((started,),) = self.sql("SELECT clock_timestamp()")
        self._prune(prune_command(self.pg.dsn, SCHEMA) + PRUNE_FINAL)
        ((expired,),) = self.sql(
            "SELECT count(*) FROM idempotency WHERE expires_at <= %s", (started,)
        )
        ((sent,),) = self.sql(
            "SELECT count(*) FROM outbox o JOIN tasks t"
            " ON t.project_id = o.project_id AND t.id = o.task_id"
            " WHERE o.state = 'delivered' AND NOT (t.status = 'assigned' AND t.attempt = o.attempt)"
        )
        ((keys,),) = self.sql("SELECT count(*) FROM idempotency")
        pruned = sum(1 for size in self.prune_sizes if size)
        self.report.check(
            "the pruned tables stayed bounded",
            not self.prune_errors and expired == 0 and sent == 0 and pruned > 0,
            f"prune errors {self.prune_errors[:3]}; {pruned} prune(s) under load; sizes "
            f"(idempotency keys, delivered outbox) {self.prune_sizes[-5:]}; after the last: "
            f"{keys} keys ({expired} expired), {sent} delivered entries it could remove",
        )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
