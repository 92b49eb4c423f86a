"""The OpenAPI document of the deployed endpoints, built from the route table (pure)."""

from __future__ import annotations

from typing import Any

from duanflow_gateway.domain import RouteTable

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def openapi_document(table: RouteTable, *, title: str = "DuanFlow gateway", version: str = "1") -> dict[str, Any]:
    """OpenAPI 3.1 of every route in ``table``: path parameters, JSON request bodies, bearer security, errors.

    >>> openapi_document(RouteTable())["paths"]
    {}
    """
    paths: dict[str, dict[str, Any]] = {}
    for route in sorted(table.routes.values(), key=lambda r: (r.entry.path, r.method)):
        entry = route.entry
        op: dict[str, Any] = {
            "operationId": f"{entry.env}.{entry.app}.{entry.function}".replace("-", "_"),
            "summary": f"{entry.app}.{entry.function} ({entry.release})",
            "tags": [entry.app],
            "parameters": [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in route.params
            ],
            "responses": {
                "200": {"description": "the endpoint's answer (JSON, text, bytes or a stream)"},
                "400": _error_response("malformed request body"),
                "404": _error_response("no such endpoint"),
                "413": _error_response("request body too large"),
                "429": _error_response("over the endpoint's burst limit"),
                "502": _error_response("the replica failed mid-request"),
                "504": _error_response("no answer by the deadline"),
            },
        }
        if route.method in ("POST", "PUT", "PATCH"):
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {}}}}
        if entry.endpoint.auth_secret:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = _error_response("missing or wrong bearer token")
        paths.setdefault(entry.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                }
            },
        },
    }
