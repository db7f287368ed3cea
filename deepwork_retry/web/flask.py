"""The retry API as a Flask blueprint, over the sync services.

from deepwork_retry.web.flask import blueprint

app.register_blueprint(blueprint(service, StaticTokens.from_env()))
"""

from __future__ import annotations

from deepwork_retry._sync.api import RetryAPI
from deepwork_retry._sync.services import RetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import sync_api
from deepwork_retry.web._bodies import read_capped
from deepwork_retry.web._http import DEFAULT_PREFIX, JSON, ApiRequest, normalise_prefix

try:
    from flask import Blueprint, Response, request
    from flask.sansio.blueprints import BlueprintSetupState
    from werkzeug.routing import BaseConverter
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("flask", __name__, exc) from exc

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
ANY_PATH = "deepwork_any"


class AnyPathConverter(BaseConverter):
    """Like werkzeug's ``path`` converter, but newlines (allowed in ids) match too."""

    regex = r"[\s\S]*"
    part_isolating = False


def _add_converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault(ANY_PATH, AnyPathConverter)


def blueprint(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    name: str = "deepwork_retry",
) -> Blueprint:
    """A blueprint serving the API under ``prefix``; register it on your app."""
    api = sync_api(service, authenticator, authorizer, adapter=__name__)
    bp = Blueprint(name, __name__, url_prefix=normalise_prefix(prefix) or None)
    bp.record_once(_add_converter)

    def view(rest: str) -> Response:
        result = api.handle(
            ApiRequest(
                method=request.method,
                path="/" + rest,
                headers=request.headers.items(),
                query=request.args.items(multi=True),
                body=read_capped(request.stream.read),
            )
        )
        return Response(result.body, status=result.status, headers=result.headers, mimetype=JSON)

    # merge_slashes=False: an empty id ("tasks//retry") reaches the API as it was sent.
    bp.add_url_rule(
        "/<" + ANY_PATH + ":rest>",
        "api",
        view,
        methods=METHODS,
        merge_slashes=False,
        strict_slashes=False,
    )
    return bp


__all__ = ["METHODS", "blueprint"]
