"""The one Django view: everything under the prefix goes to the shared API."""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from deepwork_retry.web._bodies import read_capped
from deepwork_retry.web._http import JSON, ApiRequest, ApiResponse, respond
from deepwork_retry.web.django import get_api

log = logging.getLogger("deepwork_retry.web")


def _response(result: ApiResponse) -> HttpResponse:
    response = HttpResponse(result.body, status=result.status, content_type=JSON)
    for name, value in result.headers:
        response[name] = value
    return response


# Bearer tokens, not cookies, authenticate these requests, so CSRF does not apply.
@csrf_exempt  # type: ignore[untyped-decorator]  # Django ships no type hints
def api_view(request: HttpRequest, rest: str) -> HttpResponse:
    try:
        api = get_api()
    except Exception:  # a configuration error must answer in JSON, not as a 500 page
        log.exception("the retry API is not configured")
        return _response(
            respond(503, {"detail": "The retry API is not configured"}, [("Retry-After", "60")])
        )
    query = [(name, value) for name, values in request.GET.lists() for value in values]
    result = api.handle(
        ApiRequest(
            method=request.method or "GET",
            path="/" + rest,
            headers=request.headers.items(),
            query=query,
            body=read_capped(request.read),
        )
    )
    return _response(result)
