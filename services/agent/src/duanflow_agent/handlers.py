"""Transport only: agent commands and health details over NATS, mapped onto the supervisor."""

from __future__ import annotations

from duanflow_kit import telemetry
from duanflow_kit.handlers import handle
from duanflow_kit.service import Service
from duanflow_proto import subjects
from duanflow_proto.messages.agent import StartReplica, StartReplicaReply, StopReplica
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
        async def traced(cmd: StartReplica) -> StartReplicaReply:
            # "cold start": the command's arrival to the replica's readiness (download, spawn, imports, @enter),
            # in the trace of whoever asked (the router's headers), else a trace of its own
            attrs = {"duanflow.app": cmd.app, "duanflow.function": cmd.function, "duanflow.replica": cmd.replica_id}
            with telemetry.span(f"cold start {cmd.app}.{cmd.function}", msg.headers, attrs) as span:
                reply = await supervisor.start(cmd)
                if span is not None:
                    span.set_attribute("duanflow.ready_ms", reply.ready_ms)
                return reply

        return await handle(msg.body, StartReplica, traced, subject=start_subject)

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
