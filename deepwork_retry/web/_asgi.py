"""What the Starlette and FastAPI adapters share: request and response translation.

Imported only by those adapters, after their framework imported cleanly.

The request is read straight from the ASGI scope (header names there are
already lower-case bytes, the query string is raw bytes) rather than through
Starlette's ``Request``, and the response is written as the two ASGI messages
it is, so a request costs the API's own work plus little more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from deepwork_retry.web._bodies import CAP, read_capped_stream
from deepwork_retry.web._http import (
    ANY_PATH,
    JSON,
    ApiRequest,
    ApiResponse,
    BodyIncomplete,
    BodyTimeout,
    content_type,
    error_response,
    other_headers,
    parse_query,
    path_bytes,
)
from deepwork_retry.web._sse import EVENT_STREAM

log = logging.getLogger("deepwork_retry.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CONTENT_TYPE = (b"content-type", JSON.encode("latin-1"))
_NO_BODY_STATUSES = frozenset({204, 304})


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path`` convertor, but newlines (allowed in ids) match too."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _Below(Convertor[str]):
    """The path below a prefix: empty, or a slash and anything after it.

    A route ``"{prefix}{rest:deepwork_below}"`` takes the prefix itself as well as
    every path under it, so no router redirects ``/prefix`` to ``/prefix/`` (a
    redirect whose ``Location`` Starlette builds from the ``Host`` header), and a
    sibling such as ``/prefix-admin`` is left to the host's own routes.
    """

    regex = r"(?:/[\s\S]*)?"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


BELOW = "deepwork_below"
register_url_convertor(ANY_PATH, _AnyPath())
register_url_convertor(BELOW, _Below())


def catch_all_path(prefix: str) -> str:
    """The route path that takes ``prefix`` and everything below it (param ``rest``)."""
    return prefix + "{rest:" + BELOW + "}" if prefix else "/{rest:" + ANY_PATH + "}"


def path_below(path_params: Any) -> str:
    """The path below the prefix from a :func:`catch_all_path` route's parameters."""
    rest = str(path_params["rest"])
    return rest if rest.startswith("/") else "/" + rest


# -- requests -----------------------------------------------------------------------------


def scope_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The scope's headers as text (latin-1, as HTTP/1 carries them)."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


def scope_query(raw: bytes) -> list[tuple[str, str]]:
    """The query string's parameters, decoded by the API's one rule."""
    return parse_query(raw) if raw else []


def scope_request(scope: Scope, path: str, body: bytes) -> ApiRequest:
    """The ASGI request in ``scope`` as plain data; ``path`` is below the API's prefix."""
    raw_path = scope.get("raw_path")
    return ApiRequest(
        method=scope["method"],
        path=path,
        headers=scope_headers(scope["headers"]),
        query=scope_query(scope.get("query_string", b"")),
        body=body,
        raw_path=None if raw_path is None else path_bytes(raw_path),
        scheme="https" if scope.get("scheme") in ("https", "wss") else "http",
    )


class Disconnected(Exception):
    """The client went away before its request's body had arrived."""


async def read_body(receive: Receive) -> bytes:
    """The request body from ASGI ``http.request`` messages, up to :data:`CAP` bytes.

    Raises :class:`Disconnected` when the client disconnects first.
    """
    message = await receive()
    if message["type"] != "http.request":
        raise Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body[:CAP]  # the whole body in one message, as it mostly comes
    return await read_capped_stream(_chunks(body, receive))


async def _chunks(first: bytes, receive: Receive) -> AsyncIterator[bytes]:
    """``first``, then the body of each further ``http.request`` message, to the last."""
    yield first
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Disconnected
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def api_request(request: Request, path: str, timeout: float) -> ApiRequest:
    """``request`` as plain data, ``path`` being its path below the API's prefix.

    The body goes through ``request.stream()``, which also serves a body that
    something before the endpoint has already read. Raises :class:`BodyTimeout`
    when it takes longer than ``timeout`` seconds, and :class:`BodyIncomplete`
    when the client disconnects first.
    """
    try:
        body = await asyncio.wait_for(read_capped_stream(request.stream()), timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout from None
    except ClientDisconnect:
        raise BodyIncomplete from None
    return scope_request(request.scope, path, body)


async def handle(api: Served, request: Request, path: str) -> Response:
    """The API's answer to a Starlette ``request`` (for FastAPI's endpoints)."""
    try:
        plain = await api_request(request, path, api.body_timeout)
    except (BodyTimeout, BodyIncomplete) as exc:
        return response(error_response(exc))
    return response(await api.handle(plain))


# -- responses ----------------------------------------------------------------------------


def raw_headers(result: ApiResponse) -> list[tuple[bytes, bytes]]:
    """The response's ASGI headers: its own, then ``content-length`` and ``content-type``
    (its own content type in place of JSON's, with no length, for a stream's HEAD)."""
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in other_headers(result)
    ]
    if result.close:
        headers.append((b"connection", b"close"))
    own = content_type(result)
    if own.startswith(EVENT_STREAM):
        # The HEAD of an event stream: the GET's body has no length.
        headers.append((b"content-type", own.encode("latin-1")))
        return headers
    if result.status >= 200 and result.status not in _NO_BODY_STATUSES:
        headers.append((b"content-length", str(len(result.body)).encode("latin-1")))
    headers.append(_CONTENT_TYPE if own == JSON else (b"content-type", own.encode("latin-1")))
    return headers


async def send_response(send: Send, result: ApiResponse) -> None:
    """Write ``result`` as one ``http.response.start`` and one ``http.response.body``."""
    await send(
        {"type": "http.response.start", "status": result.status, "headers": raw_headers(result)}
    )
    await send({"type": "http.response.body", "body": result.body})


async def send_stream(receive: Receive, send: Send, result: ApiResponse) -> None:
    """Write ``result``'s event stream: its headers, then each chunk as it comes.

    The client's ``http.disconnect`` is watched meanwhile: when it comes the
    stream is stopped at once (cancelled mid-wait) rather than at its next
    write. The stream is closed (its slot freed) however this ends.
    """
    stream = result.stream
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in result.headers
    ]

    async def pump() -> None:
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        outcomes = await asyncio.gather(pumping, watching, return_exceptions=True)
        await stream.close()
    failure = outcomes[0]
    if isinstance(failure, Exception) and not isinstance(failure, OSError):
        # A client that went away (OSError) is how streams end; anything else is logged.
        log.error("an event stream failed", exc_info=failure)


class StreamResponseAdapter(Response):
    """A Starlette ``Response`` writing an :class:`ApiResponse`'s event stream, for FastAPI."""

    media_type = EVENT_STREAM

    def __init__(self, result: ApiResponse) -> None:
        self.status_code = result.status
        self.background = None
        self.result = result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_stream(receive, send, self.result)


class ApiResponseAdapter(Response):
    """A Starlette ``Response`` carrying an :class:`ApiResponse` as it is, for FastAPI."""

    media_type = JSON

    def __init__(self, result: ApiResponse) -> None:
        self.status_code = result.status
        self.body = result.body
        self.background = None
        self.raw_headers = raw_headers(result)


def response(result: ApiResponse) -> Response:
    if result.stream is not None:
        return StreamResponseAdapter(result)
    return ApiResponseAdapter(result)


# -- the endpoint --------------------------------------------------------------------------


class Served(Protocol):
    """What an endpoint serves: the API, or the dashboard over it."""

    @property
    def body_timeout(self) -> float: ...

    async def handle(self, request: ApiRequest) -> ApiResponse: ...


class ApiEndpoint:
    """An ASGI application answering every request routed to it with ``api``
    (an :class:`~deepwork_retry.web.AsyncRetryAPI`, or anything :class:`Served`).

    Mounted as a Starlette ``Route`` on :func:`catch_all_path`, for every method:
    ``rest`` is the request's path below the API's prefix. A body that takes
    longer than the API's ``body_timeout`` is answered 408 and the connection closed.
    """

    def __init__(self, api: Served) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = path_below(scope["path_params"])
        try:
            body = await asyncio.wait_for(read_body(receive), self.api.body_timeout)
        except Disconnected:
            return  # no one is left to answer
        except asyncio.TimeoutError:
            await send_response(send, error_response(BodyTimeout()))
            return
        result = await self.api.handle(scope_request(scope, path, body))
        if result.stream is not None:
            await send_stream(receive, send, result)
            return
        await send_response(send, result)


__all__ = [
    "ANY_PATH",
    "BELOW",
    "ApiEndpoint",
    "api_request",
    "catch_all_path",
    "handle",
    "path_below",
    "read_body",
    "response",
    "scope_request",
    "send_response",
    "send_stream",
    "StreamResponseAdapter",
]
