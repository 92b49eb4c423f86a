"""``@app.endpoint``: a function served over HTTP by the gateway, behind auth and a burst limit."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
from duanflow_proto.messages.release import FunctionSpec

from duanflow._errors import InvalidOptionError
from duanflow._function import Function
from duanflow._image import Image
from duanflow._request import Request
from duanflow._spec import COMMON_OPTIONS, check_options, endpoint_spec, function_spec

if TYPE_CHECKING:
    from duanflow._app import App

ENDPOINT_DECORATOR_OPTIONS: Final = ("method", "path", "auth", "burst", "max_concurrency", "stream", *COMMON_OPTIONS)


def takes_request(f: Callable[..., Any]) -> bool:
    """True when ``f`` wants the :class:`~duanflow.Request` itself: a parameter named ``request`` or typed ``Request``.

    Other endpoint functions get the JSON body's fields, query and path parameters as keyword arguments.
    """
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        return False
    for p in params:
        if p.name == "request" or p.annotation is Request or p.annotation == "Request" or p.annotation == "df.Request":
            return True
    return False


def endpoint_decorator(app: App, options: dict[str, Any]) -> Callable[[Callable[..., Any]], Function[..., Any]]:
    """Check the options of ``@app.endpoint(...)`` now and return the decorator that registers the function."""
    check_options(options, ENDPOINT_DECORATOR_OPTIONS, "app.endpoint")
    opts = dict(options)
    burst = opts.pop("burst", None)
    limit = opts.pop("max_concurrency", None)
    if burst is not None and limit is not None and burst != limit:
        raise InvalidOptionError("burst= and max_concurrency= are the same limit: set one", details={"option": "burst"})
    endpoint = endpoint_spec(
        method=opts.pop("method", "POST"),
        path=opts.pop("path", "/"),
        auth=opts.pop("auth", None),
        max_concurrency=burst if burst is not None else (limit if limit is not None else 0),
        stream=opts.pop("stream", "auto"),
    )
    image = opts.pop("image", None)
    if image is not None and not isinstance(image, Image):
        raise InvalidOptionError(f"image= takes a df.Image, got {image!r}", details={"option": "image"})
    function_spec("options_check", kind="endpoint", endpoint=endpoint, **opts)
    for other in app._registry().values():
        ep = other.spec.endpoint
        if ep is not None and ep.method == endpoint.method and _shape(ep.path) == _shape(endpoint.path):
            raise InvalidOptionError(
                f"{endpoint.method} {endpoint.path} is already served by {other.name} in app {app.name!r}",
                details={"option": "path", "function": other.name},
            )

    def decorate(f: Callable[..., Any]) -> Function[..., Any]:
        if isinstance(f, Function):
            raise InvalidOptionError(f"{f.name} is already a DuanFlow function: decorate it once")
        if not callable(f):
            raise InvalidOptionError(f"@app.endpoint decorates a function, got {f!r}")
        name = getattr(f, "__name__", "")
        spec = function_spec(
            name,
            kind="endpoint",
            endpoint=endpoint,
            is_generator=inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f),
            **opts,
        )
        return app._register(Function(name=spec.name, raw_f=f, spec=spec, app=app, image=image))

    return decorate


def _shape(path: str) -> tuple[str, ...]:
    """A path with its parameter names blanked: ``/a/{x}`` and ``/a/{y}`` claim the same requests."""
    return tuple("{}" if s.startswith("{") else s for s in path.split("/") if s)


def with_bearer_token(spec: FunctionSpec, app_env: Mapping[str, str]) -> FunctionSpec:
    """At deploy: an ``Auth.bearer(NAME)`` endpoint whose app and function env lack ``NAME`` takes it from the
    deploying shell's environment (``DUANFLOW_API_KEY=... duanflow deploy app.py``), so the replica and the router
    (which keeps only a salted digest for the gateway) both know it. Without it anywhere the router refuses the deploy.
    """
    name = spec.endpoint.auth_secret if spec.endpoint is not None else None
    if not name or spec.env.get(name) or app_env.get(name):
        return spec
    value = os.environ.get(name)
    if not value:
        return spec
    return msgspec.structs.replace(spec, env={**spec.env, name: value})
