"""Domain errors: a small hierarchy, each with an HTTP status and a message that names the
field and the rule. Mapped to responses in one place (``app.http.error_handlers``); the
code raises these, never ``HTTPException``."""

from __future__ import annotations


class UnicornError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class MalformedRequest(UnicornError):
    """The body could not be parsed at all (not JSON)."""

    status_code = 400
    code = "malformed_request"


class Unauthorized(UnicornError):
    status_code = 401
    code = "unauthorized"


class Forbidden(UnicornError):
    status_code = 403
    code = "forbidden"


class PayloadTooLarge(UnicornError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(UnicornError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidRequest(UnicornError):
    status_code = 422
    code = "invalid_request"


class NotFound(UnicornError):
    status_code = 404
    code = "not_found"


class Overloaded(UnicornError):
    status_code = 503
    code = "overloaded"


class ModelUnavailable(UnicornError):
    status_code = 503
    code = "model_unavailable"


class BundleError(UnicornError):
    """A bundle that fails verification: missing file, bad checksum, incompatible format."""

    status_code = 409
    code = "bundle_refused"
