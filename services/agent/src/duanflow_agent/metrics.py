"""The agent's own metrics (OpenTelemetry observable gauges, scraped with the kit's Prometheus endpoint when
``DUANFLOW_AGENT_METRICS_PORT`` is set):

- ``duanflow_agent_replicas{agent,state}``: replicas on this host by state (``starting``, ``ready``, ``stopping``,
  ``exited`` until forgotten);
- ``duanflow_agent_gpu_utilization_percent{agent,gpu,gpu_type,simulated}`` and
  ``duanflow_agent_gpu_memory_used_mib{...}``: each GPU as NVML read it for the last capacity report (0 for
  simulated GPUs). The router shows the same figures for the whole fleet (``duanflow_gpu_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from duanflow_kit.telemetry import Metrics
from opentelemetry.metrics import CallbackOptions, Observation

from duanflow_agent.supervisor import Supervisor


class AgentMetrics:
    """The agent's instruments on one :class:`Metrics`, reading :attr:`supervisor` when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.supervisor: Supervisor | None = None
        m = metrics.meter
        m.create_observable_gauge("duanflow_agent_replicas", [self._replicas], description="Replicas on this host")
        m.create_observable_gauge(
            "duanflow_agent_gpu_utilization_percent", [self._gpu("utilization_pct")], description="GPU utilisation"
        )
        m.create_observable_gauge(
            "duanflow_agent_gpu_memory_used_mib", [self._gpu("memory_used_mb")], description="GPU memory used (MiB)"
        )

    def _replicas(self, options: CallbackOptions) -> Iterable[Observation]:
        sup = self.supervisor
        if sup is None:
            return []
        counts: dict[str, int] = {}
        for rec in list(sup.replicas.values()):
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return [Observation(n, {"agent": sup.agent_id, "state": state}) for state, n in sorted(counts.items())]

    def _gpu(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            sup = self.supervisor
            if sup is None:
                return
            for g in sup.inventory.gpus:
                attrs = {
                    "agent": sup.agent_id,
                    "gpu": str(g.index),
                    "gpu_type": g.gpu_type,
                    "simulated": str(g.simulated).lower(),
                }
                yield Observation(getattr(g, field), attrs)

        return observe


_installed: dict[int, AgentMetrics] = {}


def agent_metrics(metrics: Metrics) -> AgentMetrics:
    """The agent's instruments on ``metrics`` (made once per :class:`Metrics`)."""
    found = _installed.get(id(metrics))
    if found is None:
        found = _installed[id(metrics)] = AgentMetrics(metrics)
    return found
