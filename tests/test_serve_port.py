"""`deepwork-retry serve` on a port that is taken stops before it seeds or prints anything."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deepwork_retry.cli import ExitCode, main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve_command(port: int, db: Path) -> list[str]:
    return [sys.executable, "-m", "deepwork_retry", "serve", "--port", str(port), "--db", str(db)]


def _projects(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM projects ORDER BY id")]
    finally:
        conn.close()


def test_taken_port_fails_before_seeding_or_printing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the port held by another socket, serve exits 1 naming the address, prints no token
    or curl, and creates no database."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["serve", "--port", str(port), "--db", str(tmp_path / "demo" / "demo.db")])
    out, err = capsys.readouterr()
    assert (ExitCode.FAILED, "") == (code, out)
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "choose another --port" in err
    assert [] == list(tmp_path.iterdir())


class _Running:
    def __init__(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        self.proc = proc
        self.values = dict(line.split("=", 1) for line in lines if "=" in line and " " not in line)


@pytest.fixture
def first_server(tmp_path: Path) -> Iterator[tuple[_Running, int, Path]]:
    port, db = _free_port(), tmp_path / "demo.db"
    proc = subprocess.Popen(
        _serve_command(port, db),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if "Uvicorn running on" in line:
            break
    else:  # pragma: no cover - only when the server hangs
        proc.kill()
    try:
        assert "Uvicorn running on" in lines[-1], lines
        yield _Running(proc, lines), port, db
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_second_serve_on_the_same_port_changes_nothing(
    first_server: tuple[_Running, int, Path],
) -> None:
    """A second `serve` on the demo server's port exits non-zero within seconds, prints no token
    or curl, leaves the database's projects as they were, and the first server still answers
    its own token."""
    first, port, db = first_server
    before = _projects(db)
    second = subprocess.run(
        _serve_command(port, db), capture_output=True, text=True, timeout=30, check=False
    )
    assert (ExitCode.FAILED, "") == (second.returncode, second.stdout)
    assert ([], []) == (
        [w for w in ("TOKEN", "curl") if w in second.stderr],
        [w for w in ("TOKEN", "curl") if w in second.stdout],
    )
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert before == _projects(db)
    project = first.values["PROJECT_ID"]
    answer = httpx.get(
        f"http://127.0.0.1:{port}/api/deep-work/projects/{project}/progress",
        headers={"Authorization": f"Bearer {first.values['TOKEN']}"},
        timeout=10,
    )
    assert 200 == answer.status_code


def test_connections_accepted_on_the_serve_socket_send_without_delay() -> None:
    """The socket serve listens on is made for TCP by its protocol number too, so the event
    loop turns Nagle's algorithm off on each connection it accepts, as it does on the sockets
    uvicorn binds itself: else a response written in two parts (head, body) waits for the
    client's delayed ACK, about 40 ms per request on a kept-alive connection."""
    import asyncio

    from deepwork_retry.server import listen

    sock = listen("127.0.0.1", 0)
    seen: dict[str, int] = {}

    async def accept_one() -> None:
        accepted = asyncio.Event()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                seen["nodelay"] = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                accepted.set()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await asyncio.wait_for(accepted.wait(), 10)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    try:
        asyncio.run(accept_one())
    finally:
        sock.close()
    assert seen["nodelay"] != 0
