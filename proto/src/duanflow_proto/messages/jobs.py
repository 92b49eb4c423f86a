"""Long GPU jobs (``@app.job``): submit, list, status, cancel (router API) and the events a job's replica sends."""

from __future__ import annotations

from typing import Final

import msgspec

QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
CANCELLED: Final = "cancelled"
STATES: Final = (QUEUED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)
TERMINAL: Final = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED})
"""States a job never leaves."""

HDR_JOB: Final = "Df-Job"
"""Header of a job's invocation message: the job id (also its ``Nats-Msg-Id``)."""
ENV_JOB_ID: Final = "DUANFLOW_JOB_ID"
"""Env var of a job's dedicated replica: the job it runs (one input, then it exits: the one-shot runtime mode)."""


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.spec", tag_field="type"):
    """What makes a function a job (``FunctionSpec.job``): one dedicated replica per run, no warm replicas."""

    grace_s: float = 30.0
    """Seconds a cancelled or timed-out job's replica gets after SIGTERM before it is killed."""


class JobSubmit(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.submit", tag_field="type"):
    """Start one run of a job function (``train_lora.spawn(uri)``; ``API_JOB_SUBMIT`` → ``JobInfo``)."""

    env: str
    """Environment of the deployed app."""
    app: str
    """App name."""
    function: str
    """Job function name."""
    args: bytes = b""
    """``cloudpickle.dumps((args, kwargs))``; empty when ``payload_ref`` is set."""
    payload_ref: str | None = None
    """Digest of the arguments stored through ``API_PAYLOAD_URL`` when they were too large to travel inline."""
    python: str = ""
    """Caller's Python ``major.minor``, to explain unpickling failures."""
    job_id: str = ""
    """Id chosen by the caller (``jb-...``) so a re-sent submit is one job; empty: the router picks one."""


class JobRef(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.ref", tag_field="type"):
    """One job by id: ``API_JOB_STATUS`` → ``JobInfo``, ``API_JOB_CANCEL`` → ``JobInfo``."""

    job_id: str
    """The job's id (``jb-...``)."""


class JobInfo(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.info", tag_field="type"):
    """One job and where it stands."""

    job_id: str
    """The job's id (``jb-...``); the results bucket keeps its result under this key."""
    env: str
    """Environment."""
    app: str
    """App name."""
    function: str
    """Job function name."""
    release_id: str = ""
    """Release whose code runs it."""
    state: str = QUEUED
    """``queued``, ``running``, ``succeeded``, ``failed``, ``timed_out`` or ``cancelled``."""
    replica_id: str = ""
    """Its dedicated replica (empty while queued)."""
    agent_id: str = ""
    """Agent that runs it (empty while queued)."""
    gpu_indices: list[int] = []
    """GPUs it holds on that agent."""
    gpu_type: str = ""
    """GPU type of those GPUs."""
    timeout_s: float = 0.0
    """The function's timeout: the job is stopped and marked ``timed_out`` past it."""
    created_ms: int = 0
    """When it was submitted (epoch ms)."""
    started_ms: int = 0
    """When its function started running (0: not yet)."""
    finished_ms: int = 0
    """When it reached a final state (0: not yet)."""
    error: str = ""
    """Why it failed, timed out or was cancelled."""
    traceback: str = ""
    """Remote traceback of a failed job."""
    message: str = ""
    """Latest scheduler note (e.g. why it is still queued)."""


class JobListRequest(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.list_request", tag_field="type"):
    """List jobs, newest first (``API_JOB_LIST`` → ``JobList``)."""

    env: str
    """Environment."""
    app: str = ""
    """Only this app's jobs (empty: every app)."""
    state: str = ""
    """Only jobs in this state (empty: any)."""
    limit: int = 100
    """At most this many."""


class JobList(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.list", tag_field="type"):
    """Jobs, newest first."""

    jobs: list[JobInfo] = []
    """The jobs."""


class JobEvent(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.job.event", tag_field="type"):
    """What a job's replica reports on ``subjects.job_event(job_id)``: it started, or how it ended."""

    job_id: str
    """The job."""
    replica_id: str
    """The replica that runs it (the router ignores events from any other)."""
    state: str
    """``running``, ``succeeded``, ``failed`` or ``timed_out``."""
    ts_ms: int = 0
    """When (epoch ms)."""
    error: str = ""
    """``ExcType: message`` of a failure or the timeout."""
    traceback: str = ""
    """Remote traceback of a failure."""
