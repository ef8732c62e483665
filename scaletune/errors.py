"""What talking to a scaletune server can fail with: each says what to do, ``status`` is the HTTP status."""

from __future__ import annotations

from typing import Any


class ScaletuneError(Exception):
    """Any failure talking to the server; ``status`` is the HTTP status (None when there was no response)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ScaletuneError):
    pass


class Unauthorized(ScaletuneError):
    pass


class Conflict(ScaletuneError):
    pass


class TooManyOut(ScaletuneError):
    """A 429: as many trials (or studies) as allowed are out; ``retry_after`` seconds is when to ask again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, 429)
        self.retry_after = retry_after


class EndpointMissing(ScaletuneError):
    """The server is older than this client (or lacks a feature): it has no such route."""


class ValidationFailed(ScaletuneError):
    """A 422 problem: ``errors`` holds each invalid field as ``{"loc", "msg", "type"}``, paths as submitted."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        lines = [f"  {'.'.join(str(p) for p in e.get('loc', []) if p != 'body') or 'body'}: {e.get('msg')}"
                 for e in errors]
        super().__init__("the server rejected the request:\n" + "\n".join(lines), 422)


class ServiceUnavailable(ScaletuneError):
    """No usable answer from ``url``: connection refused, timeout, or a 5xx."""

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        self.url = url
        super().__init__(f"scaletune at {url} is unavailable: {reason}. Is the server running "
                         "(`scaletune up`), and is SCALETUNE_URL right?", status)
