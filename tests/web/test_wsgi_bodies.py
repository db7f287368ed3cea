"""How the adapters read what a server hands them: WSGI bodies, whatever the server does
with chunked framing, ASGI bodies in any number of messages, and the one decoding of
query strings and paths."""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_from_bytes, urlencode

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from web_harness import World, auth, authorize, configure_django, task_url

from deepwork_retry._core.inputs import check_id
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.web._asgi import Disconnected, read_body
from deepwork_retry.web._bodies import CAP, read_wsgi_body
from deepwork_retry.web._http import (
    BadRequestBody,
    BodyIncomplete,
    LengthRequired,
    check_path,
    page_options,
    parse_query,
    path_bytes,
    wsgi_path_bytes,
)


@pytest.fixture(scope="module")
def django_dev_server(world: World) -> Iterator[str]:
    """Django's own development server, which does not de-chunk request bodies."""
    configure_django()
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    from deepwork_retry.web.django import mount

    mount([], world.sync_service(), world.tokens, authorize)  # URLs: ROOT_URLCONF

    class Quiet(WSGIRequestHandler):  # type: ignore[misc]  # Django ships no type hints
        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet, allow_reuse_address=True)
    server.set_app(WSGIHandler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_chunked_body_a_server_does_not_dechunk_is_411_not_an_empty_body(
    django_dev_server: str, world: World
) -> None:
    """Behind a server that hands a chunked body over unread, the retry is refused, not
    acted on as if the client had sent no options."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    with httpx.Client(base_url=django_dev_server, timeout=10) as client:
        response = client.post(
            task_url(pid, tid, "/retry"),
            content=iter([b'{"budget":', b'"full"}']),
            headers=auth(),
        )
    assert (411, "application/json") == (response.status_code, response.headers["content-type"])
    assert {
        "detail": "This server cannot read a chunked request body; send it with Content-Length",
        "code": "length_required",
    } == response.json()
    assert before == world.snapshot(pid)
    # The same options with a length are applied (on a new connection: the dev
    # server leaves the unread chunks on the first one).
    with httpx.Client(base_url=django_dev_server, timeout=10) as client:
        with_length = client.post(
            task_url(pid, tid, "/retry"), content=b'{"budget":"full"}', headers=auth()
        )
    assert 200 == with_length.status_code
    assert "full" == world.memory.attempts(pid, tid)[-1].budget


# -- properties of the reader ----------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes a read, like a socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self.buffer = data
        self.offset = 0
        self.step = step

    @property
    def data(self) -> bytes:
        """What is left unread."""
        return self.buffer[self.offset :]

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.step if size < 0 else min(size, self.step)
        chunk = self.buffer[self.offset : self.offset + size]
        self.offset += len(chunk)
        return chunk


bodies = st.one_of(
    st.binary(max_size=200),
    # Around the cap; generated cheaply (Hypothesis is slow to draw 64 KiB of random bytes).
    st.builds(
        lambda head, n: head + b"x" * n, st.binary(max_size=8), st.integers(CAP - 11, CAP + 3)
    ),
)


@given(body=bodies, step=st.sampled_from([7, 1000, 70_000]), extra=st.binary(max_size=20))
def test_a_declared_length_is_read_exactly_and_never_past(
    body: bytes, step: int, extra: bytes
) -> None:
    """With Content-Length the reader returns the body up to CAP, however it trickles in,
    and never reads into what follows it on the connection."""
    stream = Trickle(body + extra, step)
    environ = {"CONTENT_LENGTH": str(len(body)), "wsgi.input": stream}
    assert body[:CAP] == read_wsgi_body(environ)
    assert (body[CAP:] + extra) == stream.data


@given(body=bodies, step=st.sampled_from([7, 1000, 70_000]))
def test_a_terminated_stream_is_read_to_its_end_up_to_cap(body: bytes, step: int) -> None:
    """A de-chunked stream (wsgi.input_terminated, no length) is read to EOF, up to CAP."""
    environ = {"wsgi.input_terminated": True, "wsgi.input": Trickle(body, step)}
    assert body[:CAP] == read_wsgi_body(environ)


@given(body=st.binary(min_size=1, max_size=300), cut=st.integers(0, 299))
def test_a_body_shorter_than_declared_is_never_returned(body: bytes, cut: int) -> None:
    """A body that ends before its Content-Length raises BodyIncomplete (nothing acted on)."""
    sent = body[: cut % len(body)]
    environ = {"CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(sent)}
    with pytest.raises(BodyIncomplete):
        read_wsgi_body(environ)


def test_chunked_without_a_dechunking_server_is_length_required() -> None:
    """Chunked framing with neither a length nor input_terminated is refused (411)."""
    environ = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": io.BytesIO(b"5\r\nhello")}
    with pytest.raises(LengthRequired):
        read_wsgi_body(environ)


@given(
    body=bodies,
    cuts=st.lists(st.integers(0, CAP + 20), max_size=4),
    gone=st.none() | st.integers(0, 5),
)
def test_an_asgi_body_is_read_from_its_messages_up_to_cap(
    body: bytes, cuts: list[int], gone: int | None
) -> None:
    """However the body is split into ``http.request`` messages, the reader returns it up
    to CAP and asks for no message past the one that reaches CAP; a disconnect before
    then raises Disconnected."""
    edges = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    parts = [body[a:b] for a, b in itertools.pairwise(edges)] or [b""]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": part, "more_body": n < len(parts) - 1}
        for n, part in enumerate(parts)
    ]
    if gone is not None and gone < len(messages):
        messages[gone:] = [{"type": "http.disconnect"}]
    sent = iter(messages)
    taken: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        taken.append(next(sent))
        return taken[-1]

    # Messages the reader needs: up to the one where the body reaches CAP, or the last.
    needed, size = 0, 0
    for needed, part in enumerate(parts, 1):  # noqa: B007 - its value after the loop is used
        size += len(part)
        if size >= CAP:
            break
    if gone is not None and gone < needed:
        with pytest.raises(Disconnected):
            asyncio.run(read_body(receive))
        assert gone + 1 == len(taken)
        return
    assert body[:CAP] == asyncio.run(read_body(receive))
    assert needed == len(taken)


# -- properties of the query decoding ------------------------------------------------------


@given(
    pairs=st.lists(st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=10)), max_size=5)
)
def test_any_encoded_text_query_decodes_to_what_was_sent(pairs: list[tuple[str, str]]) -> None:
    """Text pairs, form- or percent-encoded, decode to exactly themselves."""
    assert pairs == parse_query(urlencode(pairs))
    raw = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    assert pairs == parse_query(raw.encode("ascii"))


@given(value=st.binary(min_size=1, max_size=12))
def test_a_query_value_is_accepted_exactly_when_it_is_utf8(value: bytes) -> None:
    """``after`` made of any bytes is read as that text when UTF-8, and refused (422) otherwise."""
    query = dict(parse_query("after=" + quote_from_bytes(value, safe="")))
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(BadRequestBody, match="Query string is not valid UTF-8"):
            page_options(query)
    else:
        assert text == query["after"]
        try:
            check_id("task", text)
        except InvalidInput:  # valid text, but no task id
            with pytest.raises(BadRequestBody, match="after must be a task id"):
                page_options(query)
        else:
            assert text == page_options(query).after


@given(raw=st.binary(max_size=12))
def test_a_path_is_refused_exactly_when_its_bytes_are_not_utf8(raw: bytes) -> None:
    """The path check passes a percent-encoded path iff the bytes it names are UTF-8, and
    reads the same bytes from a WSGI server's raw target as from its latin-1 PATH_INFO."""
    target = "/p/" + quote_from_bytes(raw, safe="")
    found = path_bytes(target + "?after=x")
    environ_raw = {"RAW_URI": target, "PATH_INFO": "/p/\ufffd"}
    environ_pep3333 = {"SCRIPT_NAME": "/p", "PATH_INFO": "/" + raw.decode("latin-1")}
    expected = b"/p/" + raw
    assert [expected] * 3 == [
        found,
        wsgi_path_bytes(environ_raw),
        wsgi_path_bytes(environ_pep3333),
    ]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(BadRequestBody, match="Request path is not valid UTF-8"):
            check_path(found)
    else:
        check_path(found)


def test_a_content_length_of_other_digits_is_no_length() -> None:
    """Digits other than ASCII's (which ``int`` would read, or refuse with an error) are
    not a declared length: the body is read to its end under the cap, never a 500."""
    from deepwork_retry.web._bodies import _declared_length

    for value in ("\u00b2", "\u0661\u0662", "12\u00b9", " 7 "):
        assert (None if value.strip() != "7" else 7) == _declared_length({"CONTENT_LENGTH": value})
