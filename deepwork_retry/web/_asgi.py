"""What the Starlette and FastAPI adapters share: request and response translation.

Imported only by those adapters, after their framework imported cleanly.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from deepwork_retry.web._bodies import read_capped_stream
from deepwork_retry.web._http import JSON, ApiRequest, ApiResponse

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
"""Every method is routed to the API, which answers 405 itself where one does not apply."""


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path`` convertor, but newlines (allowed in ids) match too."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


ANY_PATH = "deepwork_any"
register_url_convertor(ANY_PATH, _AnyPath())


async def api_request(request: Request, path: str) -> ApiRequest:
    """``request`` as plain data, ``path`` being its path below the API's prefix."""
    return ApiRequest(
        method=request.method,
        path=path,
        headers=request.headers.items(),
        query=request.query_params.multi_items(),
        body=await read_capped_stream(request.stream()),
    )


def response(result: ApiResponse) -> Response:
    return Response(
        content=result.body,
        status_code=result.status,
        headers=dict(result.headers),
        media_type=JSON,
    )
