"""Transport only: agent commands and health details over NATS, mapped onto the supervisor."""

from __future__ import annotations

from duanflow_kit.handlers import handle
from duanflow_kit.service import Service
from duanflow_proto import subjects
from duanflow_proto.messages.agent import StartReplica, StopReplica
from faststream.nats import NatsMessage

from duanflow_agent import domain
from duanflow_agent.supervisor import Supervisor

MAX_CONCURRENT_COMMANDS = 32
"""Starts wait up to the start timeout for readiness, so many run at once."""


def register(service: Service, supervisor: Supervisor) -> None:
    """Subscribe the agent's command subjects. No queue group: the subjects already name this one agent."""
    start_subject = subjects.agent_command(supervisor.agent_id, "start")
    stop_subject = subjects.agent_command(supervisor.agent_id, "stop")

    async def start(msg: NatsMessage) -> bytes:
        return await handle(msg.body, StartReplica, supervisor.start, subject=start_subject)

    async def stop(msg: NatsMessage) -> bytes:
        return await handle(msg.body, StopReplica, supervisor.stop, subject=stop_subject)

    service.broker.subscriber(start_subject, max_workers=MAX_CONCURRENT_COMMANDS)(start)
    service.broker.subscriber(stop_subject, max_workers=MAX_CONCURRENT_COMMANDS)(stop)

    async def details() -> dict[str, str]:
        inv = supervisor.inventory
        return {
            "agent_id": supervisor.agent_id,
            "gpus": str(len(inv.gpus)),
            "gpu_types": ",".join(sorted({g.gpu_type for g in inv.gpus})),
            "simulated": str(inv.simulated).lower(),
            "replicas": str(supervisor.live_count()),
            "free_gpus": str(len(domain.free_gpus(inv, supervisor.replicas.values()))),
        }

    service.health_checks.append(details)
