"""The agent's GPU catalog: canonical names, aliases, driver names and declared inventories (tables of cases)."""

from __future__ import annotations

import pytest
from duanflow_agent import catalog
from duanflow_proto.errors import InvalidInputError

GIB = 1024


def test_catalog_has_every_supported_type_in_order() -> None:
    assert catalog.types() == ["T4", "L4", "A10G", "L40S", "A100-40G", "A100-80G", "H100", "H200", "B200"]


@pytest.mark.parametrize(
    ("name", "memory_gib"),
    [("T4", 15), ("L4", 23), ("A10G", 23), ("L40S", 45), ("A100-40G", 40), ("A100-80G", 80), ("H100", 80),
     ("H200", 141), ("B200", 180)],
)  # fmt: skip
def test_nominal_memory(name: str, memory_gib: int) -> None:
    entry = catalog.lookup(name)
    assert entry is not None and entry.memory_mb == memory_gib * GIB


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("h100", "H100"),
        ("A100-80GB", "A100-80G"),
        ("a100_80gb", "A100-80G"),
        ("A100-40GB", "A100-40G"),
        ("A100", "A100-40G"),
        ("a10", "A10G"),
        ("l40s", "L40S"),
        (" Tesla T4 ", "T4"),
        ("H200-141GB", "H200"),
    ],
)
def test_aliases(spelling: str, canonical: str) -> None:
    found = catalog.lookup(spelling)
    assert found is not None and found.name == canonical


@pytest.mark.parametrize("unknown", ["H300", "", "RTX 4090", "A100-160G"])
def test_unknown_names_are_not_in_the_catalog(unknown: str) -> None:
    assert catalog.lookup(unknown) is None


@pytest.mark.parametrize(
    ("driver_name", "memory_mb", "canonical"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "H100"),
        ("NVIDIA H100 PCIe", 81559, "H100"),
        ("NVIDIA H100 NVL", 95830, "H100"),
        ("NVIDIA H200", 143771, "H200"),
        ("NVIDIA A100-SXM4-80GB", 81920, "A100-80G"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40G"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80G"),
        ("NVIDIA A100-PCIE-40GB", 40960, "A100-40G"),
        ("Some A100 board", 81920, "A100-80G"),
        ("Some A100 board", 40960, "A100-40G"),
        ("Tesla T4", 15360, "T4"),
        ("NVIDIA L4", 23034, "L4"),
        ("NVIDIA A10G", 23028, "A10G"),
        ("NVIDIA L40S", 46068, "L40S"),
        ("NVIDIA B200", 183359, "B200"),
        ("NVIDIA GeForce RTX 4090", 24564, "GEFORCE RTX 4090"),
    ],
)
def test_driver_names_map_to_canonical_types(driver_name: str, memory_mb: int, canonical: str) -> None:
    assert catalog.canonical(driver_name, memory_mb) == canonical


def test_l40s_is_not_read_as_l4() -> None:
    assert catalog.canonical("Board L40S rev 2") == "L40S"
    assert catalog.canonical("Board L4 rev 2") == "L4"


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("", []),
        ("   ", []),
        ("H100:8", [("H100", 8)]),
        ("h100:2, L4:1", [("H100", 2), ("L4", 1)]),
        ("A100-80GB:4", [("A100-80G", 4)]),
        ("l40s", [("L40S", 1)]),
        ("T4 : 2", [("T4", 2)]),
        ("H100:64", [("H100", 64)]),
    ],
)
def test_parse_inventory(spec: str, parsed: list[tuple[str, int]]) -> None:
    assert catalog.parse_inventory(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("H300:1", "unknown GPU type 'H300'"),
        ("H100:0", "bad GPU count 0"),
        ("H100:65", "bad GPU count 65"),
        ("H100:-1", "write TYPE:COUNT"),
        ("H100:two", "write TYPE:COUNT"),
        ("H100:1,", "write TYPE:COUNT"),
        (":4", "write TYPE:COUNT"),
    ],
)
def test_bad_inventories_are_refused_with_the_valid_types(spec: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        catalog.parse_inventory(spec)
    assert says in info.value.message
    assert info.value.code == "invalid_input"
    if "unknown" in says:
        assert "H100" in info.value.message and info.value.details["valid_types"].startswith("T4,")
