"""HTTP benchmarks with wrk: the adapters against bare endpoints, and against pocketpaw.

Each server runs in its own process on 127.0.0.1 (one uvicorn worker); wrk
runs with one thread and a fixed number of connections, so on two cores the
server has one core and the load generator the other. Rounds alternate
between the two servers of a comparison; every request retries a different,
still-blocked task (``retry.lua``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import Figure, Row, percentile, unavailable

HERE = Path(__file__).resolve().parent
LUA = HERE / "retry.lua"
TOKEN = "bench-token-0123456789abcdef"
TEMPLATE = "/api/deep-work/projects/p/tasks/%s/retry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not up after {timeout:g}s")


class Server:
    """A server process of ``http_server.py`` (or any command) on a fresh port."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.port = port
        self.log = log
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=HERE,
            start_new_session=True,
        )
        try:
            wait_port(port, self.proc, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.handle.close()


def lib_server(kind: str, tasks: int, logs: Path, db: Path | None = None) -> Server:
    port = free_port()
    argv = [sys.executable, str(HERE / "http_server.py"), kind, str(port), str(tasks), TOKEN]
    if db is not None:
        argv.append(str(db))
    return Server(argv, port, logs / f"{kind}.log")


def ensure_wrk() -> str | None:
    """The wrk binary, installed with apt-get when missing; ``None`` if it cannot be had."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    return shutil.which("wrk")


def run_wrk(
    wrk: str,
    server: Server,
    *,
    first: int,
    count: int,
    duration: float,
    connections: int,
    token: str = TOKEN,
    template: str = TEMPLATE,
    ids_file: Path | None = None,
) -> dict[str, Any]:
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        server.base,
        "--",
        template,
        str(first),
        str(count),
        token,
    ]
    if ids_file is not None:
        argv.append(str(ids_file))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["exhausted"] = result["requests"] >= count
    return result


class Side:
    """One server of a comparison, with the next unused task number."""

    def __init__(self, figure: Figure, server: Server, **wrk_args: Any) -> None:
        self.figure = figure
        self.server = server
        self.next = 0
        self.wrk_args = wrk_args
        self.rounds: list[dict[str, Any]] = []
        figure.extra["rounds"] = self.rounds

    def round(self, wrk: str, duration: float, connections: int, budget: int) -> None:
        result = run_wrk(
            wrk,
            self.server,
            first=self.next,
            count=budget,
            duration=duration,
            connections=connections,
            **self.wrk_args,
        )
        self.next += result["requests"] + connections
        self.rounds.append(result)
        self.figure.samples.append(result["rps"])


def finish(figure: Figure) -> None:
    rounds = figure.extra["rounds"]
    figure.extra["p99_us_median"] = percentile([r["p99_us"] for r in rounds], 50)
    figure.extra["p50_us_median"] = percentile([r["p50_us"] for r in rounds], 50)
    figure.extra["non2xx"] = sum(r["non2xx"] for r in rounds)
    figure.extra["socket_errors"] = sum(r["errors"] for r in rounds)
    figure.extra["exhausted_rounds"] = sum(1 for r in rounds if r["exhausted"])


def alternate_http(
    wrk: str, a: Side, b: Side, rounds: int, duration: float, connections: int, budget: int
) -> None:
    for r in range(rounds):
        for side in (a, b) if r % 2 == 0 else (b, a):
            side.round(wrk, duration, connections, budget)
    finish(a.figure)
    finish(b.figure)


def adapters(rounds: int, duration: float, connections: int, logs: Path) -> list[Row]:
    wrk = ensure_wrk()
    if wrk is None:
        reason = "wrk could not be installed"
        return [
            unavailable("http", "starlette adapter vs bare starlette", reason, "≥ 0.6x"),
            unavailable("http", "fastapi adapter vs bare fastapi", reason, "≥ 1.0x"),
        ]
    rows = []
    # Enough blocked tasks for every round at well above the expected rate.
    budget = int(20_000 * duration)
    tasks = budget * rounds
    for framework, bound in (("starlette", 0.6), ("fastapi", 1.0)):
        lib_srv = lib_server(f"{framework}-lib", tasks, logs)
        bare_srv = lib_server(f"{framework}-bare", 0, logs)
        try:
            lib = Figure(f"{framework} adapter, in-memory storage", "req/s")
            ref = Figure(f"bare {framework} endpoint (Bearer check, ~300-byte JSON)", "req/s")
            alternate_http(
                wrk,
                Side(lib, lib_srv),
                Side(ref, bare_srv),
                rounds,
                duration,
                connections,
                budget,
            )
        finally:
            lib_srv.stop()
            bare_srv.stop()
        rows.append(
            Row(
                "http",
                f"{framework} adapter vs bare {framework} (uvicorn)",
                lib,
                ref,
                target=f"≥ {bound:g}x",
                bound=bound,
                sense="min",
                note=f"wrk -t1 -c{connections}, {duration:g}s rounds",
            )
        )
    return rows


# -- pocketpaw -------------------------------------------------------------------------------
PP_TEMPLATE = "/api/deep-work/projects/{project}/tasks/%s/retry"


def _pp_block(client: Any, ids: list[str]) -> None:
    for tid in ids:
        reply = client.post(f"/api/mission-control/tasks/{tid}/status", json={"status": "blocked"})
        reply.raise_for_status()


def pocketpaw(
    rounds: int,
    duration: float,
    connections: int,
    tasks: int,
    python: Path | str,
    logs: Path,
    scratch: Path,
) -> list[Row]:
    """The demo-like server (Starlette adapter, SQLite) against pocketpaw's ``/retry``."""
    name = "demo-like server vs pocketpaw 0.4.18 /retry"
    target = "≥ 10x req/s, p99 ≤"
    if isinstance(python, str):
        return [unavailable("peers", name, python, target)]
    wrk = ensure_wrk()
    if wrk is None:
        return [unavailable("peers", name, "wrk could not be installed", target)]
    import httpx

    home = scratch / "pocketpaw-home"
    (home / ".pocketpaw").mkdir(parents=True, exist_ok=True)
    # A fresh update-check cache: pocketpaw then has no reason to call out.
    (home / ".pocketpaw" / ".update_check").write_text(
        json.dumps({"ts": time.time(), "latest": "0.4.18"})
    )
    env = {**os.environ, "HOME": str(home)}
    # Its access token, made the way pocketpaw makes it on first use.
    token = subprocess.run(
        [str(python), "-c", "from pocketpaw.config import get_access_token as t; print(t())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout.strip()
    if not token:
        return [unavailable("peers", name, "pocketpaw made no access token", target)]
    port = free_port()
    try:
        peer = Server(
            [str(python), str(HERE / "peers" / "pocketpaw_serve.py"), str(port)],
            port,
            logs / "pocketpaw.log",
            env=env,
        )
    except RuntimeError as exc:
        return [unavailable("peers", name, f"pocketpaw did not start: {exc}", target)]
    ours: Server | None = None
    try:
        client = httpx.Client(
            base_url=peer.base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        mc = "/api/mission-control"
        project = client.post(f"{mc}/projects", json={"title": "bench"}).json()["project"]["id"]
        client.post(f"{mc}/agents", json={"name": "bench-agent", "role": "worker"})
        ids = []
        t0 = time.perf_counter()
        for i in range(tasks):
            reply = client.post(f"{mc}/tasks", json={"title": f"task {i}", "project_id": project})
            reply.raise_for_status()
            ids.append(reply.json()["task"]["id"])
        _pp_block(client, ids)
        built = time.perf_counter() - t0
        template = PP_TEMPLATE.format(project=project)
        probe = client.post(template % ids[0])
        if probe.status_code != 200:
            return [
                unavailable(
                    "peers",
                    name,
                    f"pocketpaw /retry answered {probe.status_code}: {probe.text[:80]}",
                    target,
                )
            ]
        _pp_block(client, ids[:1])
        ids_file = scratch / "pocketpaw-ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        ours = lib_server("demo-sqlite", int(4000 * duration) * rounds, logs, scratch / "demo.db")
        lib = Figure("demo-like server: Starlette adapter, SQLite FULL", "req/s")
        ref = Figure(f"pocketpaw serve /retry ({tasks} tasks)", "req/s", extra={"build_s": built})
        ours_side = Side(lib, ours)
        peer_side = Side(ref, peer, token=token, template=template, ids_file=ids_file)
        # Its cost per retry grows with its task file: keep each round within its tasks.
        calib = run_wrk(
            wrk, peer, first=0, count=tasks, duration=1, connections=connections,
            token=token, template=template, ids_file=ids_file,
        )  # fmt: skip
        _pp_block(client, ids[: calib["requests"] + connections])
        peer_duration = max(1.0, min(duration, 0.7 * tasks / max(calib["rps"], 1.0)))
        for r in range(rounds):
            for side in (ours_side, peer_side) if r % 2 == 0 else (peer_side, ours_side):
                if side is peer_side:
                    side.next = 0
                    side.round(wrk, peer_duration, connections, tasks)
                    used = side.rounds[-1]["requests"] + connections
                    _pp_block(client, ids[:used])
                else:
                    side.round(wrk, duration, connections, int(4000 * duration))
        finish(lib)
        finish(ref)
        ref.extra["round_seconds"] = peer_duration
    except (httpx.HTTPError, KeyError, ValueError, OSError, subprocess.SubprocessError) as exc:
        return [unavailable("peers", name, f"{type(exc).__name__}: {exc}"[:120], target)]
    finally:
        peer.stop()
        if ours is not None:
            ours.stop()
    rps_ok = lib.median >= 10 * ref.median
    p99_ok = lib.extra["p99_us_median"] <= ref.extra["p99_us_median"]
    row = Row(
        "peers",
        name,
        lib,
        ref,
        target=target,
        bound=10.0,
        sense="min",
        note=f"p99 {lib.extra['p99_us_median'] / 1000:.1f} ms vs "
        f"{ref.extra['p99_us_median'] / 1000:.1f} ms (p99 {'met' if p99_ok else 'missed'}); "
        f"wrk -t1 -c{connections}",
    )
    if rps_ok and not p99_ok:
        row.bound = float("inf")  # the p99 half of the target decides
    return [row]
