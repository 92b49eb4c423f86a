"""``df.Response``: full control over an endpoint's HTTP answer (status, headers, body)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from duanflow._errors import InvalidOptionError


class Response:
    """An HTTP response an endpoint returns when a plain value is not enough.

    ``body`` is what a plain return would be: dict/list (JSON), str (text), bytes (binary) or a generator (streamed).

    Example::

        @app.endpoint(method="POST", path="/v1/items")
        def create(request):
            return df.Response(status=201, headers={"Location": "/v1/items/7"}, body={"id": 7})
    """

    __slots__ = ("body", "headers", "media_type", "status")

    def __init__(
        self,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        body: Any = b"",
        *,
        media_type: str | None = None,
    ) -> None:
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise InvalidOptionError(f"Response(status=) takes an HTTP status from 200 to 599, got {status!r}")
        hdrs = dict(headers or {})
        for k, v in hdrs.items():
            if not isinstance(k, str) or not isinstance(v, str) or "\n" in k + v or "\r" in k + v:
                raise InvalidOptionError(f"Response(headers=) takes str names and values without newlines, got {k!r}")
        self.status = status
        """HTTP status."""
        self.headers = hdrs
        """Response headers (``Content-Type`` among them sets the media type)."""
        self.body = body
        """The body: dict/list, str, bytes or a generator."""
        self.media_type = media_type
        """Content type (default: from the body's kind)."""

    def __repr__(self) -> str:
        return f"<duanflow Response {self.status}>"
