"""Reading a request body without holding more of it than the API accepts.

One reader for each kind of source the servers give: a ``read(n)`` callable
(:func:`read_upto`), a WSGI environ with its framings (:func:`read_wsgi_body`,
built on it), and an async stream of chunks (:func:`read_capped_stream`:
ASGI and aiohttp).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from deepwork_retry.web._http import (
    MAX_BODY_BYTES,
    BodyIncomplete,
    BodyTimeout,
    LengthRequired,
)

CAP = MAX_BODY_BYTES + 1
"""Read at most this much: one byte past the limit is enough to answer 413."""


def read_upto(read: Callable[[int], bytes], size: int) -> bytes:
    """Call ``read(n)`` until EOF or ``size`` bytes (never asking for more)."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)[:size]


async def read_capped_stream(stream: AsyncIterator[bytes]) -> bytes:
    """Collect an async byte stream up to :data:`CAP` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        chunks.append(chunk)
        size += len(chunk)
        if size >= CAP:
            break
    return b"".join(chunks)[:CAP]


def _declared_length(environ: Mapping[str, Any]) -> int | None:
    value = str(environ.get("CONTENT_LENGTH") or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def read_wsgi_body(environ: Mapping[str, Any], read: Callable[[int], bytes] | None = None) -> bytes:
    """A WSGI request's body, up to :data:`CAP` bytes, however the server frames it.

    - With ``Content-Length``: that many bytes (at most :data:`CAP`) through
      ``read`` (the framework's stream, which knows about bodies something
      before the view has read) or else ``wsgi.input``. Fewer bytes than
      declared mean the client went away: :class:`BodyIncomplete`, never a
      request acted on with half its body.
    - Without one, from a server that de-chunks and says so with
      ``wsgi.input_terminated`` (gunicorn, werkzeug, mod_wsgi...): ``wsgi.input``
      up to its end. Frameworks that only trust ``Content-Length`` (Django)
      would see an empty body here.
    - A chunked body from a server that does not de-chunk it: :class:`LengthRequired`
      (411), since acting on it as empty would drop the client's options.

    A read that times out (the server's socket timeout) raises
    :class:`BodyTimeout`; any other failure to read raises :class:`BodyIncomplete`.
    """
    length = _declared_length(environ)
    source = environ.get("wsgi.input")
    if length is None:
        if not environ.get("wsgi.input_terminated") or source is None:
            if "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower():
                raise LengthRequired
            return b""
        return _read(source.read, CAP)  # the server ends the stream where the body ends
    if read is None:
        if source is None:
            return b""
        read = source.read
    want = min(length, CAP)
    body = _read(read, want)
    if len(body) < want:
        raise BodyIncomplete
    return body


def _read(read: Callable[[int], bytes], size: int) -> bytes:
    try:
        return read_upto(read, size)
    except (OSError, ValueError) as exc:
        # A framework may wrap the socket's timeout (Django's UnreadablePostError).
        if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
            raise BodyTimeout from None
        raise BodyIncomplete from None
