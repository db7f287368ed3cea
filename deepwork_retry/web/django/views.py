"""The Django views: everything under the API's prefix goes to the shared API, and
everything under a dashboard's prefix to that dashboard."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, cast

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.web._bodies import CAP, read_upto, read_wsgi_body
from deepwork_retry.web._http import (
    ApiRequest,
    ApiResponse,
    NotConfigured,
    content_type,
    error_response,
    parse_query,
    path_bytes,
    wsgi_path_bytes,
)
from deepwork_retry.web._sse import wsgi_disconnected
from deepwork_retry.web._sync_api import EventStream
from deepwork_retry.web.django import get_api

if TYPE_CHECKING:  # the dashboard needs its extra (Jinja2); the API view does not
    from deepwork_retry.web.dashboard import Dashboard

log = logging.getLogger("deepwork_retry.web")


def _response(result: ApiResponse) -> HttpResponse:
    response = HttpResponse(result.body, status=result.status, content_type=content_type(result))
    _set_headers(response, result.headers)
    return response


def _set_headers(response: HttpResponseBase, headers: Iterable[tuple[str, str]]) -> None:
    """Put ``headers`` on ``response``; each ``Set-Cookie`` goes to its cookies, which
    Django writes as one header apiece (its header map keeps one value per name)."""
    for name, value in headers:
        if name.lower() == "set-cookie":
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(value)
            if not cookie:  # not one Python can parse: the header as it is (the last wins)
                response[name] = value
            for key, morsel in cookie.items():
                response.cookies[key] = morsel
        else:
            response[name] = value


def _stream(request: HttpRequest, stream: EventStream, result: ApiResponse) -> HttpResponseBase:
    """The event stream as a ``StreamingHttpResponse``: the sync stream itself under
    WSGI (Django closes it with the response), an async iterator over it under ASGI
    (Django would otherwise read a sync iterator to its end before sending any of it)."""
    if "wsgi.input" in request.META:
        stream.disconnected = wsgi_disconnected(request.META)
        content: Iterator[bytes] | AsyncIterator[bytes] = stream
    else:
        content = _async_chunks(stream)
    response = StreamingHttpResponse(content, status=result.status)
    _set_headers(response, result.headers)
    return response


def _next(stream: EventStream) -> bytes | None:
    return next(stream, None)


async def _async_chunks(stream: EventStream) -> AsyncIterator[bytes]:
    """Each chunk of ``stream``, read in a worker thread; the stream is closed however
    this ends (Django cancels it when the client disconnects)."""
    try:
        while True:
            chunk = await sync_to_async(_next, thread_sensitive=False)(stream)
            if chunk is None:
                return
            yield chunk
    finally:
        stream.close()


# Bearer tokens, not cookies, authenticate these requests, so CSRF does not apply.
@csrf_exempt  # type: ignore[untyped-decorator]  # Django ships no type hints
def api_view(request: HttpRequest, rest: str = "") -> HttpResponseBase:
    try:
        api = get_api()
    except Exception:  # a configuration error must answer in JSON, not as a 500 page
        log.exception("the retry API is not configured")
        return _response(error_response(NotConfigured()))
    return _serve(request, api.handle, rest)


def dashboard_view(dashboard: Dashboard) -> Callable[..., HttpResponseBase]:
    """The view serving ``dashboard``: every path and method below its prefix."""

    # The dashboard checks its own CSRF token (signed, bound to its session) on every
    # POST; Django's middleware, which knows neither, must let its forms through.
    @csrf_exempt  # type: ignore[untyped-decorator]  # Django ships no type hints
    def view(request: HttpRequest, rest: str = "") -> HttpResponseBase:
        return _serve(request, dashboard.handle, rest)

    return cast("Callable[..., HttpResponseBase]", view)


def _serve(
    request: HttpRequest, handle: Callable[[ApiRequest], ApiResponse], rest: str
) -> HttpResponseBase:
    try:
        body = _body(request)
    except DeepworkError as exc:  # the body's framing: answered in JSON
        return _response(error_response(exc))
    result = handle(
        ApiRequest(
            method=request.method or "GET",
            path="/" + rest,
            headers=request.headers.items(),
            query=parse_query(request.META.get("QUERY_STRING", "")),
            body=body,
            raw_path=_raw_path(request),
            # Django's: wsgi.url_scheme, or the ASGI scope's, or what the host's
            # SECURE_PROXY_SSL_HEADER setting says.
            scheme=request.scheme or "http",
        )
    )
    if result.stream is not None:
        return _stream(request, result.stream, result)
    return _response(result)


def _body(request: HttpRequest) -> bytes:
    """The body, read as the server frames it.

    Django reads a WSGI body only as far as ``Content-Length``, so a chunked body
    that the server de-chunked (``wsgi.input_terminated``) would look empty; it
    is read from ``wsgi.input`` instead. Under ASGI Django has the whole body.
    """
    if "wsgi.input" not in request.META:
        return read_upto(request.read, CAP)
    return read_wsgi_body(request.META, request.read)


def _raw_path(request: HttpRequest) -> bytes | None:
    """The path's bytes as sent: from the WSGI environ, or the ASGI scope under ASGI."""
    if "wsgi.input" in request.META:
        return wsgi_path_bytes(request.META)
    raw = getattr(request, "scope", {}).get("raw_path")
    return None if raw is None else path_bytes(raw)
