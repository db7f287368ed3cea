"""Reading a request body without holding more of it than the API accepts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from deepwork_retry.web._http import MAX_BODY_BYTES

CAP = MAX_BODY_BYTES + 1
"""Read at most this much: one byte past the limit is enough to answer 413."""


def read_capped(read: Callable[[int], bytes]) -> bytes:
    """Call ``read(n)`` until EOF or :data:`CAP` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size < CAP:
        chunk = read(CAP - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:CAP]


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
