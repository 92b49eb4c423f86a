"""Placement by replica runtime: an image only docker builds runs only on agents reporting the docker runtime.

Pure rules over capacity reports (``place``, ``replica_runtime``), the control plane's decision on a fleet past the
index's threshold, and the replica setup's ``StartReplica.docker_image``.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec
import pytest
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import CapacityReport, GpuInfo
from duanflow_proto.messages.build import ImageSpec
from duanflow_proto.messages.release import AppSpec, DeployRequest, FunctionSpec, Release
from duanflow_router.control import BRUTE_FORCE_MAX_AGENTS, ControlPlane
from duanflow_router.domain import replica_runtime
from duanflow_router.placement import (
    OUTCOME_NO_CAPACITY,
    OUTCOME_NO_MATCHING_GPU,
    OUTCOME_NO_RUNTIME,
    OUTCOME_PLACED,
    RUNTIME_DOCKER,
    place,
    request_of,
)
from duanflow_router.replica_setup import ReplicaSetup
from duanflow_router.secrets import Secrets

BOTH = ["process", "docker"]


def agent(agent_id: str, runtimes: list[str], gpus: int = 0, *, gpu_type: str = "H100") -> CapacityReport:
    return CapacityReport(
        agent_id=agent_id,
        host=agent_id,
        region="r",
        runtimes=runtimes,
        gpus=[GpuInfo(index=i, uuid=f"{agent_id}-{i}", gpu_type=gpu_type, memory_total_mb=81559) for i in range(gpus)],
    )


CPU = FunctionSpec(name="f")
H100 = FunctionSpec(name="f", gpu=["H100"])

CASES = [
    # (name, function, runtime, fleet, outcome, agent)
    ("process: any agent, even one reporting no runtimes", CPU, "", [agent("ag-a", [])], OUTCOME_PLACED, "ag-a"),
    (
        "docker: only the agent with the docker runtime, though the other fits better",
        CPU,
        RUNTIME_DOCKER,
        [agent("ag-a", ["process"]), agent("ag-b", BOTH, gpus=4)],
        OUTCOME_PLACED,
        "ag-b",
    ),
    (
        "docker with GPUs: the docker agent's GPUs",
        H100,
        RUNTIME_DOCKER,
        [agent("ag-a", ["process"], gpus=8), agent("ag-b", BOTH, gpus=2)],
        OUTCOME_PLACED,
        "ag-b",
    ),
    ("docker, no docker agent", CPU, RUNTIME_DOCKER, [agent("ag-a", ["process"])], OUTCOME_NO_RUNTIME, ""),
    ("docker, agents reporting nothing", CPU, RUNTIME_DOCKER, [agent("ag-a", [])], OUTCOME_NO_RUNTIME, ""),
    (
        "docker agent of the wrong GPU type: can never fit",
        H100,
        RUNTIME_DOCKER,
        [agent("ag-a", ["process"], gpus=8), agent("ag-b", BOTH, gpus=8, gpu_type="L4")],
        OUTCOME_NO_MATCHING_GPU,
        "",
    ),
]


@pytest.mark.parametrize(
    ("fn", "runtime", "fleet", "outcome", "chosen"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_runtime_table(fn: FunctionSpec, runtime: str, fleet: list[CapacityReport], outcome: str, chosen: str) -> None:
    got = place(request_of(fn, runtime), fleet)
    assert (got.outcome, got.agent_id) == (outcome, chosen), got.reason


def test_no_docker_agent_names_the_runtime_and_the_setting() -> None:
    got = place(request_of(CPU, RUNTIME_DOCKER), [agent("ag-a", ["process"]), agent("ag-b", [])])
    assert got.outcome == OUTCOME_NO_RUNTIME
    assert "no live agent has the docker runtime" in got.reason and "DUANFLOW_AGENT_DOCKER_HOST" in got.reason
    assert [(v.agent_id, v.accepted) for v in got.candidates] == [("ag-a", False), ("ag-b", False)]
    assert "no docker runtime (runtimes: process)" in got.candidates[0].reason


def test_runtime_rejections_are_named_when_another_constraint_excludes_the_docker_agents() -> None:
    got = place(
        request_of(H100, RUNTIME_DOCKER), [agent("ag-a", ["process"], 8), agent("ag-b", BOTH, 8, gpu_type="L4")]
    )
    assert got.outcome == OUTCOME_NO_MATCHING_GPU
    assert "runtime excluded 1 candidate(s): ag-a" in got.reason and "type excluded 1 candidate(s): ag-b" in got.reason


def test_a_busy_docker_agent_is_no_capacity_not_another_agent() -> None:
    busy = agent("ag-b", BOTH, gpus=1)
    got = place(request_of(H100, RUNTIME_DOCKER), [agent("ag-a", ["process"], 8), busy], reserved={"ag-b": [0]})
    assert (got.outcome, got.agent_id) == (OUTCOME_NO_CAPACITY, "")


@pytest.mark.parametrize(
    ("image", "docker", "runtime"),
    [
        (ImageSpec(), True, ""),
        (ImageSpec(pip=["numpy"], env={"A": "1"}), True, ""),
        (ImageSpec(commands=["echo hi > /marker"]), True, RUNTIME_DOCKER),
        (ImageSpec(apt=["git"]), False, RUNTIME_DOCKER),
        (ImageSpec(base="cuda", cuda="12.4"), True, RUNTIME_DOCKER),
        # no docker on the stack: the builder makes a CUDA image a venv, and any agent runs it as a process
        (ImageSpec(base="cuda", cuda="12.4", pip=["torch"]), False, ""),
    ],
)
def test_replica_runtime_follows_the_builders_backend(image: ImageSpec, docker: bool, runtime: str) -> None:
    assert replica_runtime(image, docker) == runtime


def test_control_plane_judges_docker_requests_agent_by_agent_on_large_fleets() -> None:
    fake = cast(Any, None)
    control = ControlPlane(fake, fake, fake, fake)
    fleet = [agent(f"ag-{i:04d}", ["process"], gpus=8) for i in range(BRUTE_FORCE_MAX_AGENTS + 10)]
    fleet.append(agent("ag-zz-docker", BOTH, gpus=8))
    for r in fleet:
        control.fleet.observe(r)
    assert control._decide(H100, fleet, "main", "a", "").agent_id != "ag-zz-docker"  # the index, any agent
    got = control._decide(H100, fleet, "main", "a", "", RUNTIME_DOCKER)
    assert (got.outcome, got.agent_id) == (OUTCOME_PLACED, "ag-zz-docker")
    none = control._decide(H100, fleet[:-1], "main", "a", "", RUNTIME_DOCKER)
    assert none.outcome == OUTCOME_NO_RUNTIME


class _NoBlobs:
    """A blob store the docker path must not touch (no venv image is looked up for a docker image)."""

    async def exists(self, key: str) -> bool:
        raise AssertionError(f"looked up {key}")

    async def presign_get(self, key: str, ttl_s: int) -> str:
        raise AssertionError(f"presigned {key}")


def _release(image: ImageSpec, image_id: str = "im-0123") -> Release:
    spec = AppSpec(name="a", module="m", image=image, env={"APP": "1"}, functions=[CPU])
    return Release(
        release_id="rel_1", app="a", env="main", created_ms=0, bundle_key="k", bundle_digest="d", image_id=image_id,
        spec=spec,
    )  # fmt: skip


async def test_replica_setup_names_the_registry_image_of_a_docker_release() -> None:
    setup = ReplicaSetup(
        Secrets(cast(Any, None), None), cast(Any, _NoBlobs()), cast(Any, None), docker_registry="reg:5000"
    )
    extras = await setup.for_replica(_release(ImageSpec(commands=["true"], env={"BAKED": "x"})), CPU)
    assert extras.docker_image == "reg:5000/duanflow/images:im-0123"
    assert (extras.image_url, extras.env_vars) == ("", {"BAKED": "x", "APP": "1"})


async def test_a_cuda_image_on_a_stack_without_docker_runs_as_a_process() -> None:
    """``Image.cuda(...).pip_install(...)`` on the local stack (no docker): the builder made a venv, so the router
    accepts the deploy and hands replicas no container image."""
    setup = ReplicaSetup(Secrets(cast(Any, None), None), cast(Any, _NoBlobs()), cast(Any, None))
    release = _release(ImageSpec(base="cuda", cuda="12.4", pip=["torch"]))
    await setup.check(DeployRequest(spec=release.spec, bundle_key="k", bundle_digest="d", image_id="im-0123"))
    with pytest.raises(AssertionError, match="looked up images/im-0123"):  # the venv image, not a registry one
        await setup.for_replica(release, CPU)


async def test_deploy_of_a_docker_image_without_a_router_registry_is_refused_naming_the_setting() -> None:
    setup = ReplicaSetup(Secrets(cast(Any, None), None), cast(Any, _NoBlobs()), cast(Any, None))
    release = _release(ImageSpec(apt=["git"]))
    req = DeployRequest(spec=release.spec, bundle_key="k", bundle_digest="d", image_id="im-0123")
    with pytest.raises(InvalidInputError, match="DUANFLOW_ROUTER_DOCKER_REGISTRY"):
        await setup.check(req)
    with pytest.raises(InvalidInputError, match="docker runtime"):
        await setup.for_replica(release, CPU)
    with_registry = ReplicaSetup(
        Secrets(cast(Any, None), None), cast(Any, _NoBlobs()), cast(Any, None), docker_registry="r"
    )
    with pytest.raises(InvalidInputError, match="image id"):
        await with_registry.check(msgspec.structs.replace(req, image_id=""))
    await with_registry.check(req)  # named registry and image: accepted
