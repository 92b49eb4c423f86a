"""``df.Request``: what an ``@app.endpoint`` function receives for one HTTP call."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import msgspec

from duanflow._errors import InvalidInputError

_UNSET: Any = object()


class Request:
    """One HTTP request to an endpoint, as the gateway forwarded it.

    Credentials (``Authorization``, ``Cookie``) stay at the gateway and are not in :attr:`headers`.

    Example::

        @app.endpoint(method="POST", path="/v1/items/{item_id}")
        def update(request: df.Request) -> dict:
            return {"id": request.path_params["item_id"], "fields": request.json(), "q": request.query.get("q")}
    """

    __slots__ = ("_json", "body", "headers", "method", "path", "path_params", "query")

    def __init__(
        self,
        *,
        method: str = "GET",
        path: str = "/",
        path_params: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        json: Any = _UNSET,
    ) -> None:
        self.method = method
        """Upper-case HTTP method."""
        self.path = path
        """Path of the request, without the query string."""
        self.path_params: dict[str, str] = dict(path_params or {})
        """Values of the route's ``{name}`` segments."""
        self.query: dict[str, str] = dict(query or {})
        """Query parameters (the first value of each name)."""
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        """Request headers, lower-case names."""
        self.body = body
        """The raw request body."""
        self._json = json

    @classmethod
    def from_gateway(cls, payload: Mapping[str, Any]) -> Request:
        """Build the request from the ``request`` object of the gateway's JSON arguments (services/gateway/README)."""
        raw = payload.get("request")
        req: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        if isinstance(req.get("body_b64"), str):
            body = base64.b64decode(req["body_b64"])
        elif isinstance(req.get("body"), str):
            body = req["body"].encode()
        else:
            body = b""
        return cls(
            method=str(req.get("method", "GET")),
            path=str(req.get("path", "/")),
            path_params=_str_map(req.get("path_params")),
            query=_str_map(req.get("query")),
            headers=_str_map(req.get("headers")),
            body=body,
        )

    def text(self) -> str:
        """The body as text (UTF-8).

        Example::

            prompt = request.text()
        """
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (None for an empty body); :class:`InvalidInputError` (HTTP 400) when it is not JSON.

        Example::

            body = request.json()
            messages = body["messages"]
        """
        if self._json is _UNSET:
            if not self.body.strip():
                self._json = None
            else:
                try:
                    self._json = msgspec.json.decode(self.body)
                except msgspec.DecodeError as exc:
                    raise InvalidInputError(f"the request body is not valid JSON: {exc}") from None
        return self._json

    def __repr__(self) -> str:
        return f"<duanflow Request {self.method} {self.path}>"


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}
