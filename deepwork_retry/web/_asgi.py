"""What the Starlette and FastAPI adapters share: request and response translation.

Imported only by those adapters, after their framework imported cleanly.

The request is read straight from the ASGI scope (header names there are
already lower-case bytes, the query string is raw bytes) rather than through
Starlette's ``Request``, and the response is written as the two ASGI messages
it is, so a request costs the API's own work plus little more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from deepwork_retry._async.api import AsyncRetryAPI
from deepwork_retry.web._bodies import CAP, read_capped_stream
from deepwork_retry.web._http import JSON, ApiRequest, ApiResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
"""Every method is routed to the API, which answers 405 itself where one does not apply."""

_CONTENT_TYPE = (b"content-type", JSON.encode("latin-1"))
_NO_BODY_STATUSES = frozenset({204, 304})


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path`` convertor, but newlines (allowed in ids) match too."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


ANY_PATH = "deepwork_any"
register_url_convertor(ANY_PATH, _AnyPath())


# -- requests -----------------------------------------------------------------------------


def scope_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The scope's headers as text (latin-1, as HTTP/1 carries them)."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


def scope_query(raw: bytes) -> list[tuple[str, str]]:
    """The query string's parameters, blank values kept (as Starlette parses them)."""
    if not raw:
        return []
    return parse_qsl(raw.decode("latin-1"), keep_blank_values=True)


def scope_request(scope: Scope, path: str, body: bytes) -> ApiRequest:
    """The ASGI request in ``scope`` as plain data; ``path`` is below the API's prefix."""
    return ApiRequest(
        method=scope["method"],
        path=path,
        headers=scope_headers(scope["headers"]),
        query=scope_query(scope.get("query_string", b"")),
        body=body,
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
        return body[:CAP]
    chunks = [body]
    size = len(body)
    while size < CAP:
        message = await receive()
        if message["type"] != "http.request":
            raise Disconnected
        chunk: bytes = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[:CAP]


async def api_request(request: Request, path: str) -> ApiRequest:
    """``request`` as plain data, ``path`` being its path below the API's prefix.

    The body goes through ``request.stream()``, which also serves a body that
    something before the endpoint has already read.
    """
    return scope_request(request.scope, path, await read_capped_stream(request.stream()))


# -- responses ----------------------------------------------------------------------------


def raw_headers(result: ApiResponse) -> list[tuple[bytes, bytes]]:
    """The response's ASGI headers: its own, then ``content-length`` and ``content-type``."""
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in result.headers
    ]
    if result.status >= 200 and result.status not in _NO_BODY_STATUSES:
        headers.append((b"content-length", str(len(result.body)).encode("latin-1")))
    headers.append(_CONTENT_TYPE)
    return headers


async def send_response(send: Send, result: ApiResponse) -> None:
    """Write ``result`` as one ``http.response.start`` and one ``http.response.body``."""
    await send(
        {"type": "http.response.start", "status": result.status, "headers": raw_headers(result)}
    )
    await send({"type": "http.response.body", "body": result.body})


class ApiResponseAdapter(Response):
    """A Starlette ``Response`` carrying an :class:`ApiResponse` as it is, for FastAPI."""

    media_type = JSON

    def __init__(self, result: ApiResponse) -> None:
        self.status_code = result.status
        self.body = result.body
        self.background = None
        self.raw_headers = raw_headers(result)


def response(result: ApiResponse) -> Response:
    return ApiResponseAdapter(result)


# -- the endpoint --------------------------------------------------------------------------


class ApiEndpoint:
    """An ASGI application answering every request routed to it with ``api``.

    Mounted as a Starlette ``Route`` whose path ends in ``{rest:deepwork_any}``:
    ``rest`` is the request's path below the API's prefix.
    """

    def __init__(self, api: AsyncRetryAPI) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = "/" + str(scope["path_params"]["rest"])
        try:
            body = await read_body(receive)
        except Disconnected:
            return  # no one is left to answer
        result = await self.api.handle(scope_request(scope, path, body))
        await send_response(send, result)


__all__ = [
    "ANY_PATH",
    "METHODS",
    "ApiEndpoint",
    "api_request",
    "read_body",
    "response",
    "scope_request",
    "send_response",
]
