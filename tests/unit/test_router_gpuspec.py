"""The GPU-spec parser shared by the SDK's decorators (``duanflow._gpuspec``): tables of cases and properties."""

from __future__ import annotations

import pytest
from duanflow._gpuspec import (
    CATALOG_GB,
    GPU_TYPES,
    GpuSpecError,
    MemoryRange,
    canonical_types,
    gpu_request,
    nominal_mb,
    parse_gpu,
    parse_memory,
)
from duanflow_proto.messages.release import FunctionSpec
from duanflow_router.placement import NOMINAL_GB, request_of
from duanflow_router.placement import nominal_mb as router_nominal_mb
from hypothesis import given
from hypothesis import strategies as st

GI = 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48Gi+", MemoryRange(48 * GI)),
        ("80Gi", MemoryRange(80 * GI, 80 * GI)),
        ("80GB", MemoryRange(80 * GI, 80 * GI)),  # nominal: GB and Gi both mean GiB
        ("80 GiB", MemoryRange(80 * GI, 80 * GI)),
        ("24GB..80GB", MemoryRange(24 * GI, 80 * GI)),
        ("24Gi..", MemoryRange(24 * GI)),
        ("..48Gi", MemoryRange(0, 48 * GI)),
        ("512Mi", MemoryRange(512, 512)),
        ("1.5T+", MemoryRange(1536 * GI)),
        (49152, MemoryRange(49152, 49152)),
    ],
)
def test_memory_sizes(text: object, expected: MemoryRange) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "48Gx", "-1Gi", "0Gi", "80Gi..24Gi", "..", True, 0, 1.5, None])
def test_bad_memory_sizes_say_how_to_write_one(bad: object) -> None:
    with pytest.raises(GpuSpecError) as err:
        parse_memory(bad)
    assert err.value.option == "memory"


@pytest.mark.parametrize(
    ("value", "types", "count", "memory"),
    [
        ("L40S", ("L40S",), None, None),
        ("l40s", ("L40S",), None, None),
        (["H100", "A100-80G", "L40S"], ("H100", "A100-80G", "L40S"), None, None),
        ("A100", ("A100-80G", "A100-40G"), None, None),
        ("A100-80GB", ("A100-80G",), None, None),
        ("h100 80gb", ("H100",), None, None),
        ("A100:80GB:2", ("A100-80G",), 2, MemoryRange(80 * GI)),
        ("A100:2", ("A100-80G", "A100-40G"), 2, None),
        ("H100:4", ("H100",), 4, None),
        ("24GB..48GB", ("L4", "A10G", "L40S", "A100-40G"), None, MemoryRange(24 * GI, 48 * GI)),
        (["H100", "h100"], ("H100",), None, None),
    ],
)
def test_gpu_values(value: object, types: tuple[str, ...], count: int | None, memory: MemoryRange | None) -> None:
    assert parse_gpu(value) == (types, count, memory)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("V100", "valid types: T4, L4"),
        ("A100:96GB", "no GPU type has 96Gi+"),
        ("H100:0", "from 1 to 16"),
        ("H100:80GB:2:x", "TYPE:MEMORY:COUNT"),
        ([], "gpu= takes"),
        (["H100", 3], "gpu= takes"),
        (7, "gpu= takes"),
        ("1000GB..2000GB", "no GPU type has"),
    ],
)
def test_invalid_gpu_values_list_valid_types(value: object, words: str) -> None:
    with pytest.raises(GpuSpecError) as err:
        parse_gpu(value)
    assert words in str(err.value)


def test_product_page_specs() -> None:
    r = gpu_request(
        gpu=["H100", "A100-80G", "L40S"],
        memory="48Gi+",
        optimize="price",
        max_price=1.20,
        region=["cn-shanghai", "ap-singapore"],
    )
    assert r.function_spec_fields() == {
        "gpu": ["H100", "A100-80G", "L40S"],
        "gpu_count": 1,
        "gpu_memory_mb": 48 * GI,
        "memory_exact": False,
        "gpu_memory_max_mb": 0,
        "region": ["cn-shanghai", "ap-singapore"],
        "max_price": 1.2,
        "optimize": "price",
    }
    assert gpu_request(gpu="L40S", memory="48Gi").types == ("L40S",)
    assert gpu_request(gpu="H100", memory="80Gi").function_spec_fields()["memory_exact"] is True
    assert gpu_request(gpu="A100-80G", gpu_count=4).count == 4


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"gpu": "H100", "memory": "141Gi"}, "memory"),
        ({"memory": "48Gi"}, "memory"),
        ({"gpu_count": 2}, "gpu_count"),
        ({"gpu": "H100:2", "gpu_count": 4}, "gpu_count"),
        ({"gpu": "H100", "gpu_count": 0}, "gpu_count"),
        ({"gpu": "H100", "region": "Shanghai!"}, "region"),
        ({"gpu": "H100", "region": []}, "region"),
        ({"gpu": "H100", "max_price": 0}, "max_price"),
        ({"gpu": "H100", "max_price": float("nan")}, "max_price"),
        ({"gpu": "H100", "max_price": "1.2"}, "max_price"),
        ({"gpu": "H100", "optimize": "speed"}, "optimize"),
    ],
)
def test_invalid_options_name_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(GpuSpecError) as err:
        gpu_request(**kwargs)
    assert err.value.option == option


def test_exact_memory_narrows_a_list_and_says_so() -> None:
    r = gpu_request(gpu=["H100", "L40S", "A100-80G"], memory="80Gi")
    assert r.types == ("H100", "A100-80G") and any("L40S" in n for n in r.notes)
    with pytest.raises(GpuSpecError, match="'80Gi\\+' for at least"):
        gpu_request(gpu="H200", memory="80Gi")


def test_router_sdk_and_agent_share_one_catalog() -> None:
    from duanflow_agent import catalog

    assert dict(NOMINAL_GB) == CATALOG_GB
    assert catalog.types() == list(CATALOG_GB)
    # what NVML reports on each card is the nominal class the SDK's specs are written against
    for name, reported in [("NVIDIA H100 80GB HBM3", 81559), ("NVIDIA L40S", 46068), ("NVIDIA A100-SXM4-80GB", 81920)]:
        gpu_type = catalog.canonical(name, reported)
        assert nominal_mb(gpu_type) == router_nominal_mb(gpu_type, reported)


@given(
    types=st.lists(st.sampled_from(GPU_TYPES), min_size=1, max_size=4, unique=True),
    low=st.sampled_from([0, 16, 24, 40, 48, 80, 141]),
    span=st.sampled_from([None, 0, 8, 40, 100]),
    count=st.integers(1, 16),
)
def test_memory_narrowing_keeps_exactly_the_admitted_types(
    types: list[str], low: int, span: int | None, count: int
) -> None:
    memory = None
    if low:
        memory = f"{low}Gi+" if span is None else (f"{low}Gi" if span == 0 else f"{low}Gi..{low + span}Gi")
    try:
        r = gpu_request(gpu=types, memory=memory, gpu_count=count)
    except GpuSpecError:
        assert memory is not None
        asked = parse_memory(memory)
        assert not any(asked.admits(nominal_mb(t)) for t in types)
        return
    rng = r.memory
    assert list(r.types) == [t for t in types if rng is None or rng.admits(CATALOG_GB[t] * GI)]
    # The router reads the wire fields back to the same constraint.
    req = request_of(FunctionSpec(name="f", **r.function_spec_fields()))  # type: ignore[arg-type]
    assert req.types == r.types and req.count == count
    for t in GPU_TYPES:
        assert req.memory_ok(nominal_mb(t)) == (rng is None or rng.admits(nominal_mb(t)))


def test_aliases_resolve_to_catalog_types() -> None:
    for name in ["a10", "A100-40GB", "H100-SXM", "Tesla T4", "L40S-48GB", "H200_141GB"]:
        assert all(t in CATALOG_GB for t in canonical_types(name))
