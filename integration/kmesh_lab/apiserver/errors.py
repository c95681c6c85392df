"""API errors as kube-apiserver reports them: an exception that carries a ``Status`` object.

Every failure the server answers, from a bad selector to an injected fault, is an
:class:`ApiError`; the HTTP layer serialises :attr:`ApiError.status` as the body and uses
:attr:`ApiError.code` as the HTTP status. Messages and ``details`` follow the real server's
wording (``services "x" not found``, ``deployments.apps "x" already exists``, ...) because
clients and people match on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .resources import ResourceType

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A request failed; :attr:`status` is the Kubernetes ``Status`` object to answer."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        *,
        retry_after: int | None = None,
        list_continue: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details
        self.retry_after = retry_after
        self.list_continue = list_continue

    @property
    def status(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        if self.list_continue is not None:
            metadata["continue"] = self.list_continue
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": metadata,
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body

    def __repr__(self) -> str:
        return f"ApiError({self.code}, {self.reason}, {self.message!r})"


def _details(rtype: ResourceType, name: str, **extra: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name}
    if rtype.group:
        details["group"] = rtype.group
    details["kind"] = rtype.plural
    details.update(extra)
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rtype.qualified} "{name}" not found', details=_details(rtype, name))


def already_exists(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        f'{rtype.qualified} "{name}" already exists',
        "AlreadyExists",
        _details(rtype, name),
    )


def conflict(rtype: ResourceType, name: str, why: str | None = None) -> ApiError:
    why = why or (
        "the object has been modified; please apply your changes to the latest version "
        "and try again"
    )
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {rtype.qualified} "{name}": {why}',
        "Conflict",
        _details(rtype, name),
    )


def invalid(rtype: ResourceType, name: str, field: str, why: str) -> ApiError:
    """422 Invalid for one field, worded like the real validation errors."""
    return ApiError(
        422,
        f'{rtype.kind} "{name}" is invalid: {field}: {why}',
        "Invalid",
        _details(rtype, name, causes=[{"reason": "FieldValueInvalid", "message": why,
                                       "field": field}]),
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "BadRequest")


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, "Forbidden")


def resource_not_found() -> ApiError:
    """What the real server answers for a path it does not serve (unknown resource)."""
    return ApiError(404, "the server could not find the requested resource", "NotFound", {})


def method_not_allowed() -> ApiError:
    return ApiError(
        405, "the server does not allow this method on the requested resource",
        "MethodNotAllowed", {},
    )


def expired(message: str, list_continue: str | None = None) -> ApiError:
    return ApiError(410, message, "Expired", list_continue=list_continue)


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def unsupported_patch_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json-patch+json, application/merge-patch+json, "
        f"application/strategic-merge-patch+json (got {content_type or 'none'})",
        "UnsupportedMediaType",
    )


def not_acceptable() -> ApiError:
    return ApiError(
        406, "only the following media types are accepted: application/json", "NotAcceptable"
    )


def injected(code: int, retry_after: int | None = None) -> ApiError:
    """The Status an injected fault answers, worded as the real server words that code."""
    if code == 429:
        details = {"retryAfterSeconds": retry_after} if retry_after is not None else {}
        return ApiError(
            429, "Too many requests, please try again later.", "TooManyRequests", details,
            retry_after=retry_after,
        )
    if code == 500:
        return ApiError(
            500, "Internal error occurred: injected fault", "InternalError",
            {"causes": [{"message": "injected fault"}]}, retry_after=retry_after,
        )
    if code == 503:
        details = {"retryAfterSeconds": retry_after} if retry_after is not None else {}
        return ApiError(
            503, "the server is currently unable to handle the request", "ServiceUnavailable",
            details, retry_after=retry_after,
        )
    return ApiError(code, f"injected fault {code}", retry_after=retry_after)
