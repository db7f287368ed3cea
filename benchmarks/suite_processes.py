"""The demo's stack on PostgreSQL with 1 and 2 server processes, loaded by wrk.

Servers (``procs_app.py``, each run by uvicorn from an import-string factory)
with 1 process (``--workers 1``), 2 processes sharing one socket
(``--workers 2``) and 2 processes on ``SO_REUSEPORT`` sockets of one port
(``procs_serve.py``: with one shared socket, the worker that wakes first may
accept all of wrk's connections); gunicorn is not used:

- library: the demo server's application (Starlette adapter, OpenAPI and
  dashboard routes) over ``AsyncPostgresStorage``, access log on as
  ``deepwork-retry serve`` has it;
- floor: the bare Starlette endpoint (Bearer check, fixed body) of
  ``http_server.py starlette-bare``;
- second floor: the same endpoint doing one durable commit on PostgreSQL per
  request (an ``INSERT`` on an autocommit pool connection);
- peer: pocketpaw 0.4.18's ``/retry`` as ``pocketpaw serve`` runs it, one
  process (it keeps its tasks in JSON files, so it cannot run as several).

Every server has the same uvicorn settings (log level ``info``, access log on,
the demo's ``h11_max_incomplete_event_size``). All of them run at once, idle
but for the one under load; rounds go through every side in turn, the order
reversed every round. wrk runs with one thread and 16 connections; every
request retries a distinct blocked task (``retry.lua``), each library server
in its own project of one schema ``bench_processes``, dropped at the end.

Each round also records the CPU time spent by the server's processes, by their
PostgreSQL backends (found by ``application_name``), by wrk and by the whole
machine (``/proc/stat``), so the JSON shows where the two cores went.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _peers
import suite_pg
from _fixtures import add_blocked
from _harness import Figure, Row, median, unavailable
from suite_http import (
    HERE,
    PP_TEMPLATE,
    Server,
    _pp_block,
    ensure_wrk,
    finish,
    free_port,
    run_wrk,
)

from deepwork_retry.web._http import MAX_HEADER_BYTES as H11_MAX  # as the demo server

GROUP = "processes"
SCHEMA = "bench_processes"
TOKEN = "bench-token-0123456789abcdef"
TEMPLATE = "/api/deep-work/projects/%s/tasks/%%s/retry"
CONNECTIONS = 16
TICK = os.sysconf("SC_CLK_TCK")


class Plan:
    def __init__(self, quick: bool) -> None:
        if quick:
            self.rounds, self.duration, self.warm, self.pp_tasks = 2, 1.0, 0.0, 100
        else:
            self.rounds, self.duration, self.warm, self.pp_tasks = 4, 2.0, 1.0, 300
        # Blocked tasks per library round: above the rate this machine reaches (a round
        # that uses them all stops early; its rate stands).
        self.per_round = int(1500 * self.duration)


# -- CPU accounting ------------------------------------------------------------------------
def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``, 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (uvicorn's supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICK


class Meter:
    """CPU spent during one round by a server's processes, its backends, wrk, the machine."""

    def __init__(self, monitor: Any, server: Server, app_name: str | None) -> None:
        self.monitor = monitor
        self.server = server
        self.app_name = app_name

    def _backends(self) -> list[int]:
        if self.app_name is None or self.monitor is None:
            return []
        rows = self.monitor.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.app_name,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def snapshot(self) -> dict[str, Any]:
        procs = _tree(self.server.proc.pid)
        backends = self._backends()
        return {
            "t": time.perf_counter(),
            "server": {p: _proc_cpu(p) for p in procs},
            "pg": {p: _proc_cpu(p) for p in backends},
            "wrk": resource.getrusage(resource.RUSAGE_CHILDREN),
            "machine": _machine_busy(),
        }

    @staticmethod
    def spent(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = b["t"] - a["t"]
        per_proc = {p: b["server"][p] - a["server"].get(p, 0.0) for p in b["server"]}
        pg = sum(b["pg"][p] - a["pg"].get(p, 0.0) for p in b["pg"])
        wrk = (b["wrk"].ru_utime + b["wrk"].ru_stime) - (a["wrk"].ru_utime + a["wrk"].ru_stime)
        return {
            "wall_s": wall,
            "server_cpu_s": sum(per_proc.values()),
            "server_cpu_s_per_process": sorted(per_proc.values(), reverse=True),
            "pg_backends_cpu_s": pg,
            "pg_backends": len(b["pg"]),
            "wrk_cpu_s": wrk,
            "machine_busy_cpu_s": b["machine"] - a["machine"],
        }


class Side:
    """One server under load: its figure, its next unused task, its CPU per round."""

    def __init__(
        self,
        figure: Figure,
        server: Server,
        meter: Meter,
        budget: int,
        **wrk_args: Any,
    ) -> None:
        self.figure = figure
        self.server = server
        self.meter = meter
        self.budget = budget
        self.wrk_args = wrk_args
        self.next = 0
        self.rounds: list[dict[str, Any]] = []
        figure.extra["rounds"] = self.rounds

    def load(self, wrk: str, duration: float, budget: int | None = None) -> dict[str, Any]:
        budget = self.budget if budget is None else budget
        before = self.meter.snapshot()
        result = run_wrk(
            wrk,
            self.server,
            first=self.next,
            count=budget,
            duration=duration,
            connections=CONNECTIONS,
            **self.wrk_args,
        )
        result["cpu"] = Meter.spent(before, self.meter.snapshot())
        self.next += result["requests"] + CONNECTIONS
        return result

    def round(self, wrk: str, duration: float, budget: int | None = None) -> None:
        result = self.load(wrk, duration, budget)
        self.rounds.append(result)
        self.figure.samples.append(result["rps"])


def summarise(figure: Figure) -> None:
    """The round figures' medians, and the cores each part used while loaded."""
    finish(figure)
    cpus = [r["cpu"] for r in figure.extra["rounds"]]
    reqs = [r["requests"] for r in figure.extra["rounds"]]
    for key in ("server_cpu_s", "pg_backends_cpu_s", "wrk_cpu_s", "machine_busy_cpu_s"):
        name = key.removesuffix("_cpu_s")
        figure.extra[f"{name}_cores_median"] = median([c[key] / c["wall_s"] for c in cpus])
        figure.extra[f"{name}_cpu_us_per_request_median"] = median(
            [c[key] / n * 1e6 for c, n in zip(cpus, reqs, strict=True) if n]
        )


# -- servers ---------------------------------------------------------------------------------
def uvicorn_server(
    factory: str, workers: int, mode: str, name: str, logs: Path, env: dict[str, str]
) -> Server:
    """``uvicorn --workers N`` (``mode`` "workers"), or N processes on ``SO_REUSEPORT``
    sockets (``procs_serve.py``, ``mode`` "reuseport")."""
    port = free_port()
    if mode == "workers":
        argv = [
            sys.executable, "-m", "uvicorn", f"procs_app:{factory}", "--factory",
            "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "info", "--access-log",
            "--h11-max-incomplete-event-size", str(H11_MAX),
        ]  # fmt: skip
    else:
        argv = [sys.executable, str(HERE / "procs_serve.py"), factory, str(workers), str(port)]
    server = Server(argv, port, logs / f"processes-{name}.log", env=env)
    # The port answers once one process listens: wait for every process's start-up.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = server.log.read_text(errors="replace")
        if text.count("Application startup complete") >= workers:
            break
        time.sleep(0.2)
    return server


def prepare_schema() -> Any:
    """The library's schema (migrated) and the floor's table; returns a storage on it."""
    import psycopg

    storage = suite_pg.pg_storage(SCHEMA)
    with psycopg.connect(suite_pg.dsn(), autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{SCHEMA}".floor_commits (project_id text NOT NULL, '
            "task_id text NOT NULL, PRIMARY KEY (project_id, task_id))"
        )
    return storage


def fill(storage: Any, projects: dict[str, int]) -> float:
    """``projects`` of blocked tasks; returns the seconds it took."""
    t0 = time.perf_counter()
    try:
        for pid, count in projects.items():
            add_blocked(storage, pid, count)
    finally:
        storage.close()
    return time.perf_counter() - t0


def app_name(side: str) -> str:
    return f"bench_processes_{side}"


def server_env(side: str) -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_PROCS_TOKEN": TOKEN,
        "BENCH_PROCS_DSN": app_dsn(app_name(side)),
        "BENCH_PROCS_SCHEMA": SCHEMA,
    }


def app_dsn(name: str) -> str:
    base = suite_pg.dsn()
    return base + ("&" if "?" in base else "?") + f"application_name={name}"


# -- pocketpaw -------------------------------------------------------------------------------
class Pocketpaw:
    """pocketpaw's server with a project of ``tasks`` blocked tasks (see ``suite_http``)."""

    def __init__(self, python: Path, tasks: int, logs: Path, scratch: Path) -> None:
        import httpx

        home = scratch / "pocketpaw-processes-home"
        (home / ".pocketpaw").mkdir(parents=True, exist_ok=True)
        (home / ".pocketpaw" / ".update_check").write_text(
            json.dumps({"ts": time.time(), "latest": "0.4.18"})
        )
        env = {**os.environ, "HOME": str(home)}
        self.token = subprocess.run(
            [str(python), "-c", "from pocketpaw.config import get_access_token as t; print(t())"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout.strip()
        if not self.token:
            raise RuntimeError("pocketpaw made no access token")
        port = free_port()
        self.server = Server(
            [str(python), str(HERE / "peers" / "pocketpaw_serve.py"), str(port)],
            port,
            logs / "processes-pocketpaw.log",
            env=env,
        )
        try:
            self.client = httpx.Client(
                base_url=self.server.base,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=60,
            )
            mc = "/api/mission-control"
            reply = self.client.post(f"{mc}/projects", json={"title": "bench"})
            project = reply.json()["project"]["id"]
            self.client.post(f"{mc}/agents", json={"name": "bench-agent", "role": "worker"})
            self.ids = []
            for i in range(tasks):
                reply = self.client.post(
                    f"{mc}/tasks", json={"title": f"task {i}", "project_id": project}
                )
                reply.raise_for_status()
                self.ids.append(reply.json()["task"]["id"])
            _pp_block(self.client, self.ids)
            self.template = PP_TEMPLATE.format(project=project)
            probe = self.client.post(self.template % self.ids[0])
            if probe.status_code != 200:
                raise RuntimeError(f"pocketpaw /retry answered {probe.status_code}")
            _pp_block(self.client, self.ids[:1])
            self.ids_file = scratch / "pocketpaw-processes-ids.txt"
            self.ids_file.write_text("\n".join(self.ids) + "\n")
        except BaseException:
            self.server.stop()
            raise

    def reblock(self, used: int) -> None:
        _pp_block(self.client, self.ids[:used])

    def stop(self) -> None:
        self.server.stop()


# -- the group -------------------------------------------------------------------------------
# (name, factory, processes, how they share the port, the library's project)
SPECS = [
    ("lib1", "library", 1, "workers", "l1"),
    ("lib2", "library", 2, "workers", "l2"),
    ("lib2r", "library", 2, "reuseport", "l3"),
    ("bare1", "bare", 1, "workers", "b1"),
    ("bare2", "bare", 2, "workers", "b2"),
    ("bare2r", "bare", 2, "reuseport", "b3"),
    ("commit1", "bare_commit", 1, "workers", "c1"),
    ("commit2", "bare_commit", 2, "workers", "c2"),
    ("commit2r", "bare_commit", 2, "reuseport", "c3"),
]
LABELS = {
    "library": "demo app (Starlette adapter, PostgreSQL)",
    "bare": "bare Starlette endpoint (Bearer check, fixed body)",
    "bare_commit": "bare Starlette endpoint + one durable INSERT on PostgreSQL",
}
HOW = {
    1: "1 process",
    2: "2 processes (uvicorn --workers 2)",
    3: "2 processes (SO_REUSEPORT)",
}
PP_TARGET = "≥ 10x req/s, p99 ≤"


def _key(name: str) -> int:
    return 3 if name.endswith("r") else int(name[-1])


def row_names() -> list[tuple[str, str]]:
    names = []
    for n in (1, 2, 3):
        names.append((f"library vs bare endpoint, {HOW[n]}", "report"))
        names.append((f"library vs bare endpoint + one durable commit, {HOW[n]}", "≥ 0.6x"))
    for n in (2, 3):
        for what in ("library", "bare endpoint", "bare endpoint + one durable commit"):
            names.append((f"{what} scaling, {HOW[n]} vs 1 process", "report"))
    names.append(("library, 1 process vs pocketpaw 0.4.18 /retry (one process)", PP_TARGET))
    names.append((f"library, {HOW[3]} vs pocketpaw 0.4.18 /retry (one process)", "report"))
    return names


def _all_unavailable(reason: str) -> list[Row]:
    return [unavailable(GROUP, name, reason, target) for name, target in row_names()]


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    plan = Plan(quick)
    wrk = ensure_wrk()
    if wrk is None:
        return _all_unavailable("wrk could not be installed")
    reason = suite_pg.reachable()
    if reason is not None:
        return _all_unavailable(reason)
    import psycopg

    # Every library round may use a fresh budget; the warm-up takes one more.
    tasks = (plan.per_round + CONNECTIONS) * (plan.rounds + 1)
    storage = prepare_schema()
    setup_s = float("nan")
    servers: list[Server] = []
    peer: Pocketpaw | None = None
    peer_reason: str | None = None
    monitor = psycopg.connect(suite_pg.dsn(), autocommit=True)
    try:
        # The servers and the peer start side by side (each mostly waits for its imports).
        t0 = time.perf_counter()
        pp_python = _peers.ensure("pocketpaw")
        with ThreadPoolExecutor(len(SPECS) + 2) as pool:
            projects = {spec[4]: tasks for spec in SPECS if spec[1] == "library"}
            filling = pool.submit(fill, storage, projects)
            starting = {
                spec[0]: pool.submit(uvicorn_server, *spec[1:4], spec[0], logs, server_env(spec[0]))
                for spec in SPECS
            }
            pp_start = (
                None
                if isinstance(pp_python, str)
                else pool.submit(Pocketpaw, pp_python, plan.pp_tasks, logs, scratch)
            )
            errors = []
            for future in [filling, *starting.values(), pp_start]:
                if future is None:
                    continue
                try:
                    started = future.result()
                except Exception as exc:  # noqa: BLE001 - raised below, once all are in
                    errors.append(exc)
                    continue
                if isinstance(started, float):
                    setup_s = started
                elif isinstance(started, Pocketpaw):
                    peer = started
                else:
                    servers.append(started)
        if isinstance(pp_python, str):
            peer_reason = pp_python
        elif peer is None:
            exc = errors.pop()
            peer_reason = f"pocketpaw: {type(exc).__name__}: {exc}"[:160]
        if errors:
            raise errors[0]
        start_s = time.perf_counter() - t0
        sides: dict[str, Side] = {}
        for name, factory, workers, mode, project in SPECS:
            server = starting[name].result()
            figure = Figure(
                f"{LABELS[factory]}, {HOW[_key(name)]}",
                "req/s",
                extra={"processes": workers, "port_sharing": mode},
            )
            budget = plan.per_round if factory == "library" else 10**8
            sides[name] = Side(
                figure,
                server,
                Meter(monitor, server, None if factory == "bare" else app_name(name)),
                budget,
                template=TEMPLATE % project,
                token=TOKEN,
            )
        pp_side: Side | None = None
        pp_duration = plan.duration
        if peer is not None:
            pp_side = Side(
                Figure(f"pocketpaw 0.4.18 serve /retry ({plan.pp_tasks} tasks)", "req/s"),
                peer.server,
                Meter(None, peer.server, None),
                plan.pp_tasks,
                token=peer.token,
                template=peer.template,
                ids_file=peer.ids_file,
            )
            if plan.duration > 1:
                # Its cost per retry grows with its task file: keep each round within its tasks.
                calib = pp_side.load(wrk, 1.0)
                peer.reblock(calib["requests"] + CONNECTIONS)
                rate = max(calib["rps"], 1.0)
                pp_duration = max(1.0, min(plan.duration, 0.7 * plan.pp_tasks / rate))
            pp_side.figure.extra["round_seconds"] = pp_duration
        # Warm every server up (pools grown, code paths run) before the measured rounds.
        warm: dict[str, Any] = {}
        if plan.warm:
            for name, side in sides.items():
                warm[name] = side.load(wrk, plan.warm)
        order: list[Side] = list(sides.values()) + ([pp_side] if pp_side else [])
        for r in range(plan.rounds):
            for side in order if r % 2 == 0 else list(reversed(order)):
                if side is pp_side:
                    assert peer is not None
                    side.next = 0
                    side.round(wrk, pp_duration)
                    peer.reblock(side.rounds[-1]["requests"] + CONNECTIONS)
                else:
                    side.round(wrk, plan.duration)
        for side in order:
            summarise(side.figure)
            side.figure.extra.update(
                setup_s=setup_s, start_s=start_s, library_tasks_per_project=tasks
            )
        sides["lib1"].figure.extra["warm_up"] = warm
    finally:
        for server in servers:
            server.stop()
        if peer is not None:
            peer.stop()
        monitor.close()
        with contextlib.suppress(Exception):
            suite_pg.drop_schema(SCHEMA)
    return rows(sides, pp_side, peer_reason, plan)


def rows(sides: dict[str, Side], pp: Side | None, peer_reason: str | None, plan: Plan) -> list[Row]:
    f = {name: side.figure for name, side in sides.items()}
    note = f"wrk -t1 -c{CONNECTIONS}, {plan.duration:g}s rounds, {plan.rounds} rounds"
    names = iter(row_names())
    out = []
    for suffix in ("1", "2", "2r"):
        name, _ = next(names)
        out.append(Row(GROUP, name, f["lib" + suffix], f["bare" + suffix], "report", note=note))
        name, target = next(names)
        out.append(
            Row(GROUP, name, f["lib" + suffix], f["commit" + suffix], target, 0.6, "min", note)
        )
    for suffix in ("2", "2r"):
        for side in ("lib", "bare", "commit"):
            name, _ = next(names)
            out.append(Row(GROUP, name, f[side + suffix], f[side + "1"], "report", note=note))
    peer_names = list(names)
    if pp is None:
        reason = peer_reason or "pocketpaw did not run"
        return out + [unavailable(GROUP, name, reason, target) for name, target in peer_names]
    ref = pp.figure
    p99_ok = f["lib1"].extra["p99_us_median"] <= ref.extra["p99_us_median"]
    peer_row = Row(
        GROUP,
        peer_names[0][0],
        f["lib1"],
        ref,
        PP_TARGET,
        10.0,
        "min",
        f"p99 {f['lib1'].extra['p99_us_median'] / 1000:.1f} ms vs "
        f"{ref.extra['p99_us_median'] / 1000:.1f} ms (p99 {'met' if p99_ok else 'missed'}); "
        + note,
    )
    if f["lib1"].median >= 10 * ref.median and not p99_ok:
        peer_row.bound = float("inf")  # the p99 half of the target decides
    out.append(peer_row)
    out.append(Row(GROUP, peer_names[1][0], f["lib2r"], ref, "report", note=note))
    return out
