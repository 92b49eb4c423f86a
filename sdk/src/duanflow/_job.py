"""Long GPU jobs: ``@app.job`` functions, ``train_lora.spawn(uri)`` → :class:`Job`, and its status, result, cancel.

A job runs on its own replica (``gpu_count`` GPUs on one host, shared with no other job) that exits after
the one run; the router keeps the job's state (``queued → running → succeeded | failed | timed_out |
cancelled``) and the result lands in the same results bucket as ``.spawn()`` results.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import cloudpickle
from duanflow_proto import subjects
from duanflow_proto.messages.jobs import (
    CANCELLED,
    TERMINAL,
    TIMED_OUT,
    JobInfo,
    JobList,
    JobListRequest,
    JobRef,
    JobSubmit,
)

from duanflow._client import PYTHON, Client, decode_result, ensure_blocking_allowed, get_client
from duanflow._errors import (
    CallCancelledError,
    DeadlineExceededError,
    FunctionTimeoutError,
    InvalidInputError,
    RemoteError,
)
from duanflow._function import Function, FunctionCall
from duanflow._payload import INLINE_MAX
from duanflow._payload import store as store_payload

if TYPE_CHECKING:
    from duanflow_proto.messages.release import FunctionSpec

    from duanflow._app import App
    from duanflow._image import Image

P = ParamSpec("P")
R = TypeVar("R")

POLL_MAX_S = 1.0
"""Longest pause between two status polls of a job being waited on."""
RESULT_READ_S = 5.0
"""How long a finished job's result may take to show in the results bucket."""


def new_job_id() -> str:
    """A fresh job id (``jb-`` + 16 hex digits)."""
    return f"jb-{uuid.uuid4().hex[:16]}"


async def submit(client: Client, app: str, function: str, env: str, payload: bytes) -> JobInfo:
    """Ask the router to run one job (arguments over ~1 MiB go through S3 first)."""
    nc = client._nc or await client.connect()
    ref = None
    if len(payload) > INLINE_MAX:
        ref, payload = await store_payload(nc, payload), b""
    req = JobSubmit(
        env=env, app=app, function=function, args=payload, payload_ref=ref, python=PYTHON, job_id=new_job_id()
    )
    return await client.request(subjects.API_JOB_SUBMIT, req, JobInfo)


async def status(client: Client, job_id: str) -> JobInfo:
    """One job's state, times and error."""
    return await client.request(subjects.API_JOB_STATUS, JobRef(job_id=job_id), JobInfo)


async def cancel(client: Client, job_id: str) -> JobInfo:
    """Cancel one job (a finished job stays as it ended)."""
    return await client.request(subjects.API_JOB_CANCEL, JobRef(job_id=job_id), JobInfo)


async def list_jobs(client: Client, env: str, app: str = "", state: str = "", limit: int = 100) -> JobList:
    """Jobs of one env (optionally one app or state), newest first."""
    return await client.request(
        subjects.API_JOB_LIST, JobListRequest(env=env, app=app, state=state, limit=limit), JobList
    )


async def wait_result(client: Client, job_id: str, timeout: float | None) -> tuple[JobInfo, bytes]:  # noqa: ASYNC109
    """Wait until the job is final; its info and raw Result (raises when cancelled or without a result)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.05
    while True:
        info = await status(client, job_id)
        if info.state in TERMINAL:
            break
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError(
                f"job {job_id} is still {info.state} after {timeout:g}s", details={"job_id": job_id}
            )
        pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(pause)
        delay = min(delay * 2, POLL_MAX_S)
    if info.state == CANCELLED:
        raise CallCancelledError(f"job {job_id} was cancelled: {info.error or 'no result'}", details={"job_id": job_id})
    try:
        return info, await client.wait_result(job_id, RESULT_READ_S)
    except DeadlineExceededError:
        # Ended without reporting (killed past its timeout, or its host died): the router's word is all there is.
        if info.state == TIMED_OUT:
            raise FunctionTimeoutError(info.error or f"job {job_id} timed out", details={"job_id": job_id}) from None
        raise RemoteError(
            f"job {job_id} {info.state}: {info.error or 'no result'}",
            details={"job_id": job_id},
            traceback=info.traceback or None,
        ) from None


class _JobGet(Generic[R]):
    """``job.get(timeout)`` waits for the job's result; ``await job.get.aio(timeout)`` is its async form."""

    __slots__ = ("_job",)

    def __init__(self, job: Job[R]) -> None:
        self._job = job

    def __call__(self, timeout: float | None = None) -> R:
        """Wait up to ``timeout`` seconds (default: until the job ends) and return its result or raise its error."""
        job = self._job
        ensure_blocking_allowed("Job.get()", "`await job.get.aio()`")
        if job._data is None:
            client = get_client()
            job._info, job._data = client.run(wait_result, client, job.job_id, job._check(timeout))
        data: bytes = job._data
        return decode_result(data, job.function, job._gpu)  # type: ignore[no-any-return]

    async def aio(self, timeout: float | None = None) -> R:  # noqa: ASYNC109
        """Wait for the result without blocking the event loop."""
        job = self._job
        data = job._data
        if data is None:
            client = get_client()
            info, raw = await client.run_async(wait_result, client, job.job_id, job._check(timeout))
            job._info, job._data = info, raw
            return decode_result(raw, job.function, job._gpu)  # type: ignore[no-any-return]
        return decode_result(data, job.function, job._gpu)  # type: ignore[no-any-return]


class _JobCall:
    """``job.status()`` / ``job.cancel()`` and their ``.aio()`` forms: one control request, the job's ``JobInfo``."""

    __slots__ = ("_job", "_name", "_op")

    def __init__(self, job: Job[Any], op: Callable[[Client, str], Coroutine[Any, Any, JobInfo]], name: str) -> None:
        self._job = job
        self._op = op
        self._name = name

    def __call__(self) -> JobInfo:
        """Ask the router; returns the job's ``JobInfo``."""
        ensure_blocking_allowed(f"Job.{self._name}()", f"`await job.{self._name}.aio()`")
        client = get_client()
        info = self._job._info = client.run(self._op, client, self._job.job_id)
        return info

    async def aio(self) -> JobInfo:
        """The same, from async code."""
        client = get_client()
        info = self._job._info = await client.run_async(self._op, client, self._job.job_id)
        return info


class Job(FunctionCall[R]):
    """One run of an ``@app.job`` function: ``train_lora.spawn(uri)`` returns it at once.

    Its state goes ``queued → running → succeeded | failed | timed_out | cancelled``. ``df.Job.from_id(id)``
    gives the same handle in any process.

    Example::

        job = train_lora.spawn("s3://datasets/tickets.jsonl")
        print(job.job_id, job.status().state)
        model_uri = job.get()        # waits until it ends
        job.cancel()                 # or stop it (its GPUs are freed)
    """

    get: _JobGet[R]  # type: ignore[assignment]
    """Wait for the result: ``job.get(timeout=None)``; async: ``await job.get.aio(timeout=None)``."""
    status: _JobCall
    """The job's state now (a ``JobInfo``: ``.state``, replica, GPUs, times, error): ``job.status()``; async:
    ``await job.status.aio()``."""
    cancel: _JobCall  # type: ignore[assignment]
    """Cancel the job (its replica is stopped and its GPUs freed; ``get()`` then raises ``CallCancelledError``):
    ``job.cancel()``; async: ``await job.cancel.aio()``. Returns its ``JobInfo``."""

    def __init__(self, job_id: str, *, function: str = "", info: JobInfo | None = None, gpu: str = "GPU") -> None:
        super().__init__(job_id, function=function or (info.function if info else ""), gpu=gpu)
        self._info = info
        self.get = _JobGet(self)
        self.status = _JobCall(self, status, "status")
        self.cancel = _JobCall(self, cancel, "cancel")

    @classmethod
    def from_id(cls, job_id: str) -> Job[Any]:
        """A handle on a job by its id (``job.job_id``), from any process.

        Example::

            df.Job.from_id("jb-0123456789abcdef").status().state
        """
        if not isinstance(job_id, str) or not job_id.startswith("jb-"):
            raise InvalidInputError(f"Job.from_id() takes a job id like 'jb-…', got {job_id!r}")
        return cls(job_id)

    @property
    def job_id(self) -> str:
        """The job's id (``jb-...``), the same as :attr:`object_id`."""
        return self.object_id

    def _check(self, timeout: float | None) -> float | None:
        if timeout is None:
            return None
        return self._timeout(timeout)

    def __repr__(self) -> str:
        state = f" ({self._info.state})" if self._info is not None else ""
        return f"<duanflow Job {self.job_id} of {self.function}{state}>"


class _JobSpawn(Generic[P, R]):
    """``job_fn.spawn(...)`` submits one run and returns its :class:`Job` at once."""

    __slots__ = ("_fn",)

    def __init__(self, fn: JobFunction[P, R]) -> None:
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Submit the job (queued until its GPUs are free); returns its handle."""
        fn = self._fn
        ensure_blocking_allowed(f"{fn.name}.spawn()", f"`await {fn.name}.spawn.aio(...)`")
        client = get_client()
        payload = cloudpickle.dumps((args, kwargs))
        app, name, env = fn._target(client)
        info = client.run(submit, client, app, name, env, payload)
        return Job(info.job_id, function=fn.name, info=info, gpu=fn._gpu_label())

    async def aio(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Submit the job from async code."""
        fn = self._fn
        client = get_client()
        payload = cloudpickle.dumps((args, kwargs))
        app, name, env = fn._target(client)
        info = await client.run_async(submit, client, app, name, env, payload)
        return Job(info.job_id, function=fn.name, info=info, gpu=fn._gpu_label())


class _JobRemote(Generic[P, R]):
    """``job_fn.remote(...)``: submit the job and wait for its result (``spawn(...).get()``)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: JobFunction[P, R]) -> None:
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the job and wait until it ends."""
        return self._fn.spawn(*args, **kwargs).get()

    async def aio(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the job and wait until it ends, from async code."""
        job = await self._fn.spawn.aio(*args, **kwargs)
        return await job.get.aio()


class _NotForJobs:
    """``.map()`` and friends: a job is one long run on dedicated GPUs, not a fan-out."""

    def __init__(self, name: str, what: str) -> None:
        self._name = name
        self._what = what

    def _refuse(self) -> InvalidInputError:
        return InvalidInputError(
            f"{self._name} is an @app.job: it has no .{self._what}(); start runs with {self._name}.spawn(...) "
            "(one dedicated replica each), or declare it with @app.function to fan out"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse()

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        """Refused as well."""
        raise self._refuse()


class JobFunction(Function[P, R]):
    """A function declared with ``@app.job``: ``.spawn()`` returns a :class:`Job`, ``.remote()`` waits for it."""

    spawn: _JobSpawn[P, R]  # type: ignore[assignment]
    remote: _JobRemote[P, R]  # type: ignore[assignment]

    def __init__(
        self,
        *,
        name: str,
        raw_f: Any,
        spec: FunctionSpec,
        app: App,
        image: Image | None = None,
    ) -> None:
        super().__init__(name=name, raw_f=raw_f, spec=spec, app=app, image=image)
        self.spawn = _JobSpawn(self)
        self.remote = _JobRemote(self)
        self.map = _NotForJobs(name, "map")  # type: ignore[assignment]
        self.starmap = _NotForJobs(name, "starmap")  # type: ignore[assignment]
        self.remote_gen = _NotForJobs(name, "remote_gen")  # type: ignore[assignment]

    def _gpu_label(self) -> str:
        gpus = self._spec.gpu if self._spec is not None else []
        return gpus[0] if len(gpus) == 1 else "GPU"
