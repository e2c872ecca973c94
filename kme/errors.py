"""One error type for the whole KME, rendered one way: the spec's Error format (§6.5 T13).

Everything a client can be told goes through :class:`KMEError`. Foreign exceptions
(SQLAlchemy, Starlette, validation) are translated at the boundary in :mod:`kme.app`.
Nothing here may carry key material: messages and details name fields, never values
of keys.
"""

from __future__ import annotations

from typing import Any

# The spec's mandated strings (checklist item 21): compared byte for byte by clients.
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MANDATORY_EXTENSION_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MANDATORY_EXTENSION_NOT_MET = "not all extension_mandatory request options could be met"
OPTIONAL_EXTENSION_NOT_HANDLED = "not all extension_optional request options handled"
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"

UNAUTHORIZED = "unauthorized"
INSUFFICIENT_KEYS = "insufficient keys available"
KEY_DATA_ACCESS_ERROR = "key data access error"


class KMEError(Exception):
    """An error a client sees: HTTP status, the Error ``message`` and optional ``details``."""

    status: int = 400

    def __init__(
        self,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(KMEError):
    """400: the request is malformed or asks for something this KME cannot give."""

    status = 400


class Unauthorized(KMEError):
    """401: the caller is not (or not for this key) an authorised SAE."""

    status = 401

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(UNAUTHORIZED, [{"reason": reason}] if reason else None)


class ServiceUnavailable(KMEError):
    """503: a server-side condition the client may retry (pool empty, database down)."""

    status = 503


class ConfigError(Exception):
    """A configuration problem, said in one sentence that names the file and the field."""
