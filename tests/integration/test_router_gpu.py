"""The GPU router on real NATS, Postgres and S3: live prices, dead agents, waiting for capacity, the leader lease.

Agents are stand-ins in the test process that beat like real agents (a capacity report on the core subject
and in the capacity bucket every ``interval_s``) and answer ``StartReplica`` / ``StopReplica``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import pytest
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import (
    CapacityReport,
    GpuInfo,
    ReplicaInfo,
    StartReplica,
    StartReplicaReply,
    StopReplica,
)
from duanflow_proto.messages.common import Ack, HealthRequest
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.price import PriceList, PriceUpdate
from duanflow_proto.messages.release import (
    AppSpec,
    DeployReply,
    DeployRequest,
    FunctionSpec,
    UploadUrlReply,
    UploadUrlRequest,
)
from duanflow_router.adapters.nats import NatsLease
from duanflow_router.app import RouterApp, build_app
from duanflow_router.placement import pool_name
from duanflow_router.settings import Settings
from fixtures.waiting import eventually

pytestmark = pytest.mark.timeout(120)


def settings_for(infra: Any, unique: str) -> Settings:
    return Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        database_url=infra.postgres_dsn,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3.access_key,
        s3_secret_key=infra.s3.secret_key,
        s3_bucket=f"b{unique}",
        schema=f"router_{unique}",
        start_timeout_s=10.0,
    )


async def call(nc: Any, subject: str, msg: Any, reply_type: Any, timeout: float = 15) -> Any:
    reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
    return decode_reply(reply.data, reply_type)


def _put(url: str, data: bytes) -> None:
    req = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 204)


async def upload_bundle(nc: Any, data: bytes) -> tuple[str, str]:
    """Upload ``data`` as a bundle the way the CLI does; (key, digest)."""
    digest = hashlib.sha256(data).hexdigest()
    up: UploadUrlReply = await call(
        nc, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
    )
    if not up.exists:
        await asyncio.to_thread(_put, up.url, data)
    return up.key, digest


INTERVAL_S = 0.2


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class BeatingAgent:
    """A stand-in agent that reports every ``INTERVAL_S`` until :meth:`die`, and runs what it is told."""

    nc: Any
    agent_id: str
    region: str
    gpus: int = 2
    prices: dict[str, float] = field(default_factory=dict)
    held: dict[str, list[int]] = field(default_factory=dict)
    """Replicas it reports (id → GPU indices), including ones it was never told to start (foreign work)."""
    starts: list[StartReplica] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    subs: list[Any] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def report(self) -> CapacityReport:
        return CapacityReport(
            agent_id=self.agent_id,
            host=self.agent_id,
            region=self.region,
            gpus=[
                GpuInfo(index=i, uuid=f"{self.agent_id}-{i}", gpu_type="H100", memory_total_mb=81559, simulated=True)
                for i in range(self.gpus)
            ],
            prices=self.prices,
            replicas=[
                ReplicaInfo(replica_id=r, env="main", app="x", function="f", release="r", gpu_indices=g, state="ready")
                for r, g in self.held.items()
            ],
            simulated=True,
            ts_ms=now_ms(),
            interval_s=INTERVAL_S,
        )

    async def __aenter__(self) -> BeatingAgent:
        self.subs.append(await self.nc.subscribe(subjects.agent_command(self.agent_id, "start"), cb=self._start))
        self.subs.append(await self.nc.subscribe(subjects.agent_command(self.agent_id, "stop"), cb=self._stop))
        await self.beat()
        self.task = asyncio.create_task(self._beating())
        return self

    async def beat(self) -> None:
        data = codec.encode(self.report())
        await self.nc.publish(subjects.capacity(self.agent_id), data)
        kv = await self.nc.jetstream().key_value(subjects.KV_CAPACITY)
        await kv.put(subjects.token(self.agent_id), data)

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            await self.beat()

    async def die(self) -> None:
        """Stop beating and answering, as a crashed host would (its last report stays in the bucket)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        for sub in self.subs:
            await sub.unsubscribe()
        self.subs = []

    async def __aexit__(self, *exc: object) -> None:
        await self.die()
        kv = await self.nc.jetstream().key_value(subjects.KV_CAPACITY)
        with contextlib.suppress(Exception):
            await kv.delete(subjects.token(self.agent_id))

    async def _start(self, msg: Any) -> None:
        cmd = codec.decode(msg.data, StartReplica)
        self.starts.append(cmd)
        self.held[cmd.replica_id] = list(cmd.gpu_indices)
        reply = StartReplicaReply(replica_id=cmd.replica_id, agent_id=self.agent_id, pid=1, ready_ms=5)
        await msg.respond(codec.encode(reply))

    async def _stop(self, msg: Any) -> None:
        cmd = codec.decode(msg.data, StopReplica)
        self.stops.append(cmd.replica_id)
        self.held.pop(cmd.replica_id, None)
        await msg.respond(codec.encode(Ack()))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[RouterApp]:
    app = build_app(settings)
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_WITHIN_S)
        if not done:  # say where it hangs (a hang shows only this test's own wait otherwise)
            stacks = ["where the router's own task waits:\n" + await_chain(task)]
            for other in asyncio.all_tasks():
                if other is not asyncio.current_task() and not other.done():
                    out = io.StringIO()
                    other.print_stack(file=out)
                    stacks.append(out.getvalue())
            pytest.fail(f"the router did not stop within {STOP_WITHIN_S:g}s; tasks left:\n" + "\n".join(stacks))
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


def await_chain(task: asyncio.Task[Any]) -> str:
    """Every coroutine ``task`` is suspended in, outermost first (``print_stack`` shows only the outermost)."""
    lines = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
        lines.append(f"  {getattr(coro, '__qualname__', type(coro).__name__)} at {where}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines)


STOP_WITHIN_S = 30.0
"""A router's shutdown takes seconds (its Postgres pool closes within 10 s); longer is a hang."""


async def leading(app: RouterApp) -> bool:
    return app.leader


def price_app(name: str, **options: Any) -> AppSpec:
    fn = FunctionSpec(name="train", gpu=["H100"], optimize="price", **options)
    return AppSpec(name=name, module="train_app", functions=[fn])


async def deploy(nc: Any, spec: AppSpec, key: str, digest: str, timeout: float = 30) -> DeployReply:
    req = DeployRequest(spec=spec, bundle_key=key, bundle_digest=digest)
    reply: DeployReply = await call(nc, subjects.API_DEPLOY, req, DeployReply, timeout=timeout)
    return reply


def placed_on(reply: DeployReply) -> str:
    return " ".join(reply.messages)


async def test_live_prices_steer_the_next_placement(infra: Any, unique: str, nc_service: Any) -> None:
    settings = msgspec.structs.replace(settings_for(infra, unique), capacity_wait_s=0.0, tick_s=0.2)
    east, west = f"ag-{unique}-east", f"ag-{unique}-west"
    r_east, r_west = f"{unique}-east", f"{unique}-west"
    async with running(settings) as app:
        await eventually(lambda: leading(app), timeout=30)
        await agents_and_test_prices(app, nc_service, unique, east, west, r_east, r_west)

    # the override survives in the prices bucket: a new router starts with it
    async with running(settings) as again:
        await eventually(lambda: leading(again), timeout=30)
        assert again.control().prices.price("ag-x", r_east, "H100", {}) == 1.0


async def agents_and_test_prices(
    app: RouterApp, nc_service: Any, unique: str, east: str, west: str, r_east: str, r_west: str
) -> None:
    # 8 GPUs each: the rebalancer may move these price-optimised replicas to the cheaper pool between the steps
    # below; with room to spare on both agents, each placement is decided by price alone.
    async with (
        BeatingAgent(nc_service, east, r_east, gpus=8, prices={"H100": 3.0}),
        BeatingAgent(nc_service, west, r_west, gpus=8, prices={"H100": 2.0}),
    ):
        key, digest = await upload_bundle(nc_service, f"bundle {unique}".encode())
        first = await deploy(nc_service, price_app(f"{unique}a"), key, digest)
        assert west in placed_on(first)  # the cheaper declared price

        # `duanflow price set POOL PRICE`: the router's API, used at once by the next placement
        pool = pool_name(r_east, "H100")
        prices: PriceList = await call(
            nc_service, subjects.API_PRICE_SET, PriceUpdate(pool=pool, price_per_gpu_hour=1.0), PriceList
        )
        assert [(p.pool, p.price_per_gpu_hour) for p in prices.prices if p.pool == pool] == [(pool, 1.0)]
        second = await deploy(nc_service, price_app(f"{unique}b"), key, digest)
        assert east in placed_on(second)

        # the price feed subject: every router applies it
        west_pool = pool_name(r_west, "H100")
        await nc_service.publish(
            subjects.price(west_pool), codec.encode(PriceUpdate(pool=west_pool, price_per_gpu_hour=0.5))
        )

        async def feed_applied() -> bool:
            listed: PriceList = await call(nc_service, subjects.API_PRICE_LIST, HealthRequest(), PriceList)
            return any(p.pool == west_pool and p.price_per_gpu_hour == 0.5 for p in listed.prices)

        await eventually(feed_applied, timeout=10)
        third = await deploy(nc_service, price_app(f"{unique}c"), key, digest)
        assert west in placed_on(third)

        # a cap under every price: no_matching_gpu, naming the price constraint
        with pytest.raises(Exception, match=r"price excluded 2 candidate\(s\)"):
            await deploy(nc_service, price_app(f"{unique}d", max_price=0.25), key, digest)

        # a bad price is refused with a typed error
        with pytest.raises(InvalidInputError):
            await call(
                nc_service, subjects.API_PRICE_SET, PriceUpdate(pool="bad pool!", price_per_gpu_hour=1), PriceList
            )


async def test_price_optimised_replicas_move_to_a_pool_that_became_cheaper(
    infra: Any, unique: str, nc_service: Any
) -> None:
    settings = msgspec.structs.replace(settings_for(infra, unique), capacity_wait_s=0.0, tick_s=0.2)
    east, west = f"ag-{unique}-east", f"ag-{unique}-west"
    r_east, r_west = f"{unique}-east", f"{unique}-west"
    async with running(settings) as app:
        await eventually(lambda: leading(app), timeout=30)
        async with (
            BeatingAgent(nc_service, east, r_east, prices={"H100": 3.0}) as dear,
            BeatingAgent(nc_service, west, r_west, prices={"H100": 2.0}) as cheap,
        ):
            key, digest = await upload_bundle(nc_service, f"bundle {unique}".encode())
            reply = await deploy(nc_service, price_app(unique), key, digest)
            old = reply.replicas[0]
            assert west in placed_on(reply)
            # 5% cheaper is within the hysteresis margin: nothing moves
            await call(
                nc_service,
                subjects.API_PRICE_SET,
                PriceUpdate(pool=pool_name(r_east, "H100"), price_per_gpu_hour=1.9),
                PriceList,
            )
            passes = app.control().rebalance_passes

            async def looked() -> bool:
                return app.control().rebalance_passes > passes

            await eventually(looked, timeout=10)
            assert not dear.starts and not cheap.stops
            # 50% cheaper: the replica moves (new one first, then the old one drains and stops)
            await call(
                nc_service,
                subjects.API_PRICE_SET,
                PriceUpdate(pool=pool_name(r_east, "H100"), price_per_gpu_hour=1.0),
                PriceList,
            )

            async def moved() -> bool:
                return bool(dear.starts) and cheap.stops == [old]

            await eventually(moved, timeout=20)
            assert len(dear.starts) == 1 and dear.starts[0].app == unique


async def test_dead_agent_replicas_are_placed_elsewhere(infra: Any, unique: str, nc_service: Any) -> None:
    settings = msgspec.structs.replace(settings_for(infra, unique), capacity_wait_s=0.0, tick_s=0.2)
    first, second = f"ag-{unique}-1", f"ag-{unique}-2"
    async with running(settings) as app:
        await eventually(lambda: leading(app), timeout=30)
        await agents_and_test_death(app, nc_service, infra, settings, unique, first, second)


async def agents_and_test_death(
    app: RouterApp, nc_service: Any, infra: Any, settings: Settings, unique: str, first: str, second: str
) -> None:
    async with (
        BeatingAgent(nc_service, first, unique) as doomed,
        BeatingAgent(nc_service, second, unique) as survivor,
    ):
        key, digest = await upload_bundle(nc_service, f"bundle {unique}".encode())
        spec = AppSpec(name=unique, module="m", functions=[FunctionSpec(name="serve", gpu=["H100"], keep_warm=1)])
        reply = await deploy(nc_service, spec, key, digest)
        assert first in placed_on(reply) and not survivor.starts  # ties break by agent id
        lost = reply.replicas[0]

        await doomed.die()

        async def replaced() -> bool:
            return any(s.function == "serve" and s.app == unique for s in survivor.starts)

        await eventually(replaced, timeout=30)
        conn = await asyncpg.connect(infra.postgres_dsn)
        try:
            rows = await conn.fetch(f'SELECT replica_id, agent_id, state FROM "{settings.schema}".replicas')
        finally:
            await conn.close()
        states = {r["replica_id"]: (r["agent_id"], r["state"]) for r in rows}
        assert states[lost] == (first, "lost")
        assert (second, "running") in states.values()
        assert first in app.control().dead_agents


async def test_no_capacity_waits_with_backoff_and_says_so(infra: Any, unique: str, nc_service: Any) -> None:
    settings = msgspec.structs.replace(settings_for(infra, unique), capacity_wait_s=30.0, tick_s=0.2)
    lines: list[LogLine] = []

    async def on_line(msg: Any) -> None:
        lines.append(codec.decode(msg.data, LogLine))

    sub = await nc_service.subscribe(subjects.logs("main", unique, "scheduler", "router"), cb=on_line)
    agent_id = f"ag-{unique}"
    try:
        async with running(settings) as app:
            await eventually(lambda: leading(app), timeout=30)
            agent = BeatingAgent(nc_service, agent_id, unique, gpus=1)
            agent.held["rp-someone-else"] = [0]  # the only GPU is taken
            await agent.__aenter__()
            try:
                await wait_then_place(nc_service, agent, agent_id, unique, lines)
            finally:
                await agent.__aexit__(None, None, None)
    finally:
        await sub.unsubscribe()


async def wait_then_place(
    nc_service: Any, agent: BeatingAgent, agent_id: str, unique: str, lines: list[LogLine]
) -> None:
    key, digest = await upload_bundle(nc_service, f"bundle {unique}".encode())
    spec = AppSpec(name=unique, module="m", functions=[FunctionSpec(name="serve", gpu=["H100"])])
    pending = asyncio.create_task(deploy(nc_service, spec, key, digest, timeout=60))

    async def said_no_capacity() -> bool:
        waiting = [x for x in lines if x.message.startswith("[no_capacity]")]
        return len(waiting) >= 2 and not pending.done()

    await eventually(said_no_capacity, timeout=20)  # it waits, and says so each time it looks again
    del agent.held["rp-someone-else"]  # the other work ends
    reply = await asyncio.wait_for(pending, 30)
    assert agent_id in placed_on(reply)
    assert any(x.message.startswith("[placed]") for x in lines)


async def test_a_standby_takes_over_when_the_leader_dies(
    infra: Any, unique: str, nc_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = msgspec.structs.replace(settings_for(infra, unique), capacity_wait_s=0.0, tick_s=0.2)
    agent_id = f"ag-{unique}"
    first_run: contextlib.AbstractAsyncContextManager[RouterApp] | None = running(settings)
    assert first_run is not None
    first = await first_run.__aenter__()
    try:
        await eventually(lambda: leading(first), timeout=30)
        async with (
            BeatingAgent(nc_service, agent_id, unique, gpus=4),
            running(msgspec.structs.replace(settings, instance=f"standby-{unique}")) as standby,
        ):
            key, digest = await upload_bundle(nc_service, f"bundle {unique}".encode())
            with contextlib.suppress(AssertionError):  # no second leader while the first holds the lease
                await eventually(lambda: leading(standby), timeout=1.5)
            assert first.leader and not standby.leader
            spec = AppSpec(name=unique, module="m", functions=[FunctionSpec(name="serve", gpu=["H100"])])
            await deploy(nc_service, spec, key, digest)

            # the leader dies without giving the lease back: the standby waits for it to lapse
            async def no_release(self: NatsLease, holder: str) -> None:
                return None

            monkeypatch.setattr(NatsLease, "release", no_release)
            died = time.monotonic()
            await first_run.__aexit__(None, None, None)
            first_run = None
            await eventually(lambda: leading(standby), timeout=30)
            took = time.monotonic() - died
            assert took < 15, f"takeover took {took:.1f}s"
            # it rebuilt its state from Postgres: the first router's replica still holds its GPU
            assert standby.control().replicas and standby.control().fleet.reserved
            spec2 = AppSpec(name=f"{unique}b", module="m", functions=[FunctionSpec(name="serve", gpu=["H100"])])
            reply = await deploy(nc_service, spec2, key, digest)
            assert agent_id in placed_on(reply)
    finally:
        if first_run is not None:
            await first_run.__aexit__(None, None, None)
