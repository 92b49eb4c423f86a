"""``df.App``: the deployment unit, and the ``@app.function`` decorator that declares its functions."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar, overload

from duanflow_proto import subjects
from duanflow_proto.messages.jobs import JobSpec
from duanflow_proto.messages.release import AppSpec, FunctionSpec

from duanflow._auth import Auth
from duanflow._cls import Cls, cls_decorator
from duanflow._endpoint import endpoint_decorator, with_bearer_token
from duanflow._errors import InvalidOptionError
from duanflow._function import Function
from duanflow._image import Image, env_dict
from duanflow._job import JobFunction
from duanflow._queue import Queue
from duanflow._retries import Retries
from duanflow._secret import secret_names
from duanflow._spec import (
    COMMON_OPTIONS,
    DEFAULT_JOB_TIMEOUT_S,
    JOB_OPTIONS,
    WORKER_OPTIONS,
    check_options,
    function_spec,
    queue_name,
)

P = ParamSpec("P")
R = TypeVar("R")

PYTHON: Final = f"{sys.version_info.major}.{sys.version_info.minor}"
APP_OPTIONS: Final = ("image", "secrets", "env")

_apps: weakref.WeakSet[App] = weakref.WeakSet()
"""Every App built in this process (replicas look an App up by name when it is not a module global)."""


class App:
    """The deployment unit: a named set of functions with their image, secrets and env.

    Example::

        import duanflow as df

        app = df.App("hello-gpu")

        @app.function(gpu="L40S", memory="48Gi", timeout=300)
        def classify_ticket(text):
            return {"label": "timeout", "input": text}
    """

    def __init__(
        self,
        name: str,
        *,
        image: Image | None = None,
        secrets: object = None,
        env: object = None,
        **unknown: Any,
    ) -> None:
        check_options(unknown, APP_OPTIONS, "App")
        if not isinstance(name, str):
            raise InvalidOptionError(f"App() takes the app's name as a str, got {name!r}", details={"option": "name"})
        try:
            self._name = subjects.token(name)
        except ValueError as exc:
            raise InvalidOptionError(f"App name: {exc}", details={"option": "name", "value": name}) from None
        if image is not None and not isinstance(image, Image):
            raise InvalidOptionError(f"App(image=) takes a df.Image, got {image!r}", details={"option": "image"})
        self._image = image
        self._secrets = secret_names(secrets)
        self._env = env_dict(env, "App(env=)")
        self._functions: dict[str, Function[..., Any]] = {}
        self._entrypoints: dict[str, Callable[..., Any]] = {}
        self._module_file = _caller_file()
        _apps.add(self)

    @property
    def name(self) -> str:
        """The app's name (a lowercase token, as deploys and subjects use it)."""
        return self._name

    @property
    def image(self) -> Image | None:
        """The app's image (None: the default Debian slim image)."""
        return self._image

    @overload
    def function(self, _f: Callable[P, R], /) -> Function[P, R]: ...

    @overload
    def function(
        self,
        _f: None = None,
        /,
        *,
        gpu: str | list[str] | None = None,
        memory: str | int | None = None,
        timeout: float = 300.0,
        concurrency: int = 1,
        keep_warm: int = 0,
        scale_to: int | None = None,
        region: str | list[str] | None = None,
        optimize: str = "latency",
        max_price: float | None = None,
        gpu_count: int | None = None,
        retries: object = 0,
        secrets: object = (),
        image: Image | None = None,
        env: dict[str, str] | None = None,
        **unknown: Any,
    ) -> Callable[[Callable[P, R]], Function[P, R]]: ...

    def function(
        self,
        _f: Callable[..., Any] | None = None,
        /,
        *,
        gpu: str | list[str] | None = None,
        memory: str | int | None = None,
        timeout: float = 300.0,
        concurrency: int = 1,
        keep_warm: int = 0,
        scale_to: int | None = None,
        region: str | list[str] | None = None,
        optimize: str = "latency",
        max_price: float | None = None,
        gpu_count: int | None = None,
        retries: object = 0,
        secrets: object = (),
        image: Image | None = None,
        env: dict[str, str] | None = None,
        **unknown: Any,
    ) -> Function[..., Any] | Callable[[Callable[..., Any]], Function[..., Any]]:
        """Declare a function of this app; its options are checked here, when the decorator runs.

        ``gpu`` is a type (``"H100"``), a list in order of preference, or ``"A100:80GB:2"``; ``memory`` is GPU
        memory per GPU (``"48Gi+"`` means at least); ``timeout`` is seconds per input; ``concurrency`` inputs
        run at once per replica; ``keep_warm`` replicas stay ready, up to ``scale_to``.

        Example::

            @app.function(gpu="H100", memory="80Gi", concurrency=12)
            def summarize(document: str) -> str:
                return document[:100]

            summarize.remote("...")
        """
        check_options(unknown, COMMON_OPTIONS, "app.function")
        if image is not None and not isinstance(image, Image):
            raise InvalidOptionError(f"image= takes a df.Image, got {image!r}", details={"option": "image"})
        options: dict[str, Any] = {
            "gpu": gpu,
            "memory": memory,
            "timeout": timeout,
            "concurrency": concurrency,
            "keep_warm": keep_warm,
            "scale_to": scale_to,
            "region": region,
            "optimize": optimize,
            "max_price": max_price,
            "gpu_count": gpu_count,
            "retries": retries,
            "secrets": secrets,
            "env": env,
        }
        # Validate now (not at the first call) so a bad option fails where it is written.
        function_spec("options_check", **options)

        def decorate(f: Callable[..., Any]) -> Function[..., Any]:
            if isinstance(f, Function):
                raise InvalidOptionError(f"{f.name} is already a DuanFlow function: decorate it once")
            if not callable(f):
                raise InvalidOptionError(f"@app.function decorates a function, got {f!r}")
            name = getattr(f, "__name__", "")
            spec = function_spec(
                name, is_generator=inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f), **options
            )
            return self._register(Function(name=spec.name, raw_f=f, spec=spec, app=self, image=image))

        if _f is not None:
            return decorate(_f)
        return decorate

    def cls(self, **options: Any) -> Callable[[type], Cls]:
        """Declare a lifecycle class: one instance per replica, ``@df.enter`` hooks once, ``@df.method`` calls.

        Takes the options of :meth:`function` (``gpu``, ``concurrency``, ``timeout``, ``retries``...).

        Example::

            @app.cls(gpu="H100", concurrency=4)
            class Model:
                @df.enter()
                def load(self):
                    self.scale = 2

                @df.method()
                def predict(self, x):
                    return self.scale * x

            Model().predict.remote(21)
        """
        return cls_decorator(self, dict(options))

    def endpoint(
        self,
        *,
        method: str = "POST",
        path: str = "/",
        auth: Auth | None = None,
        burst: int | None = None,
        stream: str = "auto",
        **options: Any,
    ) -> Callable[[Callable[..., Any]], Function[..., Any]]:
        """Serve a function over HTTP through the gateway, at ``method`` + ``path`` (``{name}`` segments allowed).

        ``auth=df.Auth.bearer("NAME")`` requires ``Authorization: Bearer <value of NAME>`` (from the app's env);
        ``burst`` caps the requests in flight at once **per gateway instance** (above it: 429 with ``Retry-After``);
        behind N gateways the endpoint takes up to N * ``burst`` at once, so divide by the number of gateways you run
        when a total matters. ``stream`` is how a returned generator is sent: ``auto``
        (SSE when the client accepts ``text/event-stream``, else chunked), ``chunked`` or ``sse``. Every option of
        ``@app.function`` applies too (``gpu``, ``keep_warm``, ``timeout``...). The function takes the
        :class:`~duanflow.Request` (a parameter named ``request``) and returns dict/list (JSON), str (text),
        bytes (binary), a :class:`~duanflow.Response`, or a generator (streamed).

        Example::

            @app.endpoint(method="POST", path="/v1/chat/completions", gpu="H100", keep_warm=1,
                          auth=df.Auth.bearer("DUANFLOW_API_KEY"))
            def chat_completions(request):
                body = request.json()
                return {"model": "duanflow-qwen", "choices": [{"message": body["messages"][-1]}]}
        """
        return endpoint_decorator(
            self, {"method": method, "path": path, "auth": auth, "burst": burst, "stream": stream, **options}
        )

    def worker(self, *, queue: Queue | str, **options: Any) -> Callable[[Callable[..., Any]], Function[..., Any]]:
        """Run a function on every job of ``queue``: replicas pull jobs and call the function with each one.

        A failing job is retried with exponential backoff up to the queue's ``max_retries`` (``retries=`` may
        give a :class:`~duanflow.Retries` for the delays; its count is the queue's), then moved to the queue's
        dead letters with its error and traceback.
        Takes the options of :meth:`function` (``gpu``, ``scale_to``, ``timeout``, ``concurrency``...).

        Example::

            audio_queue = df.Queue("audio-inbox", max_retries=3)

            @app.worker(queue=audio_queue, gpu="A10G", scale_to=12)
            def transcribe_audio(job):
                return df.storage.write_json(job["output_url"], {"text": "..."})
        """
        check_options(options, WORKER_OPTIONS, "app.worker")
        name_of_queue = queue_name(queue)
        max_retries = queue.max_retries if isinstance(queue, Queue) else Queue(name_of_queue).max_retries
        image = options.pop("image", None)
        if image is not None and not isinstance(image, Image):
            raise InvalidOptionError(f"image= takes a df.Image, got {image!r}", details={"option": "image"})
        delays = options.pop("retries", None)
        if delays is not None and not isinstance(delays, Retries):
            raise InvalidOptionError(
                "@app.worker takes its retry count from the queue (df.Queue(name, max_retries=n)); retries= "
                f"only takes df.Retries(...) for the delays, got {delays!r}",
                details={"option": "retries"},
            )
        options["retries"] = dataclasses.replace(delays or Retries(max_retries), max_retries=max_retries)
        function_spec("options_check", kind="worker", queue=name_of_queue, **options)

        def decorate(f: Callable[..., Any]) -> Function[..., Any]:
            if isinstance(f, Function) or not callable(f):
                raise InvalidOptionError(f"@app.worker decorates a plain function, got {f!r}")
            spec = function_spec(getattr(f, "__name__", ""), kind="worker", queue=name_of_queue, **options)
            return self._register(Function(name=spec.name, raw_f=f, spec=spec, app=self, image=image))

        return decorate

    def job(self, **options: Any) -> Callable[[Callable[..., Any]], JobFunction[..., Any]]:
        """Declare a long GPU job: each ``.spawn(...)`` runs once on its own replica, then frees its GPUs.

        ``gpu_count`` GPUs on one host (``CUDA_VISIBLE_DEVICES`` lists them), never shared with another job;
        past ``timeout`` seconds (default 3600) the run is stopped and marked ``timed_out``. Takes ``gpu``,
        ``memory``, ``timeout``, ``region``, ``optimize``, ``max_price``, ``gpu_count``, ``secrets``,
        ``image``, ``env``; deploys keep no replica of it warm. ``.remote(...)`` submits and waits.

        Example::

            @app.job(gpu="A100-80G", gpu_count=4, timeout=10800)
            def train_lora(dataset_uri):
                return trainer.fit(dataset_uri, rank=16)

            job = train_lora.spawn("s3://datasets/tickets.jsonl")   # a df.Job
            job.status().state, job.get()
        """
        check_options(options, JOB_OPTIONS, "app.job")
        image = options.pop("image", None)
        if image is not None and not isinstance(image, Image):
            raise InvalidOptionError(f"image= takes a df.Image, got {image!r}", details={"option": "image"})
        options.setdefault("timeout", DEFAULT_JOB_TIMEOUT_S)
        function_spec("options_check", kind="job", job=JobSpec(), **options)

        def decorate(f: Callable[..., Any]) -> JobFunction[..., Any]:
            if isinstance(f, Function) or not callable(f):
                raise InvalidOptionError(f"@app.job decorates a plain function, got {f!r}")
            if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) or inspect.isclass(f):
                raise InvalidOptionError(f"@app.job decorates a function that returns once, got {f!r}")
            spec = function_spec(getattr(f, "__name__", ""), kind="job", job=JobSpec(), **options)
            fn: JobFunction[..., Any] = JobFunction(name=spec.name, raw_f=f, spec=spec, app=self, image=image)
            self._register(fn)
            return fn

        return decorate

    def local_entrypoint(self) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Mark a function that ``duanflow run FILE::NAME`` runs here, on this machine, after deploying the app.

        Its parameters become command-line options, as for ``duanflow run`` of a remote function; a ``.map()``
        inside it shows a progress bar. The function itself is returned unchanged.

        Example::

            @app.local_entrypoint()
            def main(n: int = 1000):
                print(sum(square.map(range(n))))

            # duanflow run app.py::main --n 100000
        """

        def decorate(f: Callable[P, R]) -> Callable[P, R]:
            name = getattr(f, "__name__", "")
            if not callable(f) or not name or name in self._functions:
                raise InvalidOptionError(
                    f"@app.local_entrypoint() takes a plain function whose name is not a function of app "
                    f"{self._name!r}, got {f!r}",
                    details={"function": name},
                )
            self._entrypoints[name] = f
            return f

        return decorate

    def _local_entrypoints(self) -> dict[str, Callable[..., Any]]:
        """The app's local entrypoints by name (``duanflow run`` looks them up)."""
        return dict(self._entrypoints)

    def _register(self, fn: Function[..., Any]) -> Function[..., Any]:
        if fn.name in self._functions:
            raise InvalidOptionError(
                f"app {self._name!r} already has a function named {fn.name!r}: function names must be unique",
                details={"function": fn.name},
            )
        self._functions[fn.name] = fn
        return fn

    def _registry(self) -> dict[str, Function[..., Any]]:
        """Every function of the app by name (each with ``.raw_f`` and ``.spec``); replicas and the CLI use it."""
        return dict(self._functions)

    def build_spec(self, module: str | None = None) -> AppSpec:
        """The app's declarative spec, as ``duanflow deploy`` sends it.

        ``module`` is the module replicas import by name (default: the stem of the file that built the App).

        Example::

            spec = app.build_spec()          # from hello.py: module "hello"
            [f.name for f in spec.functions]
        """
        mod = module or (self._module_file.stem if self._module_file else "")
        if not mod or not mod.isidentifier():
            raise InvalidOptionError(
                f"cannot tell which module app {self._name!r} lives in ({mod!r}): pass build_spec(module='...')"
            )
        image = self._image
        for fn in self._functions.values():
            if fn.image is None or fn.image == image:
                continue
            if image is not None:
                raise InvalidOptionError(
                    f"{fn.name} asks for another image than the rest of app {self._name!r}: one image per app "
                    "for now; set it once with df.App(name, image=...)",
                    details={"function": fn.name, "option": "image"},
                )
            image = fn.image
        functions: list[FunctionSpec] = [with_bearer_token(fn.spec, self._env) for fn in self._functions.values()]
        return AppSpec(
            name=self._name,
            module=mod,
            functions=functions,
            image=(image or Image()).to_spec(default_python=PYTHON),
            secrets=list(self._secrets),
            env=dict(self._env),
            python=PYTHON,
        )

    def __repr__(self) -> str:
        return f"<duanflow App {self._name} ({len(self._functions)} functions)>"


def find_app(module: object, name: str) -> App:
    """The App named ``name`` among ``module``'s globals (or built while importing it)."""
    candidates = [v for v in vars(module).values() if isinstance(v, App) and v.name == name]
    if not candidates:
        file = getattr(module, "__file__", None)
        candidates = [a for a in list(_apps) if a.name == name and (file is None or str(a._module_file) == file)]
    if not candidates:
        # `duanflow deploy app.py --name other` deploys the file's one App under another name
        only = {id(v): v for v in vars(module).values() if isinstance(v, App)}
        if len(only) == 1:
            return next(iter(only.values()))
    if not candidates:
        found = sorted({v.name for v in vars(module).values() if isinstance(v, App)})
        raise LookupError(
            f"module {getattr(module, '__name__', module)!r} defines no df.App named {name!r}"
            + (f" (it defines {', '.join(found)})" if found else "")
        )
    return candidates[0]


def _caller_file() -> Path | None:
    frame = sys._getframe(2)
    # Skip frames inside this package (subclasses of App calling super().__init__).
    while frame is not None and frame.f_globals.get("__name__", "").startswith("duanflow."):
        frame = frame.f_back  # type: ignore[assignment]
    file = frame.f_globals.get("__file__") if frame is not None else None
    return Path(file).resolve() if isinstance(file, str) else None
