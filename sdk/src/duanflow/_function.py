"""Function handles: ``.remote()``, ``.remote.aio()``, ``.spawn()``, ``.local()`` and the spec they run with."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import cloudpickle
from duanflow_proto.messages.release import FunctionSpec

from duanflow import _telemetry
from duanflow._client import Client, decode_result, ensure_blocking_allowed, get_client
from duanflow._errors import InvalidInputError
from duanflow._gen import RemoteGen
from duanflow._map import MapMethod

if TYPE_CHECKING:
    from duanflow._app import App
    from duanflow._image import Image

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_GET_TIMEOUT_S = 330.0
"""How long ``FunctionCall.from_id(...).get()`` waits when nothing says how long the function may run."""


class _Remote(Generic[P, R]):
    """``f.remote(...)`` runs ``f`` on a replica and waits; ``await f.remote.aio(...)`` is its async form."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Function[P, R]) -> None:
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function on a replica and wait for its result."""
        fn = self._fn
        ensure_blocking_allowed(f"{fn.name}.remote()", f"`await {fn.name}.remote.aio(...)`")
        client = get_client()
        payload = cloudpickle.dumps((args, kwargs))
        app, name, env = fn._target(client)
        with _telemetry.invoke_span(app, name):
            target, data = client.call_sync(app, name, env, fn._spec, payload, fn._method)
        return decode_result(data, fn.label, target.gpu_label)  # type: ignore[no-any-return]

    async def aio(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function on a replica without blocking the event loop.

        Example::

            result = await classify_ticket.remote.aio("我的模型接口超时了")
        """
        fn = self._fn
        client = get_client()
        payload = cloudpickle.dumps((args, kwargs))
        app, name, env = fn._target(client)
        with _telemetry.invoke_span(app, name):
            target, data = await client.call_async(app, name, env, fn._spec, payload, fn._method)
        return decode_result(data, fn.label, target.gpu_label)  # type: ignore[no-any-return]


class _Spawn(Generic[P, R]):
    """``f.spawn(...)`` starts ``f`` on a replica and returns a :class:`FunctionCall` at once."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Function[P, R]) -> None:
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> FunctionCall[R]:
        """Start the function on a replica; ``.get()`` on the returned call waits for the result."""
        fn = self._fn
        ensure_blocking_allowed(f"{fn.name}.spawn()", f"`await {fn.name}.spawn.aio(...)`")
        client = get_client()
        payload = cloudpickle.dumps((args, kwargs))
        app, name, env = fn._target(client)
        target, call_id = client.run(client.spawn, app, name, env, fn._spec, payload, fn._method)
        return FunctionCall(call_id, function=fn.label, wait_s=target.wait_s, gpu=target.gpu_label)

    async def aio(self, *args: P.args, **kwargs: P.kwargs) -> FunctionCall[R]:
        """Start the function on a replica from async code.

        Example::

            call = await classify_ticket.spawn.aio("我的模型接口超时了")
            result = await call.get.aio()
        """
        fn = self._fn
        client = get_client()
        payload = cloudpickle.dumps((args, kwargs))
        app, name, env = fn._target(client)
        target, call_id = await client.run_async(client.spawn, app, name, env, fn._spec, payload, fn._method)
        return FunctionCall(call_id, function=fn.label, wait_s=target.wait_s, gpu=target.gpu_label)


class _Cancel:
    """``call.cancel()``: a replica skips the call if it has not started, or stops it if it is running.

    ``get()`` then raises :class:`duanflow.CallCancelledError`; a call that already finished keeps its result. An
    async function is cancelled where it awaits; a sync function's thread cannot be stopped, so it runs on,
    detached, and what it returns is dropped.

    Example::

        call = train.spawn(config)
        call.cancel()                # or, in async code: await call.cancel.aio()
    """

    __slots__ = ("_call_id",)

    def __init__(self, call_id: str) -> None:
        self._call_id = call_id

    def __call__(self) -> None:
        """Cancel the call (returns once the cancellation is stored)."""
        ensure_blocking_allowed("FunctionCall.cancel()", "`await call.cancel.aio()`")
        client = get_client()
        client.run(client.cancel, self._call_id)

    async def aio(self) -> None:
        """Cancel the call without blocking the event loop."""
        client = get_client()
        await client.run_async(client.cancel, self._call_id)


class _Get(Generic[R]):
    """``call.get(timeout)`` waits for a spawned call's result; ``await call.get.aio(timeout)`` is its async form."""

    __slots__ = ("_call",)

    def __init__(self, call: FunctionCall[R]) -> None:
        self._call = call

    def __call__(self, timeout: float | None = None) -> R:
        """Wait up to ``timeout`` seconds (default: as long as the function may run) for the result."""
        call = self._call
        ensure_blocking_allowed("FunctionCall.get()", "`await call.get.aio()`")
        if call._data is None:
            client = get_client()
            call._data = client.run(client.wait_result, call.object_id, call._timeout(timeout))
        return decode_result(call._data, call.function, call._gpu)  # type: ignore[no-any-return]

    async def aio(self, timeout: float | None = None) -> R:  # noqa: ASYNC109
        """Wait for the result without blocking the event loop.

        Example::

            result = await call.get.aio(timeout=60)
        """
        call = self._call
        if call._data is None:
            client = get_client()
            call._data = await client.run_async(client.wait_result, call.object_id, call._timeout(timeout))
        return decode_result(call._data, call.function, call._gpu)  # type: ignore[no-any-return]


class FunctionCall(Generic[R]):
    """A call started with ``f.spawn(...)``; ``.get()`` returns its result (or raises its error).

    The result is kept in the platform's results bucket, so ``FunctionCall.from_id(call_id).get()`` works
    from any process.

    Example::

        call = classify_ticket.spawn("我的模型接口超时了")
        print(call.object_id)
        result = call.get(timeout=60)
    """

    get: _Get[R]
    """Wait for the result: ``call.get(timeout=None)``; async: ``await call.get.aio(timeout=None)``."""
    cancel: _Cancel
    """Cancel the call: ``call.cancel()``; async: ``await call.cancel.aio()``."""

    def __init__(self, call_id: str, *, function: str = "", wait_s: float | None = None, gpu: str = "GPU") -> None:
        self._call_id = call_id
        self._function = function or call_id
        self._wait_s = wait_s
        self._gpu = gpu
        self._data: bytes | None = None
        self.get = _Get(self)
        self.cancel = _Cancel(self._call_id)

    @classmethod
    def from_id(cls, call_id: str) -> FunctionCall[Any]:
        """A handle on a spawned call by its id (``call.object_id``), from any process.

        Example::

            result = df.FunctionCall.from_id("fc-0123abcd").get(timeout=60)
        """
        if not isinstance(call_id, str) or not call_id.startswith("fc-"):
            raise InvalidInputError(f"FunctionCall.from_id() takes a call id like 'fc-…', got {call_id!r}")
        return cls(call_id)

    @property
    def object_id(self) -> str:
        """The call's id (``fc-...``)."""
        return self._call_id

    @property
    def function(self) -> str:
        """Name of the function called."""
        return self._function

    def _timeout(self, timeout: float | None) -> float:
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
                raise InvalidInputError(f"get(timeout=) takes seconds >= 0, got {timeout!r}")
            return float(timeout)
        return self._wait_s if self._wait_s is not None else DEFAULT_GET_TIMEOUT_S

    def __repr__(self) -> str:
        return f"<duanflow FunctionCall {self._call_id} of {self._function}>"


class Function(Generic[P, R]):
    """A function of an app: call it here with ``.local()``, or on a GPU replica with ``.remote()``.

    Made by ``@app.function(...)``, or for an already deployed function by :meth:`Function.from_name`.

    Example::

        @app.function(gpu="L40S", memory="48Gi", timeout=300)
        def classify_ticket(text):
            return {"label": "timeout", "input": text}

        classify_ticket.remote("我的模型接口超时了")  # on a replica of the deployed app
        classify_ticket.local("hello")                # here, as plain Python
    """

    remote: _Remote[P, R]
    """Run on a replica and wait for the result: ``f.remote(*args, **kwargs)``; async: ``await f.remote.aio(...)``."""
    spawn: _Spawn[P, R]
    """Start on a replica and return a :class:`FunctionCall`: ``f.spawn(...)``; async: ``await f.spawn.aio(...)``."""
    remote_gen: RemoteGen[P, R]
    """Iterate a generator function's values as its replica yields them: ``for x in f.remote_gen(...)``."""
    map: MapMethod
    """Run over many inputs, yielding results in order: ``f.map(xs)``; async: ``async for r in f.map.aio(xs)``."""
    starmap: MapMethod
    """Like ``map`` with argument tuples: ``f.starmap([(1, 2), (3, 4)])``."""

    def __init__(
        self,
        *,
        name: str,
        raw_f: Callable[P, R] | None = None,
        spec: FunctionSpec | None = None,
        app: App | None = None,
        app_name: str | None = None,
        env: str | None = None,
        image: Image | None = None,
        method: str = "",
    ) -> None:
        self._name = name
        self._method = method
        self._raw_f = raw_f
        self._spec = spec
        self._app = app
        self._app_name = app_name
        self._env = env
        self._image = image
        self.remote = _Remote(self)
        self.spawn = _Spawn(self)
        self.map = MapMethod(self)
        self.remote_gen = RemoteGen(self)
        self.starmap = MapMethod(self, star=True)
        if raw_f is not None:
            self.__doc__ = raw_f.__doc__
            self.__wrapped__ = raw_f
            self.__name__ = getattr(raw_f, "__name__", name)
            self.__qualname__ = getattr(raw_f, "__qualname__", name)
            self.__module__ = getattr(raw_f, "__module__", __name__)

    @classmethod
    def from_name(cls, app: str, name: str, env: str | None = None) -> Function[..., Any]:
        """A handle on a deployed function, from any Python process (resolved on the first call).

        Example::

            classify = df.Function.from_name("hello-gpu", "classify_ticket")
            classify.remote("我的模型接口超时了")
        """
        if not isinstance(app, str) or not app or not isinstance(name, str) or not name:
            raise InvalidInputError(
                f"Function.from_name() takes an app name and a function name, got {app!r}, {name!r}"
            )
        if env is not None and (not isinstance(env, str) or not env):
            raise InvalidInputError(f"Function.from_name(env=) takes an environment name, got {env!r}")
        return Function(name=name, app_name=app, env=env)

    @property
    def name(self) -> str:
        """The function's name within its app."""
        return self._name

    @property
    def label(self) -> str:
        """How messages name it: ``fn``, or ``Class.method`` for a method of a lifecycle class."""
        return f"{self._name}.{self._method}" if self._method else self._name

    def _method_handle(self, method: str, local: Callable[..., Any]) -> Function[..., Any]:
        """A handle on one ``@df.method`` of the class this function deploys (``local`` runs it here)."""
        handle: Function[..., Any] = Function(
            name=self._name,
            raw_f=local,
            spec=self._spec,
            app=self._app,
            app_name=self._app_name,
            env=self._env,
            image=self._image,
            method=method,
        )
        handle.__name__ = handle.__qualname__ = f"{self._name}.{method}"
        return handle

    @property
    def app_name(self) -> str:
        """The name of the app the function belongs to."""
        if self._app is not None:
            return self._app.name
        return self._app_name or ""

    @property
    def raw_f(self) -> Callable[P, R]:
        """The user's own callable (what replicas run)."""
        if self._raw_f is None:
            raise InvalidInputError(f"{self._name} is a handle on a deployed function: it has no local code")
        return self._raw_f

    @property
    def spec(self) -> FunctionSpec:
        """The function's resource spec (for ``from_name`` handles: the deployed one, asked of the platform)."""
        if self._spec is None:
            client = get_client()
            app, name, env = self._target(client)
            self._spec = client.run(client.resolve, app, name, env).spec
        return self._spec

    @property
    def image(self) -> Image | None:
        """The image given to the decorator, if any."""
        return self._image

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function here, in this process, as plain Python.

        Example::

            classify_ticket.local("我的模型接口超时了")
        """
        return self.raw_f(*args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function here, as plain Python (same as :meth:`local`)."""
        return self.raw_f(*args, **kwargs)

    def _target(self, client: Client) -> tuple[str, str, str]:
        return self.app_name, self._name, self._env or client.env

    def __repr__(self) -> str:
        kind = self._spec.kind if self._spec else "function"
        return f"<duanflow {kind} {self.app_name}.{self.label}>"
