"""Server-Sent Events with no framework: the frames, the resume point, the bound on streams.

``GET {prefix}/projects/{project_id}/events`` answers ``text/event-stream``:

* a ``retry:`` hint first (how long a browser waits before reconnecting);
* one frame per lifecycle event, ``id: <seq>``, ``event: <type>`` and the
  event's JSON (:meth:`~deepwork_retry._core.events.Event.dumps`) as ``data``;
* after each batch of events a ``progress`` frame (no ``id``) with the
  project's counters as they stand then, and one right after the ``retry:``
  hint when the stream opens with no event to send (a client resuming after
  its last event learns where the project stands at once);
* a comment line ``: keepalive`` whenever the stream was quiet for the
  heartbeat interval, so that proxies keep it open.

A client resumes after the last ``id`` it saw with the ``Last-Event-ID``
header (a browser's ``EventSource`` sends it by itself when it reconnects), or
with ``?after=<seq>`` where it cannot set headers; the header wins when both
are given. The streams (:class:`~deepwork_retry.web.AsyncEventStream` and its
sync twin) live in ``_async_api.py``; this module has what both share.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from deepwork_retry._core.events import Event
from deepwork_retry._core.model import Progress
from deepwork_retry._core.results import progress_json
from deepwork_retry.web._http import BadLastEventId, BadRequestBody, TooManyStreams

EVENT_STREAM = "text/event-stream"

STREAM_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", EVENT_STREAM + "; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    # nginx buffers proxied responses unless told not to: events would arrive late.
    ("X-Accel-Buffering", "no"),
)
"""The headers of an event stream's 200."""

KEEPALIVE = b": keepalive\n\n"
"""A comment line: ignored by clients, it keeps proxies and load balancers from
closing a quiet stream."""

MAX_SEQ = 2**63 - 1
"""The largest event number a stream resumes after (the storages' 64-bit integers)."""

QUERY = frozenset({"after"})
"""The query parameters the events route takes."""


def _positive(name: str) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be a positive number")

    return check


@attrs.frozen(kw_only=True)
class StreamOptions:
    """How the API serves event streams.

    ``poll_interval``: seconds between two reads of the event log while a
    stream is quiet. ``heartbeat``: seconds of quiet after which a
    ``: keepalive`` line is written (it is also how soon a WSGI server notices
    a client that went away, since it learns that only on a write).
    ``max_streams``: streams one principal may have open at once, in this
    process; one more is answered 429. ``max_lifetime``: seconds after which
    a stream ends by itself (``None``: never); the client reconnects with
    ``Last-Event-ID`` and loses nothing. ``retry_ms``: the ``retry:`` hint.
    ``batch``: events read at a time.
    """

    poll_interval: float = attrs.field(default=1.0, validator=_positive("poll_interval"))
    heartbeat: float = attrs.field(default=15.0, validator=_positive("heartbeat"))
    max_streams: int = attrs.field(default=4, validator=_positive("max_streams"))
    max_lifetime: float | None = attrs.field(default=None, validator=_positive("max_lifetime"))
    retry_ms: int = attrs.field(default=2000, validator=_positive("retry_ms"))
    batch: int = attrs.field(default=100, validator=_positive("batch"))


DEFAULT_STREAMS = StreamOptions()


def retry_frame(options: StreamOptions) -> bytes:
    return f"retry: {options.retry_ms}\n\n".encode("ascii")


def event_frame(event: Event) -> bytes:
    """One event: ``id`` (its number), ``event`` (its type) and its JSON as ``data``.

    The JSON is one line (JSON escapes every line break inside strings), as a
    ``data`` field must be.
    """
    return f"id: {event.seq}\nevent: {event.type.value}\ndata: {event.dumps()}\n\n".encode()


def progress_frame(project_id: str, progress: Progress) -> bytes:
    """The project's counters, as a ``progress`` frame with no ``id``."""
    data = json.dumps(
        {"project_id": project_id, "progress": progress_json(progress)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return f"event: progress\ndata: {data}\n\n".encode()


def _seq(value: str) -> int:
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise BadLastEventId
    seq = int(value)
    if seq > MAX_SEQ:
        raise BadLastEventId
    return seq


def resume_after(headers: Mapping[str, str], query: Mapping[str, str]) -> int:
    """The number of the last event the client has: ``Last-Event-ID``, else ``?after=``, else 0.

    Raises :class:`~deepwork_retry.web._http.BadLastEventId` (400) for a value
    that is not an event number, and
    :class:`~deepwork_retry.web._http.BadRequestBody` (422) for any other
    query parameter, or one given twice (``?after=55&after=1``: which was meant?).
    """
    unknown = sorted(set(query) - QUERY)
    if unknown:
        raise BadRequestBody(f"Unknown query parameter: {unknown[0]!r}"[:300])
    repeated = sorted(getattr(query, "repeated", ()))
    if repeated:
        raise BadRequestBody(f"Query parameter given more than once: {repeated[0]!r}"[:300])
    header = headers.get("last-event-id")
    if header is not None and header.strip():
        return _seq(header)
    after = query.get("after")
    if after is not None and after.strip():
        return _seq(after)
    return 0


WSGI_SOCKETS = ("werkzeug.socket", "gunicorn.socket")
"""Where WSGI servers put the client's socket in the environ (werkzeug, gunicorn)."""


def wsgi_disconnected(environ: Mapping[str, Any]) -> Callable[[], bool] | None:
    """A check whether the client of this WSGI request has gone, where it can be told.

    A WSGI application learns that its client left only when a write fails,
    which for a quiet stream is at its next heartbeat; with the server's plain
    socket at hand (werkzeug, gunicorn), a peek without waiting tells at once:
    readable with nothing to read means the client closed its end. ``None``
    for anything else (a TLS socket cannot be peeked at).
    """
    sock = next((environ[key] for key in WSGI_SOCKETS if key in environ), None)
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None

    def disconnected() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

    return disconnected


class StreamSlots:
    """How many streams each principal has open, bounded; safe across threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, principal_id: str) -> Callable[[], None]:
        """One slot for ``principal_id``, or :class:`TooManyStreams`; returns its
        release, which frees the slot once however often it is called."""
        with self._lock:
            count = self._open.get(principal_id, 0)
            if count >= self.limit:
                raise TooManyStreams(self.limit)
            self._open[principal_id] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._open[principal_id] - 1
                if left:
                    self._open[principal_id] = left
                else:
                    del self._open[principal_id]

        return release

    def open(self, principal_id: str | None = None) -> int:
        """Streams open for ``principal_id`` (for everyone when ``None``)."""
        with self._lock:
            if principal_id is None:
                return sum(self._open.values())
            return self._open.get(principal_id, 0)


__all__ = [
    "DEFAULT_STREAMS",
    "EVENT_STREAM",
    "KEEPALIVE",
    "STREAM_HEADERS",
    "StreamOptions",
    "StreamSlots",
    "event_frame",
    "progress_frame",
    "resume_after",
    "retry_frame",
    "wsgi_disconnected",
]
