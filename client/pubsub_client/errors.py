"""Every error the client raises: a PubSubError subclass carrying the server's status and detail."""


class PubSubError(Exception):
    """An answer the call cannot succeed with. status is the HTTP status (None when there was no
    answer), detail the server's `detail` text, errors its per-field messages (422 only)."""

    def __init__(
        self,
        detail: str,
        status: int | None = None,
        errors: dict | None = None,
        request_id: str | None = None,
    ):
        super().__init__(f"{status} {detail}" if status else detail)
        self.detail = detail
        self.status = status
        self.errors = errors
        self.request_id = request_id


class ValidationError(PubSubError):
    """400, 413, 415 or 422: the request was refused as it stands; nothing changed."""


class AuthError(PubSubError):
    """401 (no, bad, expired or revoked token, or bad client credentials) or 403 (scope)."""


class NotFoundError(PubSubError):
    """404: no such topic or subscription."""


class ConflictError(PubSubError):
    """409: the topic or subscription already exists."""


class ServerError(PubSubError):
    """5xx, still so after the retries the call allows. For a publish, maybe_stored says whether
    the batch may have been stored: a 5xx may follow a commit (a 503 whose outcome is unknown)."""

    maybe_stored = False


class ConnectionFailedError(ServerError):
    """No answer: the server could not be reached, or the connection broke before it answered
    (status None). For a publish, maybe_stored says whether the request may have reached it."""

    def __init__(self, detail: str, maybe_stored: bool = False):
        super().__init__(detail)
        self.maybe_stored = maybe_stored


class Nack(Exception):
    """Raised by a Subscriber's handler: nack the message, to come back after delay_seconds
    (None: the subscription's backoff; 0: at once)."""

    def __init__(self, delay_seconds: int | None = None):
        super().__init__(f"nack (delay {delay_seconds})")
        self.delay_seconds = delay_seconds


BY_STATUS: dict[int, type[PubSubError]] = {
    400: ValidationError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    415: ValidationError,
    422: ValidationError,
}


def error_for(
    status: int, detail: str, errors: dict | None = None, request_id: str | None = None
) -> PubSubError:
    kind = BY_STATUS.get(status) or (ServerError if status >= 500 else PubSubError)
    return kind(detail, status, errors, request_id)
