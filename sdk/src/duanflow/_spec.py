"""Resource options of functions, validated when the decorator runs, turned into a wire ``FunctionSpec``.

Pure functions over plain data: the GPU catalog, GPU specs (``"H100"``, ``["H100", "A100-80G"]``,
``"A100:80GB:2"``), memory sizes (``"48Gi+"``, ``"80Gi"``, ``"24GB"``) and every decorator option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from duanflow_proto import subjects
from duanflow_proto.messages.release import EndpointSpec, FunctionSpec

from duanflow._auth import Auth
from duanflow._errors import InvalidOptionError
from duanflow._image import env_dict
from duanflow._queue import Queue
from duanflow._retries import Retries
from duanflow._secret import secret_names

MIB: Final = 1024 * 1024

GPU_MEMORY_MB: Final[dict[str, int]] = {
    "T4": 16 * 1024,
    "L4": 24 * 1024,
    "A10G": 24 * 1024,
    "L40S": 48 * 1024,
    "A100-40G": 40 * 1024,
    "A100-80G": 80 * 1024,
    "H100": 80 * 1024,
    "H200": 141 * 1024,
    "B200": 180 * 1024,
}
"""The GPU catalog: canonical type → nominal memory per GPU (MiB)."""

GPU_TYPES: Final = tuple(GPU_MEMORY_MB)

GPU_ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "A100": ("A100-80G", "A100-40G"),
    "A100-40GB": ("A100-40G",),
    "A100-80GB": ("A100-80G",),
    "A10": ("A10G",),
    "H100-80G": ("H100",),
    "H100-80GB": ("H100",),
    "H200-141G": ("H200",),
    "H200-141GB": ("H200",),
    "L40S-48G": ("L40S",),
    "L40S-48GB": ("L40S",),
}
"""Other spellings users write, each meaning one or more canonical types."""

MAX_GPU_COUNT: Final = 16
OPTIMIZE_TARGETS: Final = ("latency", "price")
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

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*(\+)?\s*$", re.IGNORECASE)
_UNIT_BYTES: Final[dict[str, int]] = {
    "": MIB,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]*$")


@dataclass(frozen=True, slots=True)
class MemorySpec:
    """A GPU memory request: ``mb`` MiB per GPU, a floor (``48Gi+``) or exact (``80Gi``)."""

    mb: int
    exact: bool


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A parsed ``gpu=`` value."""

    types: tuple[str, ...]
    count: int | None = None
    memory: MemorySpec | None = None


def parse_memory(value: object, *, option: str = "memory") -> MemorySpec:
    """Parse a memory size to MiB: ``"48Gi+"`` (at least), ``"80Gi"``, ``"24GB"``, ``"512Mi"``, or an int of MiB.

    Binary units (``Ki``, ``Mi``, ``Gi``, ``Ti``) are powers of 1024; decimal ones (``K``/``KB`` ... ``T``/``TB``)
    powers of 1000, as Kubernetes reads them. A trailing ``+`` makes it a floor; ``exact`` is False for floors.

    >>> parse_memory("48Gi+")
    MemorySpec(mb=49152, exact=False)
    >>> parse_memory("24GB").mb
    22889
    """
    if isinstance(value, bool):
        raise _bad_memory(option, value)
    if isinstance(value, int):
        if value <= 0:
            raise _bad_memory(option, value)
        return MemorySpec(mb=value, exact=True)
    if not isinstance(value, str):
        raise _bad_memory(option, value)
    match = _MEMORY.match(value)
    if not match:
        raise _bad_memory(option, value)
    number, unit, plus = match.groups()
    unit_key = (unit or "").upper()
    # A bare number with 'B' (e.g. "1024B") would be bytes; we keep a bare number meaning MiB.
    mb = math.ceil(float(number) * _UNIT_BYTES[unit_key] / MIB)
    if mb <= 0:
        raise _bad_memory(option, value)
    return MemorySpec(mb=mb, exact=plus is None)


def _bad_memory(option: str, value: object) -> InvalidOptionError:
    return InvalidOptionError(
        f"{option}={value!r} is not a memory size: write e.g. '48Gi+' (at least 48 GiB), '80Gi', '24GB' or '512Mi'",
        details={"option": option, "value": repr(value)},
    )


def canonical_gpu(name: str) -> tuple[str, ...]:
    """Canonical catalog types meant by one GPU name (case-insensitive; aliases expand).

    >>> canonical_gpu("a100")
    ('A100-80G', 'A100-40G')
    """
    key = name.strip().upper()
    if key in GPU_MEMORY_MB:
        return (key,)
    if key in GPU_ALIASES:
        return GPU_ALIASES[key]
    raise InvalidOptionError(
        f"gpu={name!r} is not a GPU type DuanFlow knows; valid types: {', '.join(GPU_TYPES)} "
        f"(also {', '.join(sorted(GPU_ALIASES))})",
        details={"option": "gpu", "value": name, "valid": ",".join(GPU_TYPES)},
    )


def parse_gpu(value: object) -> GpuSpec:
    """Parse ``gpu=``: a type, a list of acceptable types in order of preference, or ``"TYPE[:MEMORY][:COUNT]"``.

    >>> parse_gpu("A100:80GB:2")
    GpuSpec(types=('A100-80G',), count=2, memory=MemorySpec(mb=76294, exact=False))
    """
    if isinstance(value, str):
        items: list[str] = [value]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise InvalidOptionError(
            f"gpu= takes a GPU type such as 'H100', a list such as ['H100', 'A100-80G'], or 'A100:80GB:2'; "
            f"got {value!r}",
            details={"option": "gpu", "valid": ",".join(GPU_TYPES)},
        )
    types: list[str] = []
    count: int | None = None
    memory: MemorySpec | None = None
    for item in items:
        parts = [p.strip() for p in item.split(":")]
        if len(parts) > 3 or not parts[0]:
            raise InvalidOptionError(f"gpu={item!r}: write 'TYPE', 'TYPE:COUNT', 'TYPE:MEMORY' or 'TYPE:MEMORY:COUNT'")
        names = canonical_gpu(parts[0])
        for part in parts[1:]:
            if part.isdigit():
                count = _gpu_count(int(part), f"gpu={item!r}")
            else:
                # In a compact spec, memory is a floor: 'A100:80GB' means an A100 with at least 80 GB.
                mem = parse_memory(part.rstrip("+") + "+", option=f"gpu={item!r} memory")
                memory = mem
                fitting = tuple(n for n in names if GPU_MEMORY_MB[n] >= mem.mb)
                if not fitting:
                    raise InvalidOptionError(
                        f"gpu={item!r}: no {parts[0]} has {part} of memory "
                        f"({', '.join(f'{n} has {GPU_MEMORY_MB[n] // 1024}Gi' for n in names)})"
                    )
                names = fitting
        for name in names:
            if name not in types:
                types.append(name)
    return GpuSpec(types=tuple(types), count=count, memory=memory)


def _gpu_count(value: object, option: str = "gpu_count") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GPU_COUNT:
        raise InvalidOptionError(
            f"{option}: the GPU count must be an int from 1 to {MAX_GPU_COUNT} (GPUs of one host), got {value!r}",
            details={"option": "gpu_count"},
        )
    return value


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


def _regions(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidOptionError(f"region= takes a region name or a list of them, got {value!r}")
    out: list[str] = []
    for item in items:
        try:
            out.append(subjects.token(item if isinstance(item, str) else ""))
        except ValueError:
            raise InvalidOptionError(
                f"region={item!r} is not a region name (like 'cn-shanghai'): use a-z, 0-9, '-' and '_'"
            ) from None
    return out


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
) -> FunctionSpec:
    """Validate a decorator's options and build the function's wire spec.

    >>> function_spec("classify_ticket", gpu="L40S", memory="48Gi", timeout=300).gpu_memory_mb
    49152
    """
    try:
        subjects.token(name)
    except ValueError as exc:
        raise InvalidOptionError(f"function name {name!r}: {exc}") from None

    gpu_types: list[str] = []
    count = 1
    mem: MemorySpec | None = None
    if gpu is not None:
        parsed = parse_gpu(gpu)
        gpu_types = list(parsed.types)
        mem = parsed.memory
        if parsed.count is not None:
            count = parsed.count
    if gpu_count is not None:
        n = _gpu_count(gpu_count)
        if gpu is not None and parse_gpu(gpu).count not in (None, n):
            raise InvalidOptionError(f"gpu={gpu!r} asks for a different GPU count than gpu_count={n}")
        count = n
    if memory is not None:
        mem = parse_memory(memory)
        if gpu_types:
            fitting = [t for t in gpu_types if GPU_MEMORY_MB[t] >= mem.mb]
            if not fitting:
                raise InvalidOptionError(
                    f"memory={memory!r} is more than any of {', '.join(gpu_types)} has "
                    f"({', '.join(f'{t}: {GPU_MEMORY_MB[t] // 1024}Gi' for t in gpu_types)})",
                    details={"option": "memory"},
                )
            gpu_types = fitting
    if memory is not None and not gpu_types:
        raise InvalidOptionError("memory= is GPU memory per GPU: set gpu= too (e.g. gpu='L40S', memory='48Gi')")
    if gpu_count is not None and not gpu_types:
        raise InvalidOptionError("gpu_count= needs gpu= (e.g. gpu='A100-80G', gpu_count=4)")

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
    regions = _regions(region) if region is not None else []
    if optimize not in OPTIMIZE_TARGETS:
        raise InvalidOptionError(
            f"optimize={optimize!r} is not a target; valid values: {', '.join(map(repr, OPTIMIZE_TARGETS))}",
            details={"option": "optimize", "valid": ",".join(OPTIMIZE_TARGETS)},
        )
    price = None if max_price is None else _positive_number("max_price", max_price)

    if isinstance(retries, Retries):
        policy = retries
    elif isinstance(retries, int) and not isinstance(retries, bool):
        policy = Retries(max_retries=retries)
    else:
        raise InvalidOptionError(f"retries= takes an int or df.Retries(...), got {retries!r}")

    return FunctionSpec(
        name=name,
        kind=kind,
        gpu=gpu_types,
        gpu_count=count,
        gpu_memory_mb=mem.mb if mem else 0,
        memory_exact=mem.exact if mem else False,
        timeout_s=timeout_s,
        concurrency=conc,
        keep_warm=warm,
        scale_to=max_replicas,
        region=regions,
        optimize=str(optimize),
        max_price=price,
        retries=policy.max_retries,
        retry_backoff=float(policy.backoff_coefficient),
        retry_initial_delay_s=float(policy.initial_delay),
        retry_max_delay_s=float(policy.max_delay),
        secrets=secret_names(secrets),
        env=env_dict(env, "env="),
        endpoint=endpoint,
        queue=queue,
        is_generator=is_generator,
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
