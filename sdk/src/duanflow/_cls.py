"""Lifecycle classes: ``@app.cls(...)`` with ``@df.enter()``, ``@df.exit()`` and ``@df.method()``.

A class is deployed as one unit (one invocation subject, one set of replicas, named after the class): each
replica builds one instance, runs its ``@df.enter`` hooks once before the first input, serves the
``@df.method`` calls on it (the method's name travels in the invocation), and runs its ``@df.exit`` hooks after
draining on SIGTERM. ``Model().predict.remote(x)`` calls a method; ``Model().predict.local(x)`` runs it here on
one local instance (its enter hooks run once, on first use).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from duanflow._errors import InvalidInputError, InvalidOptionError

if TYPE_CHECKING:
    from duanflow._app import App
    from duanflow._function import Function

F = TypeVar("F", bound=Callable[..., Any])

MARK: Final = "__duanflow_lifecycle__"
KINDS: Final = ("enter", "exit", "method")


def _marker(kind: str) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        if not callable(f):
            raise InvalidOptionError(f"@df.{kind}() decorates a method, got {f!r}")
        setattr(f, MARK, kind)
        return f

    return decorate


def enter() -> Callable[[F], F]:
    """Mark a method of an ``@app.cls`` class to run once per replica, before its first input.

    Example::

        @app.cls(gpu="H100")
        class Model:
            @df.enter()
            def load(self):
                self.weights = load_weights()
    """
    return _marker("enter")


def exit() -> Callable[[F], F]:
    """Mark a method of an ``@app.cls`` class to run once when its replica stops (after the last input).

    Example::

        @df.exit()
        def close(self):
            self.session.close()
    """
    return _marker("exit")


def method() -> Callable[[F], F]:
    """Mark a method of an ``@app.cls`` class as callable remotely: ``Model().predict.remote(x)``.

    Example::

        @df.method()
        def predict(self, x):
            return self.weights * x
    """
    return _marker("method")


def marked(cls: type, kind: str) -> list[str]:
    """Names of the methods of ``cls`` marked ``kind``, base classes first, in definition order."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if getattr(value, MARK, None) == kind and name not in names:
                names.append(name)
    return names


def method_names(cls: type) -> set[str]:
    """The ``@df.method`` names of ``cls``."""
    return set(marked(cls, "method"))


def instantiate(cls: type) -> Any:
    """The replica's instance: built once, its sync ``@df.enter`` hooks run (async ones run in the loop)."""
    obj = cls()
    for name in marked(cls, "enter"):
        hook = getattr(obj, name)
        if not inspect.iscoroutinefunction(hook):
            hook()
    return obj


async def run_hooks(obj: Any, kind: str, *, asynchronous: bool) -> None:
    """Run the hooks of ``obj`` marked ``kind`` that are (or are not) coroutine functions."""
    for name in marked(type(obj), kind):
        hook = getattr(obj, name)
        if inspect.iscoroutinefunction(hook) is asynchronous:
            if asynchronous:
                await hook()
            else:
                hook()


class Cls:
    """What ``@app.cls(...)`` makes of a class: call it (``Model()``) for a handle whose methods run remotely.

    Example::

        @app.cls(gpu="H100", concurrency=4)
        class Model:
            @df.enter()
            def load(self):
                self.scale = 2

            @df.method()
            def predict(self, x):
                return self.scale * x

        Model().predict.remote(21)   # 42, on a replica that ran load() once
    """

    def __init__(self, user_cls: type, function: Function[..., Any]) -> None:
        self._user_cls = user_cls
        self._function = function
        self._local: Any = None
        self.__doc__ = user_cls.__doc__
        self.__name__ = user_cls.__name__
        self.__qualname__ = user_cls.__qualname__
        self.__module__ = user_cls.__module__
        methods = marked(user_cls, "method")
        if not methods:
            raise InvalidOptionError(
                f"@app.cls class {user_cls.__name__} has no @df.method(): mark the methods callers may run"
            )
        self._methods = methods

    @property
    def name(self) -> str:
        """The class's name (its deployed name and invocation subject token)."""
        return self._function.name

    @property
    def user_cls(self) -> type:
        """The user's own class."""
        return self._user_cls

    def __call__(self, *args: Any, **kwargs: Any) -> _Instance:
        """A handle on the class's replicas (the class is built on each replica, with no arguments)."""
        if args or kwargs:
            raise InvalidInputError(
                f"{self._user_cls.__name__}() takes no arguments: a replica builds the class itself; "
                "pass per-call values to the methods instead"
            )
        return _Instance(self)

    def _local_instance(self) -> Any:
        if self._local is None:
            obj = instantiate(self._user_cls)
            for name in marked(self._user_cls, "enter"):
                hook = getattr(obj, name)
                if inspect.iscoroutinefunction(hook):
                    raise InvalidInputError(f"{self.name}.{name} is async: .local() runs sync @df.enter hooks only")
            self._local = obj
        return self._local

    def __repr__(self) -> str:
        return f"<duanflow cls {self._function.app_name}.{self.name}>"


class _Instance:
    """``Model()``: its ``@df.method`` attributes are function handles."""

    def __init__(self, owner: Cls) -> None:
        self._owner = owner
        self._handles: dict[str, Function[..., Any]] = {}

    def __getattr__(self, name: str) -> Function[..., Any]:
        owner = self._owner
        if name.startswith("_") or name not in owner._methods:
            raise AttributeError(f"{owner.name} has no @df.method {name!r} (it has {', '.join(owner._methods)})")
        handle = self._handles.get(name)
        if handle is None:
            handle = owner._function._method_handle(
                name, lambda *a, **k: getattr(owner._local_instance(), name)(*a, **k)
            )
            self._handles[name] = handle
        return handle


def cls_decorator(app: App, options: dict[str, Any]) -> Callable[[type], Cls]:
    """The body of ``@app.cls(...)``: validate the options now, register the class as one deployable unit."""
    from duanflow._function import Function
    from duanflow._image import Image
    from duanflow._spec import COMMON_OPTIONS, check_options, function_spec

    check_options(options, COMMON_OPTIONS, "app.cls")
    image = options.pop("image", None)
    if image is not None and not isinstance(image, Image):
        raise InvalidOptionError(f"image= takes a df.Image, got {image!r}", details={"option": "image"})
    function_spec("options_check", kind="cls", **options)

    def decorate(user_cls: type) -> Cls:
        if not inspect.isclass(user_cls):
            raise InvalidOptionError(f"@app.cls decorates a class, got {user_cls!r}")
        spec = function_spec(user_cls.__name__, kind="cls", **options)
        fn: Function[..., Any] = Function(name=spec.name, raw_f=user_cls, spec=spec, app=app, image=image)
        app._register(fn)
        return Cls(user_cls, fn)

    return decorate
