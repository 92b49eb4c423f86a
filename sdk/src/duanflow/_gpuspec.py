"""GPU specs as users write them, parsed and normalised: pure functions, no I/O, no DuanFlow imports.

Everything the decorators accept for GPUs::

    gpu="L40S"                                   # one type
    gpu=["H100", "A100-80G", "L40S"]             # acceptable types, in order of preference
    gpu="A100:80GB:2"                            # compact TYPE[:MEMORY][:COUNT]
    gpu="24GB..80GB"                             # any catalog type whose nominal memory is in the range
    memory="48Gi+"   memory="80Gi"   memory="24GB..80GB"   memory=49152  (MiB)
    gpu_count=4   region=["cn-shanghai", "ap-singapore"]   max_price=1.20   optimize="price" | "latency"

GPU memory is compared against the catalog's *nominal* size of each type, so ``GB`` and ``Gi`` both mean GiB
here (an "80 GB" H100 satisfies ``"80Gi"`` and ``"80GB"``). ``"48Gi+"`` is a floor, ``"80Gi"`` an exact
size, ``"24GB..80GB"`` an inclusive range; in a compact ``gpu=`` string a single size is a floor.

Errors are :class:`GpuSpecError` (a ``ValueError``) naming the option, the bad value and the valid values;
the SDK turns them into its own ``InvalidOptionError``. The router keeps a copy of the matching half
(``duanflow_router.placement``): it may not import the SDK.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

MIB_PER_GIB: Final = 1024

CATALOG_GB: Final[dict[str, int]] = {
    "T4": 16,
    "L4": 24,
    "A10G": 24,
    "L40S": 48,
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
    "B200": 180,
}
"""Canonical GPU types and their nominal memory per GPU (GiB), in catalog order."""

GPU_TYPES: Final = tuple(CATALOG_GB)

ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "A100": ("A100-80G", "A100-40G"),
    "A100-40": ("A100-40G",),
    "A100-40GB": ("A100-40G",),
    "A100-80": ("A100-80G",),
    "A100-80GB": ("A100-80G",),
    "A10": ("A10G",),
    "H100-80G": ("H100",),
    "H100-80GB": ("H100",),
    "H100-SXM": ("H100",),
    "H100-PCIE": ("H100",),
    "H200-141G": ("H200",),
    "H200-141GB": ("H200",),
    "L40S-48G": ("L40S",),
    "L40S-48GB": ("L40S",),
    "TESLA-T4": ("T4",),
}
"""Other spellings (after :func:`_key`), each meaning one or more canonical types in order of preference."""

OPTIMIZE_TARGETS: Final = ("latency", "price")
MAX_GPU_COUNT: Final = 16
MAX_PRICE: Final = 10_000.0

_REGION = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B?|B)?)?\s*$", re.IGNORECASE)
_UNIT_MIB: Final[dict[str, float]] = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


class GpuSpecError(ValueError):
    """A GPU option that cannot be used: says which option, what was given, and what is valid."""

    def __init__(self, message: str, *, option: str, value: object = None, valid: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.option = option
        self.value = value
        self.valid = tuple(valid)


@dataclass(frozen=True, slots=True)
class MemoryRange:
    """GPU memory per GPU in MiB: ``min_mb`` ≤ nominal ≤ ``max_mb`` (``max_mb`` 0: no upper bound)."""

    min_mb: int
    max_mb: int = 0

    @property
    def exact(self) -> bool:
        """True for one exact size (``"80Gi"``)."""
        return self.max_mb == self.min_mb and self.min_mb > 0

    def admits(self, mb: int) -> bool:
        """Whether a GPU of nominal memory ``mb`` satisfies the range.

        >>> MemoryRange(24 * 1024, 80 * 1024).admits(80 * 1024)
        True
        """
        return mb >= self.min_mb and (not self.max_mb or mb <= self.max_mb)

    def __str__(self) -> str:
        lo = _fmt_gib(self.min_mb)
        if self.exact:
            return lo
        if self.max_mb:
            return f"{lo}..{_fmt_gib(self.max_mb)}"
        return f"{lo}+"


@dataclass(frozen=True, slots=True)
class GpuRequest:
    """A validated, normalised GPU request: what the router matches against its pools."""

    types: tuple[str, ...] = ()
    """Acceptable canonical types in order of preference (empty: CPU only)."""
    count: int = 1
    memory: MemoryRange | None = None
    regions: tuple[str, ...] = ()
    max_price: float | None = None
    optimize: str = "latency"
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Types dropped because of the memory constraint (for messages)."""

    def function_spec_fields(self) -> dict[str, object]:
        """The ``FunctionSpec`` fields this request fills (``gpu``, ``gpu_count``, ``gpu_memory_mb``, ...).

        >>> gpu_request(gpu="L40S", memory="48Gi").function_spec_fields()["gpu_memory_mb"]
        49152
        """
        mem = self.memory
        return {
            "gpu": list(self.types),
            "gpu_count": self.count,
            "gpu_memory_mb": mem.min_mb if mem else 0,
            "memory_exact": bool(mem and mem.exact),
            "gpu_memory_max_mb": mem.max_mb if mem and not mem.exact else 0,
            "region": list(self.regions),
            "max_price": self.max_price,
            "optimize": self.optimize,
        }


def _fmt_gib(mb: int) -> str:
    gib = mb / MIB_PER_GIB
    return f"{gib:g}Gi" if gib >= 1 else f"{mb}Mi"


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", "-", name.strip()).upper()


def nominal_mb(gpu_type: str) -> int:
    """Nominal memory of a canonical type, MiB.

    >>> nominal_mb("H100")
    81920
    """
    return CATALOG_GB[gpu_type] * MIB_PER_GIB


def valid_names() -> list[str]:
    """Every name ``gpu=`` accepts: canonical types, then aliases."""
    return [*GPU_TYPES, *sorted(ALIASES)]


def canonical_types(name: str) -> tuple[str, ...]:
    """Canonical types meant by one GPU name (case-insensitive; ``_``/space read as ``-``; aliases expand).

    >>> canonical_types("a100"), canonical_types("h100 80gb")
    (('A100-80G', 'A100-40G'), ('H100',))
    """
    key = _key(name)
    if key in CATALOG_GB:
        return (key,)
    if key in ALIASES:
        return ALIASES[key]
    raise GpuSpecError(
        f"gpu={name!r} is not a GPU type DuanFlow knows; valid types: {', '.join(GPU_TYPES)} "
        f"(aliases: {', '.join(sorted(ALIASES))})",
        option="gpu",
        value=name,
        valid=GPU_TYPES,
    )


def _size_mb(text: str, option: str) -> int:
    m = _SIZE.match(text)
    if m is None:
        raise GpuSpecError(
            f"{option}={text!r} is not a memory size: write e.g. '48Gi+' (at least), '80Gi' (exactly), "
            "'24GB..80GB' (a range) or '512Mi'",
            option=option,
            value=text,
        )
    number, unit = m.group(1), (m.group(2) or "").upper()
    mb = math.ceil(float(number) * _UNIT_MIB[unit])
    if mb <= 0:
        raise GpuSpecError(f"{option}={text!r}: a memory size must be positive", option=option, value=text)
    return mb


def parse_memory(value: object, *, option: str = "memory", floor: bool = False) -> MemoryRange:
    """Parse GPU memory per GPU: ``"48Gi+"`` (at least), ``"80Gi"`` (exactly), ``"24GB..80GB"`` (range), MiB int.

    ``floor=True`` reads a single size as a floor (the compact ``gpu="A100:80GB"`` form).

    >>> parse_memory("48Gi+"), parse_memory("80GB")
    (MemoryRange(min_mb=49152, max_mb=0), MemoryRange(min_mb=81920, max_mb=81920))
    >>> parse_memory("24GB..80GB")
    MemoryRange(min_mb=24576, max_mb=81920)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise GpuSpecError(
            f"{option}= takes a size such as '48Gi+', '80Gi' or '24GB..80GB', got {value!r}", option=option, value=value
        )
    if isinstance(value, int):
        if value <= 0:
            raise GpuSpecError(f"{option}={value!r}: a memory size must be positive", option=option, value=value)
        return MemoryRange(value, value)
    text = value.strip()
    if ".." in text:
        lo_text, _, hi_text = text.partition("..")
        lo = _size_mb(lo_text, option) if lo_text.strip() else 0
        hi = _size_mb(hi_text, option) if hi_text.strip() else 0
        if not lo and not hi:
            raise GpuSpecError(f"{option}={value!r}: a range needs at least one bound", option=option, value=value)
        if hi and lo > hi:
            raise GpuSpecError(f"{option}={value!r}: the range's low end is above its high end", option=option)
        return MemoryRange(lo, hi)
    if text.endswith("+"):
        return MemoryRange(_size_mb(text[:-1], option))
    mb = _size_mb(text, option)
    return MemoryRange(mb) if floor else MemoryRange(mb, mb)


def _looks_like_size(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text.startswith(".."))


def parse_gpu(value: object) -> tuple[tuple[str, ...], int | None, MemoryRange | None]:
    """Parse ``gpu=``: a type, a list in order of preference, ``"TYPE[:MEMORY][:COUNT]"`` or a memory range.

    Returns (types, count or None, memory or None); types already narrowed by a compact memory.

    >>> parse_gpu("A100:80GB:2")
    (('A100-80G',), 2, MemoryRange(min_mb=81920, max_mb=0))
    >>> parse_gpu("24GB..48GB")[0]
    ('L4', 'A10G', 'L40S', 'A100-40G')
    """
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise GpuSpecError(
            f"gpu= takes a GPU type such as 'H100', a list such as ['H100', 'A100-80G'], 'A100:80GB:2' "
            f"or a memory range such as '24GB..80GB'; got {value!r}",
            option="gpu",
            value=value,
            valid=GPU_TYPES,
        )
    types: list[str] = []
    count: int | None = None
    memory: MemoryRange | None = None
    for item in items:
        parts = [p.strip() for p in item.split(":")]
        if len(parts) > 3 or not parts[0]:
            raise GpuSpecError(
                f"gpu={item!r}: write 'TYPE', 'TYPE:COUNT', 'TYPE:MEMORY', 'TYPE:MEMORY:COUNT' or '24GB..80GB'",
                option="gpu",
                value=item,
                valid=GPU_TYPES,
            )
        if _looks_like_size(parts[0]) and len(parts) == 1:
            names: tuple[str, ...] = GPU_TYPES
            parts = ["*", parts[0]]
        else:
            names = canonical_types(parts[0])
        for part in parts[1:]:
            if part.isdigit():
                n = gpu_count(int(part), option=f"gpu={item!r}")
                if count is not None and count != n:
                    raise GpuSpecError(f"gpu={value!r} names two GPU counts", option="gpu", value=value)
                count = n
                continue
            mem = parse_memory(part, option=f"gpu={item!r} memory", floor=True)
            fitting = tuple(t for t in names if mem.admits(nominal_mb(t)))
            if not fitting:
                have = ", ".join(f"{t} has {CATALOG_GB[t]}Gi" for t in names)
                raise GpuSpecError(f"gpu={item!r}: no GPU type has {mem} of memory ({have})", option="gpu", value=item)
            memory = mem
            names = fitting
        for name in names:
            if name not in types:
                types.append(name)
    return tuple(types), count, memory


def gpu_count(value: object, *, option: str = "gpu_count") -> int:
    """Validate a GPU count: an int from 1 to :data:`MAX_GPU_COUNT` (GPUs of one host)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GPU_COUNT:
        raise GpuSpecError(
            f"{option}: the GPU count must be an int from 1 to {MAX_GPU_COUNT} (GPUs of one host), got {value!r}",
            option="gpu_count",
            value=value,
        )
    return value


def parse_regions(value: object) -> tuple[str, ...]:
    """Validate ``region=``: one region name or a list of them (lowercase tokens such as ``cn-shanghai``)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise GpuSpecError(f"region= takes a region name or a list of them, got {value!r}", option="region")
    out: list[str] = []
    for item in items:
        name = item.strip().lower() if isinstance(item, str) else ""
        if not _REGION.match(name):
            raise GpuSpecError(
                f"region={item!r} is not a region name (like 'cn-shanghai'): use a-z, 0-9, '-' and '_'",
                option="region",
                value=item,
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_max_price(value: object) -> float:
    """Validate ``max_price=``: $/GPU-hour, a positive finite number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= MAX_PRICE:  # type: ignore[operator]
        raise GpuSpecError(
            f"max_price= is dollars per GPU-hour, a number above 0 (e.g. 1.20), got {value!r}",
            option="max_price",
            value=value,
        )
    return float(value)  # type: ignore[arg-type]


def parse_optimize(value: object) -> str:
    """Validate ``optimize=``: ``"latency"`` or ``"price"``."""
    if value not in OPTIMIZE_TARGETS:
        raise GpuSpecError(
            f"optimize={value!r} is not a target; valid values: {', '.join(map(repr, OPTIMIZE_TARGETS))}",
            option="optimize",
            value=value,
            valid=OPTIMIZE_TARGETS,
        )
    return str(value)


def gpu_request(
    *,
    gpu: object = None,
    memory: object = None,
    gpu_count: object = None,
    region: object = None,
    max_price: object = None,
    optimize: object = "latency",
) -> GpuRequest:
    """Validate and normalise every GPU option of a decorator at once.

    >>> r = gpu_request(gpu=["H100", "A100-80G", "L40S"], memory="48Gi+", optimize="price", max_price=1.2,
    ...                 region=["cn-shanghai", "ap-singapore"])
    >>> r.types, str(r.memory), r.regions
    (('H100', 'A100-80G', 'L40S'), '48Gi+', ('cn-shanghai', 'ap-singapore'))
    >>> gpu_request(gpu=["H100", "L40S"], memory="80Gi").types
    ('H100',)
    """
    types: tuple[str, ...] = ()
    count: int | None = None
    mem: MemoryRange | None = None
    if gpu is not None:
        types, count, mem = parse_gpu(gpu)
    if gpu_count is not None:
        n = _count(gpu_count)
        if count is not None and count != n:
            raise GpuSpecError(f"gpu={gpu!r} asks for {count} GPUs but gpu_count={n}", option="gpu_count", value=n)
        count = n
    notes: list[str] = []
    if memory is not None:
        if not types:
            raise GpuSpecError(
                "memory= is GPU memory per GPU: set gpu= too (e.g. gpu='L40S', memory='48Gi')", option="memory"
            )
        mem = parse_memory(memory)
        fitting = tuple(t for t in types if mem.admits(nominal_mb(t)))
        if not fitting:
            have = ", ".join(f"{t}: {CATALOG_GB[t]}Gi" for t in types)
            hint = " (write '80Gi+' for at least 80 GiB)" if mem.exact else ""
            raise GpuSpecError(
                f"memory={memory!r} ({mem}) matches none of {', '.join(types)} ({have}){hint}",
                option="memory",
                value=memory,
            )
        notes = [f"{t} dropped: {CATALOG_GB[t]}Gi is not {mem}" for t in types if t not in fitting]
        types = fitting
    if count is not None and not types:
        raise GpuSpecError("gpu_count= needs gpu= (e.g. gpu='A100-80G', gpu_count=4)", option="gpu_count")
    regions = parse_regions(region) if region is not None else ()
    price = parse_max_price(max_price) if max_price is not None else None
    target = parse_optimize(optimize)
    return GpuRequest(
        types=types,
        count=count or 1,
        memory=mem,
        regions=regions,
        max_price=price,
        optimize=target,
        notes=tuple(notes),
    )


_count = gpu_count
