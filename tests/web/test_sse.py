"""The project event stream (Server-Sent Events) on every adapter, over real servers.

Each adapter is served here on its own loopback port (Django twice: under WSGI
by werkzeug and under ASGI by uvicorn), over the web tests' shared world. A
test reads the stream as a browser would, frame by frame, while the world's
executor moves tasks; after every test, every stream slot is back (the
per-principal bound is released however the client went away).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web_harness import (
    ADAPTERS,
    ALICE,
    BOB,
    CAROL,
    STREAMS,
    World,
    _start_server,
    auth,
    django_api,
    seg,
    serve_asgi,
    task_url,
    url,
)

from deepwork_retry._core.results import progress_json
from deepwork_retry.web import AsyncRetryAPI, RetryAPI

SERVERS = [*ADAPTERS, "django-asgi"]

BOUND = 15.0
"""Seconds within which anything asked of a stream must have happened (a generous
functional bound on a loaded machine, never a timing claim)."""


@attrs.frozen
class Served:
    adapter: str
    url: str
    api: AsyncRetryAPI | RetryAPI


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest, world: World) -> Iterator[Served]:
    adapter: str = request.param
    if adapter == "django-asgi":
        from django.core.asgi import get_asgi_application

        api: AsyncRetryAPI | RetryAPI = django_api(world)
        base, stop = serve_asgi(get_asgi_application())
    else:
        base, stop = _start_server(adapter, world)
        api = world.apis[adapter]
    try:
        yield Served(adapter, base, api)
    finally:
        api.close_streams()
        stop()


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _slots_released(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "served" not in request.fixturenames:
        return
    slots = request.getfixturevalue("served").api.stream_slots
    _eventually(lambda: slots.open() == 0, f"stream slots still taken: {slots.open()}")


# -- a client that reads frames as a browser does ------------------------------------------


@attrs.frozen
class Frame:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: str | None = None
    comment: str | None = None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class Stream:
    """One open event stream; :meth:`close` drops the connection at once."""

    def __init__(self, client: httpx.Client, path: str, headers: dict[str, str]) -> None:
        self._context = client.stream("GET", path, headers=headers)
        self.response = self._context.__enter__()
        self._lines = self.response.iter_lines()

    def frame(self) -> Frame:
        """The next frame (a comment line alone is a frame too); ``StopIteration`` at the end."""
        fields: dict[str, str] = {}
        for line in self._lines:
            if line == "":
                if fields:
                    return Frame(**fields)
                continue
            if line.startswith(":"):
                return Frame(comment=line[1:].strip())
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        raise StopIteration

    def until(self, predicate: Callable[[Frame], bool]) -> list[Frame]:
        """Frames up to and including the first that satisfies ``predicate``."""
        found = []
        while True:
            frame = self.frame()
            found.append(frame)
            if predicate(frame):
                return found

    def close(self) -> None:
        self._context.__exit__(None, None, None)


def events_path(project_id: str) -> str:
    return url("projects", seg(project_id), "events")


def open_stream(
    client: httpx.Client,
    project_id: str,
    *,
    token: str = ALICE,
    last: str | None = None,
    query: str = "",
    patient: bool = True,
) -> Stream:
    """An open stream, its ``retry:`` hint read. A ``patient`` client, as a browser,
    tries again after a 429's Retry-After (a stream it dropped just now may still
    hold its slot until the server notices)."""
    headers = auth(token)
    if last is not None:
        headers["Last-Event-ID"] = last
    deadline = time.monotonic() + BOUND
    while True:
        stream = Stream(client, events_path(project_id) + query, headers)
        response = stream.response
        if response.status_code == 200:
            break
        response.read()
        stream.close()
        if response.status_code != 429 or not patient or time.monotonic() > deadline:
            raise AssertionError(f"{response.status_code} {response.text}")
        time.sleep(0.05)  # shorter than Retry-After: the tests' servers poll quickly
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    first = stream.frame()
    assert first == Frame(retry=str(STREAMS.retry_ms))
    return stream


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=BOUND) as found:
        yield found


def stored(world: World, project_id: str) -> list[dict[str, Any]]:
    return [e.to_json() for e in world.memory.events(project_id, limit=1000)]


def is_event(frame: Frame) -> bool:
    return frame.id is not None


# -- the stream follows the project -------------------------------------------------------


def test_stream_receives_events_as_tasks_move(client: httpx.Client, world: World) -> None:
    pid = world.project()
    stream = open_stream(client, pid)
    try:
        world.blocked(pid, "t1")
        world.done(pid, "t2")
        want = stored(world, pid)
        assert want, "the moves made no events"
        last = str(want[-1]["seq"])
        frames = stream.until(lambda f: f.id == last)
        got = [f for f in frames if is_event(f)]
        assert [f.json() for f in got] == want
        assert [(f.id, f.event) for f in got] == [(str(e["seq"]), e["type"]) for e in want]
        # The batch ends with the project's counters, as they stand after it.
        [progress] = stream.until(lambda f: f.event == "progress")[-1:]
        assert progress.id is None
        assert progress.json() == {
            "project_id": pid,
            "progress": progress_json(world.memory.progress(pid)),
        }
    finally:
        stream.close()


def test_progress_frame_follows_each_batch(client: httpx.Client, world: World) -> None:
    pid = world.project()
    world.done(pid, "t1")
    stream = open_stream(client, pid)
    try:
        frames = stream.until(lambda f: f.event == "progress")
        assert all(is_event(f) for f in frames[:-1])
        assert [f.json() for f in frames[:-1]] == stored(world, pid)
        assert frames[-1].json()["progress"]["done"] == 1
    finally:
        stream.close()


def test_heartbeats_arrive_when_idle(client: httpx.Client, world: World) -> None:
    pid = world.project()
    stream = open_stream(client, pid)
    try:
        assert stream.frame().event == "progress"  # the counters, at once
        beats = [stream.frame() for _ in range(3)]
        assert beats == [Frame(comment="keepalive")] * 3
    finally:
        stream.close()


# -- resuming ------------------------------------------------------------------------------


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sessions=st.lists(
        st.tuples(st.integers(0, 6), st.booleans(), st.booleans()), min_size=1, max_size=4
    )
)
def test_reconnecting_with_last_event_id_loses_and_repeats_nothing(
    client: httpx.Client, world: World, sessions: list[tuple[int, bool, bool]]
) -> None:
    """Read some frames, drop the connection, move a task meanwhile (or not), resume
    with ``Last-Event-ID`` (or ``?after=``); in the end every event arrived once, in order."""
    pid = world.project()
    world.blocked(pid, "t1")
    seen: list[dict[str, Any]] = []
    for number, (reads, header, move) in enumerate(sessions):
        last = str(seen[-1]["seq"]) if seen else None
        if last is None or header:
            stream = open_stream(client, pid, last=last)
        else:
            stream = open_stream(client, pid, query=f"?after={last}")
        try:
            for _ in range(reads):
                frame = stream.frame()
                if is_event(frame):
                    seen.append(frame.json())
        finally:
            stream.close()
        if move:
            world.done(pid, f"d{number}")
    want = stored(world, pid)
    stream = open_stream(client, pid, last=str(seen[-1]["seq"]) if seen else None)
    try:
        if not seen or seen[-1]["seq"] < want[-1]["seq"]:
            final = str(want[-1]["seq"])
            seen += [f.json() for f in stream.until(lambda f: f.id == final) if is_event(f)]
    finally:
        stream.close()
    assert seen == want


def test_last_event_id_wins_over_after(client: httpx.Client, world: World) -> None:
    pid = world.project()
    world.blocked(pid, "t1")
    want = stored(world, pid)
    stream = open_stream(client, pid, last="3", query="?after=1")
    try:
        assert stream.frame().id == "4"
    finally:
        stream.close()
    assert want[3]["seq"] == 4


def test_resuming_after_the_last_event_waits_for_the_next(
    client: httpx.Client, world: World
) -> None:
    pid = world.project()
    world.done(pid, "t1")
    last = str(stored(world, pid)[-1]["seq"])
    stream = open_stream(client, pid, last=last)
    try:
        assert stream.frame().event == "progress"
        assert stream.frame() == Frame(comment="keepalive")
        world.done(pid, "t2")
        first = stream.frame()
        assert first.id == str(int(last) + 1)
    finally:
        stream.close()


# -- refusals, like the retry route's --------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": f"Bearer {BOB}"},  # may not see a p- project: 404
    ],
    ids=["no-token", "not-bearer", "unknown-token", "not-visible"],
)
def test_auth_is_the_retry_routes(
    client: httpx.Client, world: World, headers: dict[str, str]
) -> None:
    pid = world.project()
    world.blocked(pid, "t1")
    answer = client.get(events_path(pid), headers=headers)
    retry = client.post(task_url(pid, "t1", "/retry"), headers=headers)
    assert answer.status_code == retry.status_code in (401, 404)
    assert answer.json() == retry.json()
    assert answer.headers.get("www-authenticate") == retry.headers.get("www-authenticate")


def test_unknown_project_is_404(client: httpx.Client) -> None:
    answer = client.get(events_path("p-no-such-project"), headers=auth())
    assert answer.status_code == 404
    assert answer.json()["code"] == "project_not_found"


def test_bob_streams_his_own_projects(client: httpx.Client, world: World) -> None:
    pid = world.project(prefix="bob-")
    world.done(pid, "t1")
    stream = open_stream(client, pid, token=BOB)
    try:
        assert stream.frame().id == "1"
    finally:
        stream.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "2x", "99999999999999999999", "\uff11"])
def test_bad_last_event_id_is_400(client: httpx.Client, world: World, value: str) -> None:
    pid = world.project()
    answers = [client.get(events_path(pid), headers=auth(), params={"after": value})]
    if value.isascii():  # a header's value is ASCII on the wire
        answers.append(client.get(events_path(pid), headers={**auth(), "Last-Event-ID": value}))
    for answer in answers:
        assert answer.status_code == 400
        assert answer.json() == {
            "detail": "Last-Event-ID (or after) must be an event number: an integer >= 0",
            "code": "invalid_last_event_id",
        }


def test_unknown_query_parameter_is_422(client: httpx.Client, world: World) -> None:
    pid = world.project()
    answer = client.get(events_path(pid), headers=auth(), params={"limit": "5"})
    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_input"


def test_storage_down_is_503_before_the_stream(client: httpx.Client, world: World) -> None:
    pid = world.project()
    world.storage.down = True
    answer = client.get(events_path(pid), headers=auth())
    assert answer.status_code == 503
    assert answer.json()["code"] == "storage_unavailable"
    assert "retry-after" in answer.headers


def test_a_storage_outage_mid_stream_keeps_the_stream(client: httpx.Client, world: World) -> None:
    pid = world.project()
    stream = open_stream(client, pid)
    try:
        assert stream.frame().event == "progress"
        world.storage.down = True
        assert stream.frame() == Frame(comment="keepalive")
        world.storage.down = False
        world.done(pid, "t1")
        assert stream.frame().id == "1"
    finally:
        world.storage.down = False
        stream.close()


# -- the bound on open streams ----------------------------------------------------------------


def test_one_stream_too_many_is_429_and_a_closed_one_frees_its_slot(
    client: httpx.Client, served: Served, world: World
) -> None:
    pid = world.project()
    streams = [
        open_stream(client, pid, token=CAROL, patient=False) for _ in range(STREAMS.max_streams)
    ]
    try:
        refused = client.get(events_path(pid), headers=auth(CAROL))
        assert refused.status_code == 429
        assert refused.json() == {
            "detail": f"Too many event streams open for this token (at most {STREAMS.max_streams})",
            "code": "too_many_streams",
        }
        assert refused.headers["retry-after"].isdigit()
        # Another principal is not held back by carol's streams.
        open_stream(client, pid).close()
        streams.pop().close()
        _eventually(
            lambda: served.api.stream_slots.open("carol") < STREAMS.max_streams,
            "the closed stream's slot was not freed",
        )
        streams.append(open_stream(client, pid, token=CAROL))
    finally:
        for stream in streams:
            stream.close()


def _raw_request(base: str, path: str, token: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=BOUND)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


def _read_until_first_event(sock: socket.socket, base: str, path: str) -> socket.socket:
    """Read carol's stream on ``sock`` up to its first event, as a patient client: a 429
    is tried again. A client that vanished at once may still have its request taken
    up by the server after the last check found every slot free (its bytes were
    sent), holding a slot until the server sees it gone."""
    deadline = time.monotonic() + BOUND
    while True:
        received = b""
        while b"id: 1" not in received and not received.startswith(b"HTTP/1.1 429"):
            chunk = sock.recv(4096)
            assert chunk, f"the stream ended early, after {received!r}"
            received += chunk
        if b"id: 1" in received:
            return sock
        assert time.monotonic() < deadline, "carol's slots were never freed"
        sock.close()
        time.sleep(0.05)
        sock = _raw_request(base, path, CAROL)


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ways=st.lists(
        st.sampled_from(["at-once", "after-head", "after-frames", "reset"]),
        min_size=1,
        max_size=4,
    )
)
def test_slots_are_released_however_the_client_goes(
    served: Served, world: World, ways: list[str]
) -> None:
    """Clients that vanish before the answer, after its head, mid-stream, or with a
    reset: every slot they held comes back, and carol can open her four again."""
    pid = world.project()
    world.done(pid, "t1")
    path = events_path(pid)
    for way in ways:
        sock = _raw_request(served.url, path, CAROL)
        if way == "after-head":
            assert sock.recv(1).startswith(b"H")
        elif way == "after-frames":
            sock = _read_until_first_event(sock, served.url, path)
        elif way == "reset":
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        sock.close()
    slots = served.api.stream_slots
    _eventually(lambda: slots.open("carol") == 0, "a vanished client's slot was kept")


# -- a slow reader holds back no one else -------------------------------------------------------


def test_clients_that_do_not_read_hold_back_no_other_request(
    client: httpx.Client, served: Served, world: World
) -> None:
    pid = world.project()
    sleepers = [_raw_request(served.url, events_path(pid), CAROL) for _ in range(3)]
    try:
        for number in range(20):
            world.done(pid, f"t{number}")  # frames pile up for the sleepers
        stream = open_stream(client, pid)
        try:
            world.blocked(pid, "b1")
            # The client's timeout is the bound: each answer comes within it.
            assert client.get(url("projects", seg(pid), "progress"), headers=auth()).is_success
            retried = client.post(task_url(pid, "b1", "/retry"), headers=auth())
            assert retried.status_code == 200
            last = str(stored(world, pid)[-1]["seq"])
            stream.until(lambda f: f.id == last)
        finally:
            stream.close()
    finally:
        for sock in sleepers:
            sock.close()


# -- the end of a stream ----------------------------------------------------------------------


def test_closing_the_streams_ends_them_cleanly(
    client: httpx.Client, served: Served, world: World
) -> None:
    """What a server shutting down does: every open stream ends, as a complete response."""
    pid = world.project()
    stream = open_stream(client, pid)
    try:
        served.api.close_streams()
        result: list[str] = []
        _ended(stream, result)
        assert result == ["ended"]
    finally:
        stream.close()
        served.api.streams_closing = False


def _ended(stream: Stream, result: list[str]) -> None:
    try:
        while True:
            stream.frame()
    except StopIteration:
        result.append("ended")
    except httpx.HTTPError as exc:
        result.append(f"failed: {exc!r}")


@pytest.mark.parametrize("adapter", ["starlette", "aiohttp"])
def test_a_server_shutting_down_ends_its_streams(world: World, adapter: str) -> None:
    """uvicorn waits for open responses before it stops, aiohttp runs its shutdown
    hooks: either way, the streams end and the server stops."""
    base, stop = _start_server(adapter, world)
    api = world.apis[adapter]
    if adapter == "starlette":
        api_stop = stop

        def stop() -> None:  # what a host's signal handler does before uvicorn stops
            api.close_streams()
            api_stop()

    pid = world.project()
    result: list[str] = []
    with httpx.Client(base_url=base, timeout=BOUND) as http:
        stream = open_stream(http, pid)
        reader = threading.Thread(target=_ended, args=(stream, result))
        reader.start()
        stopped = threading.Thread(target=stop)
        stopped.start()
        stopped.join(BOUND)
        reader.join(BOUND)
        stream.close()
    assert not stopped.is_alive(), "the server did not stop"
    assert result == ["ended"]
    assert api.stream_slots.open() == 0


# -- the framework-free stream, without a server ---------------------------------------------


def _sync_api(world: World, **options: Any) -> RetryAPI:
    from web_harness import authorize

    from deepwork_retry.web import StreamOptions

    streams = StreamOptions(**{"poll_interval": 0.01, "heartbeat": 0.05, **options})
    return RetryAPI(world.sync_service(), world.tokens, authorize, streams=streams)


def _get(api: RetryAPI, project_id: str, method: str = "GET") -> Any:
    from deepwork_retry.web import ApiRequest

    return api.handle(
        ApiRequest(method=method, path=f"/projects/{project_id}/events", headers=auth())
    )


def test_a_stream_ends_after_its_lifetime_and_frees_its_slot(world: World) -> None:
    api = _sync_api(world, max_lifetime=0.2)
    pid = world.project()
    world.done(pid, "t1")
    answer = _get(api, pid)
    assert api.stream_slots.open("alice") == 1
    chunks = list(answer.stream)  # ends by itself
    assert chunks[0] == b"retry: 2000\n\n"
    assert chunks[1].startswith(b"id: 1\nevent: ")
    assert b": keepalive\n\n" in chunks
    assert api.stream_slots.open("alice") == 0


def test_a_stream_never_read_frees_its_slot_when_closed(world: World) -> None:
    api = _sync_api(world)
    pid = world.project()
    answer = _get(api, pid)
    assert api.stream_slots.open("alice") == 1
    answer.stream.close()
    answer.stream.close()  # twice: harmless, the slot is freed once
    assert api.stream_slots.open("alice") == 0
    assert list(answer.stream) == []


def test_head_answers_the_stream_headers_and_holds_no_slot(world: World) -> None:
    api = _sync_api(world)
    pid = world.project()
    answer = _get(api, pid, "HEAD")
    assert (answer.status, answer.stream, answer.body) == (200, None, b"")
    assert ("Content-Type", "text/event-stream; charset=utf-8") in answer.headers
    assert api.stream_slots.open() == 0


def test_a_full_batch_is_followed_at_once_by_the_next(world: World) -> None:
    api = _sync_api(world, batch=2, heartbeat=60.0)
    pid = world.project()
    for number in range(3):
        world.done(pid, f"t{number}")
    want = [e.seq for e in world.memory.events(pid, limit=1000)]
    answer = _get(api, pid)
    seqs: list[int] = []
    progress = 0
    for chunk in answer.stream:
        if chunk.startswith(b"id: "):
            seqs.append(int(chunk.split(b"\n")[0][4:]))
        elif chunk.startswith(b"event: progress"):
            progress += 1
        if seqs and seqs[-1] == want[-1] and chunk.startswith(b"event: progress"):
            break
    answer.stream.close()
    assert seqs == want
    assert progress == (len(want) + 1) // 2


# -- defects found in review -------------------------------------------------------------------


def test_head_answers_200_with_the_stream_headers_only(
    client: httpx.Client, world: World, served: Served
) -> None:
    pid = world.project()
    world.done(pid, "t1")
    answer = client.head(events_path(pid), headers=auth())
    assert answer.status_code == 200, answer.headers
    assert answer.headers.get_list("content-type") == ["text/event-stream; charset=utf-8"]
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.content == b""
    assert served.api.stream_slots.open() == 0


def test_a_resumed_stream_with_nothing_new_sends_the_counters_at_once(
    client: httpx.Client, world: World
) -> None:
    pid = world.project()
    world.done(pid, "t1")
    last = stored(world, pid)[-1]["seq"]
    stream = open_stream(client, pid, last=str(last))
    try:
        frame = stream.frame()
        assert frame.event == "progress", frame
        assert frame.id is None
        want = progress_json(world.sync_service().progress(pid))
        assert frame.json() == {"project_id": pid, "progress": want}
    finally:
        stream.close()


@pytest.mark.parametrize("query", ["?after=55&after=1", "?after=1&after=1", "?after=&after=3"])
def test_a_repeated_query_parameter_is_422(client: httpx.Client, world: World, query: str) -> None:
    pid = world.project()
    # Streamed: were it answered 200, reading the body would wait for the stream's end.
    with client.stream("GET", events_path(pid) + query, headers=auth()) as answer:
        assert answer.status_code == 422
        answer.read()
    assert answer.json()["code"] == "invalid_input"
    assert "after" in answer.json()["detail"]
