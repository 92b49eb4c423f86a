"""Resource options of functions, validated when the decorator runs, turned into a wire ``FunctionSpec``.

Pure functions over plain data: every decorator option; the GPU options (types, memory, count, region, price cap,
optimisation target) are parsed by :mod:`duanflow._gpuspec`, shared with the router's tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

from duanflow_proto import subjects
from duanflow_proto.messages.jobs import JobSpec
from duanflow_proto.messages.release import EndpointSpec, FunctionSpec

from duanflow import _gpuspec
from duanflow._auth import Auth
from duanflow._errors import InvalidOptionError
from duanflow._image import env_dict
from duanflow._queue import Queue
from duanflow._retries import Retries
from duanflow._secret import secret_names

HTTP_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")
STREAM_MODES: Final = ("auto", "chunked", "sse")

COMMON_OPTIONS: Final = (
    "gpu",
    "memory",
    "timeout",
    "concurrency",
    "keep_warm",
    "scale_to",
    "region",
    "optimize",
    "max_price",
    "gpu_count",
    "retries",
    "secrets",
    "image",
    "env",
)
ENDPOINT_OPTIONS: Final = ("method", "path", "auth", "max_concurrency", "stream", *COMMON_OPTIONS)
WORKER_OPTIONS: Final = ("queue", *COMMON_OPTIONS)
JOB_OPTIONS: Final = (
    "gpu",
    "memory",
    "timeout",
    "region",
    "optimize",
    "max_price",
    "gpu_count",
    "secrets",
    "image",
    "env",
)
"""``@app.job``: one dedicated replica per run, so no concurrency, warm replicas, scaling or retries."""
DEFAULT_JOB_TIMEOUT_S: Final = 3600.0
"""A job's timeout when ``@app.job`` names none."""

_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]*$")


def _positive_number(name: str, value: object, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < 0 if allow_zero else value <= 0):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidOptionError(f"{name}= must be a number {bound}, got {value!r}", details={"option": name})
    return float(value)  # type: ignore[arg-type]


def _int_at_least(name: str, value: object, low: int, high: int = 10_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidOptionError(
            f"{name}= must be an int from {low} to {high}, got {value!r}", details={"option": name}
        )
    return value


def check_options(given: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    """Raise naming the first unknown option and the valid ones."""
    for key in given:
        if key not in valid:
            raise InvalidOptionError(
                f"{where}() got an unknown option {key!r}; valid options: {', '.join(valid)}",
                details={"option": key, "valid": ",".join(valid)},
            )


def function_spec(
    name: str,
    *,
    kind: str = "function",
    gpu: object = None,
    memory: object = None,
    timeout: object = 300.0,
    concurrency: object = 1,
    keep_warm: object = 0,
    scale_to: object = None,
    region: object = None,
    optimize: object = "latency",
    max_price: object = None,
    gpu_count: object = None,
    retries: object = 0,
    secrets: object = (),
    env: object = None,
    endpoint: EndpointSpec | None = None,
    queue: str | None = None,
    is_generator: bool = False,
    job: JobSpec | None = None,
) -> FunctionSpec:
    """Validate a decorator's options and build the function's wire spec.

    >>> function_spec("classify_ticket", gpu="L40S", memory="48Gi", timeout=300).gpu_memory_mb
    49152
    """
    try:
        subjects.token(name)
    except ValueError as exc:
        raise InvalidOptionError(f"function name {name!r}: {exc}") from None

    try:
        request = _gpuspec.gpu_request(
            gpu=gpu, memory=memory, gpu_count=gpu_count, region=region, max_price=max_price, optimize=optimize
        )
    except _gpuspec.GpuSpecError as exc:
        details = {"option": exc.option}
        if exc.valid:
            details["valid"] = ",".join(exc.valid)
        raise InvalidOptionError(exc.message, details=details) from None
    gpu_fields = request.function_spec_fields()

    timeout_s = _positive_number("timeout", timeout)
    conc = _int_at_least("concurrency", concurrency, 1, 1000)
    warm = _int_at_least("keep_warm", keep_warm, 0, 1000)
    if scale_to is None:
        max_replicas = max(1, warm)
    else:
        max_replicas = _int_at_least("scale_to", scale_to, 1, 10_000)
        if max_replicas < warm:
            raise InvalidOptionError(
                f"scale_to={max_replicas} is below keep_warm={warm}: scale_to must be >= keep_warm"
            )
    if isinstance(retries, Retries):
        policy = retries
    elif isinstance(retries, int) and not isinstance(retries, bool):
        policy = Retries(max_retries=retries)
    else:
        raise InvalidOptionError(f"retries= takes an int or df.Retries(...), got {retries!r}")

    return FunctionSpec(
        name=name,
        kind=kind,
        **gpu_fields,  # type: ignore[arg-type]
        timeout_s=timeout_s,
        concurrency=conc,
        keep_warm=warm,
        scale_to=max_replicas,
        retries=policy.max_retries,
        retry_backoff=float(policy.backoff_coefficient),
        retry_initial_delay_s=float(policy.initial_delay),
        retry_max_delay_s=float(policy.max_delay),
        secrets=secret_names(secrets),
        env=env_dict(env, "env="),
        endpoint=endpoint,
        queue=queue,
        is_generator=is_generator,
        job=job,
    )


def endpoint_spec(
    *,
    method: object = "POST",
    path: object = "/",
    auth: object = None,
    max_concurrency: object = 0,
    stream: object = "auto",
) -> EndpointSpec:
    """Validate an endpoint's HTTP options.

    >>> endpoint_spec(method="post", path="/v1/chat/completions").method
    'POST'
    """
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise InvalidOptionError(
            f"method={method!r} is not an HTTP method; valid values: {', '.join(HTTP_METHODS)}",
            details={"option": "method", "valid": ",".join(HTTP_METHODS)},
        )
    if not isinstance(path, str) or not _PATH.match(path) or "//" in path:
        raise InvalidOptionError(f"path={path!r} must start with '/' and be a URL path like '/v1/chat/completions'")
    if auth is not None and not isinstance(auth, Auth):
        raise InvalidOptionError(f"auth= takes df.Auth.bearer('SECRET_NAME') or df.Auth.none(), got {auth!r}")
    burst = _int_at_least("max_concurrency", max_concurrency, 0, 1_000_000)
    if stream not in STREAM_MODES:
        raise InvalidOptionError(f"stream={stream!r} is not a streaming mode; valid values: {', '.join(STREAM_MODES)}")
    return EndpointSpec(
        method=method.upper(),
        path=path,
        auth_secret=auth.secret if auth else None,
        max_concurrency=burst,
        stream=str(stream),
    )


def queue_name(queue: object) -> str:
    """The name of ``queue=`` (a :class:`Queue` or a name)."""
    if isinstance(queue, Queue):
        return queue.name
    if isinstance(queue, str):
        return Queue(queue).name
    raise InvalidOptionError(
        f"queue= takes df.Queue('name') or a queue name, got {queue!r}", details={"option": "queue"}
    )
