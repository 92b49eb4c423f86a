"""The GPU catalog: canonical GPU types, their nominal memory, and the names drivers give them.

Pure data and functions: the agent maps what NVML reports to a canonical type, and parses declared
inventories (``H100:8``, ``H100:2,L4:1``) against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from duanflow_proto.errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class GpuType:
    """One canonical GPU type."""

    name: str
    """Canonical name (``H100``)."""
    memory_mb: int
    """Nominal memory per GPU, MiB."""
    aliases: tuple[str, ...] = ()
    """Other spellings users and drivers use (compared after :func:`normalize`)."""


CATALOG: tuple[GpuType, ...] = (
    GpuType("T4", 15 * 1024, ("TESLA T4", "NVIDIA T4")),
    GpuType("L4", 23 * 1024, ("NVIDIA L4",)),
    GpuType("A10G", 23 * 1024, ("NVIDIA A10G", "A10")),
    GpuType("L40S", 45 * 1024, ("NVIDIA L40S",)),
    GpuType(
        "A100-40G",
        40 * 1024,
        ("A100", "A100-40GB", "A100-SXM4-40GB", "A100-PCIE-40GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
    ),
    GpuType(
        "A100-80G",
        80 * 1024,
        (
            "A100-80GB",
            "A100-SXM4-80GB",
            "A100-PCIE-80GB",
            "A100 80GB PCIE",
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100 80GB PCIE",
        ),
    ),
    GpuType(
        "H100",
        80 * 1024,
        ("H100-80GB", "H100-SXM", "H100-PCIE", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIE", "NVIDIA H100 NVL"),
    ),
    GpuType("H200", 141 * 1024, ("H200-141GB", "NVIDIA H200", "NVIDIA H200 NVL")),
    GpuType("B200", 180 * 1024, ("NVIDIA B200",)),
)

_SEPARATORS = re.compile(r"[\s_-]+")


def normalize(name: str) -> str:
    """Uppercase, with spaces, ``_`` and ``-`` all read as one space (``A100-80GB`` = ``a100_80gb``).

    >>> normalize("  nvidia   h100_80gb-hbm3 ")
    'NVIDIA H100 80GB HBM3'
    """
    return _SEPARATORS.sub(" ", name.strip()).upper()


_BY_NAME: dict[str, GpuType] = {}
for _t in CATALOG:
    _BY_NAME[normalize(_t.name)] = _t
    for _alias in _t.aliases:
        _BY_NAME[normalize(_alias)] = _t


def types() -> list[str]:
    """Every canonical type name, in catalog order."""
    return [t.name for t in CATALOG]


def lookup(name: str) -> GpuType | None:
    """The catalog entry for a canonical name or alias, or None."""
    return _BY_NAME.get(normalize(name))


def canonical(name: str, memory_mb: int = 0) -> str:
    """Map a driver's or user's GPU name to its canonical type.

    Exact names and aliases win; otherwise the name is searched for a known model (the memory size decides
    between A100 variants). Unknown GPUs keep their normalized name so they still show up in reports.

    >>> canonical("NVIDIA H100 80GB HBM3")
    'H100'
    >>> canonical("NVIDIA A100-SXM4-80GB")
    'A100-80G'
    >>> canonical("Some A100 board", memory_mb=81920)
    'A100-80G'
    """
    found = lookup(name)
    if found is not None:
        return found.name
    text = normalize(name).replace("NVIDIA ", "")
    if "A100" in text:
        big = "80GB" in text or "80G" in text or memory_mb > 48 * 1024
        return "A100-80G" if big else "A100-40G"
    # Longest model names first so "L40S" is not read as "L4".
    for t in sorted(CATALOG, key=lambda t: len(t.name), reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(t.name)}(?![A-Z0-9])", text):
            return t.name
    return text


_ITEM = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9 _.-]*?)\s*(?::\s*(\d+)\s*)?$")


def parse_inventory(spec: str) -> list[tuple[str, int]]:
    """Parse a declared inventory such as ``H100:8`` or ``H100:2,L4:1`` into ``[(type, count), ...]``.

    A type without a count means one GPU. Unknown types and counts that are not positive integers raise
    :class:`InvalidInputError` naming the valid types.

    >>> parse_inventory("H100:2, l4")
    [('H100', 2), ('L4', 1)]
    """
    items: list[tuple[str, int]] = []
    if not spec.strip():
        return items
    for raw in spec.split(","):
        m = _ITEM.match(raw)
        if m is None:
            raise InvalidInputError(
                f"bad GPU inventory item {raw.strip()!r} in {spec!r}: write TYPE:COUNT, e.g. 'H100:8' or 'H100:2,L4:1'",
                details={"item": raw.strip(), "valid_types": ",".join(types())},
            )
        name, count_text = m.group(1), m.group(2)
        found = lookup(name)
        if found is None:
            raise InvalidInputError(
                f"unknown GPU type {name!r} in {spec!r}: use one of {', '.join(types())}",
                details={"item": raw.strip(), "valid_types": ",".join(types())},
            )
        count = int(count_text) if count_text is not None else 1
        if count < 1 or count > 64:
            raise InvalidInputError(
                f"bad GPU count {count} for {found.name} in {spec!r}: use 1 to 64",
                details={"item": raw.strip()},
            )
        items.append((found.name, count))
    return items
