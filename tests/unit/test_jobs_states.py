"""The job state machine of the router (pure rules of ``duanflow_router.jobs``)."""

from __future__ import annotations

import pytest
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import Result
from duanflow_proto.messages.jobs import STATES, TERMINAL, JobEvent, JobInfo
from duanflow_router.jobs import apply_event, can_move, outcome_of, overdue


def job(state: str = "queued", replica: str = "", **kw: object) -> JobInfo:
    return JobInfo(job_id="jb-0123456789", env="main", app="a", function="f", state=state, replica_id=replica, **kw)  # type: ignore[arg-type]


def event(state: str, replica: str = "rp-1", **kw: object) -> JobEvent:
    fields: dict[str, object] = {"ts_ms": 1000, **kw}
    return JobEvent(job_id="jb-0123456789", replica_id=replica, state=state, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("final", sorted(TERMINAL))
def test_final_states_are_final(final: str) -> None:
    assert not any(can_move(final, s) for s in STATES)


def test_forward_moves_only() -> None:
    assert can_move("queued", "running") and can_move("running", "succeeded") and can_move("queued", "cancelled")
    assert not can_move("running", "queued") and not can_move("running", "running") and not can_move("queued", "queued")


def test_running_then_done_records_times_and_errors() -> None:
    running = apply_event(job(replica="rp-1"), event("running"))
    assert running is not None and running.state == "running" and running.started_ms == 1000
    failed = apply_event(running, event("failed", error="ValueError: bad", traceback="tb", ts_ms=5000))
    assert failed is not None
    assert (failed.state, failed.finished_ms, failed.error, failed.traceback) == (
        "failed",
        5000,
        "ValueError: bad",
        "tb",
    )
    assert failed.started_ms == 1000


def test_events_from_another_replica_or_job_or_too_late_are_ignored() -> None:
    assert apply_event(job(replica="rp-1"), event("running", replica="rp-2")) is None
    assert apply_event(job(), JobEvent(job_id="jb-other0000", replica_id="rp-1", state="running")) is None
    assert apply_event(job("cancelled", replica="rp-1"), event("succeeded")) is None
    assert apply_event(job("running", replica="rp-1"), event("nonsense")) is None


def test_an_event_before_the_placement_is_recorded_names_the_replica() -> None:
    moved = apply_event(job(), event("running", replica="rp-9"))
    assert moved is not None and moved.replica_id == "rp-9"


def test_a_final_event_without_running_still_has_a_start() -> None:
    moved = apply_event(job(replica="rp-1"), event("succeeded"))
    assert moved is not None and moved.started_ms == moved.finished_ms == 1000


def test_stored_results_map_to_final_states() -> None:
    assert outcome_of(Result(call_id="x", ok=True)) == "succeeded"
    err = ErrorReply(code="function_timeout", message="ran past")
    assert outcome_of(Result(call_id="x", ok=False, error=err)) == "timed_out"
    err = ErrorReply(code="remote_error", message="boom")
    assert outcome_of(Result(call_id="x", ok=False, error=err)) == "failed"


def test_overdue_after_timeout_grace_and_margin() -> None:
    running = job("running", replica="rp-1", started_ms=1000, timeout_s=10.0)
    assert not overdue(running, 5.0, 1000 + 44_000)
    assert overdue(running, 5.0, 1000 + 46_000)
    assert not overdue(job("queued"), 5.0, 10**12)
