"""Scheduler decisions, published as events and as ``scheduler`` log lines."""

from __future__ import annotations

import msgspec


class CandidateVerdict(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.scheduler.candidate", tag_field="type"
):
    """One candidate the scheduler considered."""

    agent_id: str
    """Agent considered."""
    gpu_type: str = ""
    """GPU type considered."""
    accepted: bool = False
    """True when it passed every filter."""
    reason: str = ""
    """Why it was rejected, or its score when accepted."""
    score: float = 0.0
    """Score (lower is better)."""


class SchedulerDecision(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.scheduler.decision", tag_field="type"
):
    """One placement or autoscaling decision."""

    ts_ms: int
    """When it was made."""
    env: str
    """Environment."""
    app: str
    """App name."""
    function: str
    """Function placed."""
    outcome: str
    """``placed``, ``no_capacity``, ``no_matching_gpu`` or ``no_runtime`` (placements); ``scale_up`` or
    ``scale_down`` (autoscaler decisions, whose ``reason`` says why: ``scale from zero``, ``backlog N``,
    ``idle for Ns``)."""
    chosen_agent: str = ""
    """Agent chosen (empty when none)."""
    gpu_indices: list[int] = []
    """GPUs reserved."""
    replica_id: str = ""
    """Replica started."""
    candidates: list[CandidateVerdict] = []
    """Everything considered, with verdicts."""
    reason: str = ""
    """One-line summary."""
