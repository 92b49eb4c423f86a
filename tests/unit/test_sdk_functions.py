"""Pure parts of the invocation surface: lifecycle-class declarations, map batching and de-duplication, the
replica's pull credit, the inline gate and watchdog, and what undecodable arguments say. No I/O."""

from __future__ import annotations

import pickle
import sys
import time
from typing import Any

import duanflow as df
import pytest
from duanflow._map import MapRun, pickle_input
from duanflow._runtime.batch import decode_input
from duanflow._runtime.inline import FAST_STREAK, INLINE_MAX_S, Gate, InlineTimeout, Watchdog
from duanflow._runtime.pull import Puller
from duanflow_proto import codec
from duanflow_proto.messages.invocation import Result, ResultBatch
from duanflow_proto.messages.release import FunctionSpec


def test_cls_registers_one_unit_named_after_the_class() -> None:
    app = df.App("cls-unit")

    @app.cls(gpu="H100", concurrency=3)
    class Model:
        @df.enter()
        def load(self) -> None:
            self.k = 2

        @df.method()
        def predict(self, x: int) -> int:
            return self.k * x

    spec = app._registry()["Model"].spec
    assert (spec.kind, spec.concurrency, spec.gpu) == ("cls", 3, ["H100"])
    handle: Any = Model().predict  # mypy keeps a decorated class's own type: the handle is a df.Function here
    assert handle.label == "Model.predict"
    assert handle.local(21) == 42, "local() runs the method on one local instance, enter hooks first"
    assert [f.name for f in app.build_spec(module="m").functions] == ["Model"]


def test_cls_without_methods_or_with_bad_options_fails_at_decoration() -> None:
    app = df.App("cls-bad")
    with pytest.raises(df.InvalidOptionError, match=r"no @df\.method"):

        @app.cls()
        class Empty:
            pass

    with pytest.raises(df.InvalidOptionError, match="unknown option 'gpus'"):
        app.cls(gpus="H100")
    with pytest.raises(df.InvalidOptionError, match="concurrency"):
        app.cls(concurrency=0)


def test_plain_inputs_skip_cloudpickle_but_decode_the_same() -> None:
    assert pickle.loads(pickle_input((1, "a", None), {})) == ((1, "a", None), {})
    local = [lambda x: x]  # not picklable by the stdlib: goes through cloudpickle
    data = pickle_input((local[0],), {"k": 1})
    args, kwargs = decode_input(data, "f", "")
    assert args[0](5) == 5 and kwargs == {"k": 1}


def test_undecodable_arguments_say_which_pythons_differ() -> None:
    with pytest.raises(df.DeserializationError, match=r"caller's 3\.8: the versions differ"):
        decode_input(b"\x80\x05garbage", "f", "3.8")
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(df.DeserializationError) as info:
        decode_input(b"\x80\x05garbage", "f", mine)
    assert "versions differ" not in str(info.value)


class _Loop:
    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        fn(*args)


class _Client:
    _loop = _Loop()
    _pending: dict[str, Any] = {}

    def new_call_id(self) -> str:
        return "fc-unit1"

    def _spawn_task(self, coro: Any) -> None:
        coro.close()


class _Target:
    wait_s = 60.0
    gpu_label = "GPU"
    spec = FunctionSpec(name="f")


def _batch(first: int, values: list[int], duration_us: int = 5) -> bytes:
    results = [Result(call_id="fc-unit1", ok=True, value=pickle.dumps(v), duration_us=duration_us) for v in values]
    return codec.encode(ResultBatch(call_id="fc-unit1", first_index=first, results=results))


def test_map_keeps_the_first_result_of_each_input_and_grows_its_batches() -> None:
    run = MapRun(_Client(), _Target(), "f", lambda: None)  # type: ignore[arg-type]
    run.outstanding = {0: 2, 2: 2}
    run.on_data(_batch(0, [10, 11]))
    run.on_data(_batch(0, [99, 99]))  # the same batch run again after a crash: ignored
    run.on_data(_batch(2, [12, 13]))
    run.absorb()
    assert {i: pickle.loads(r.value) for i, r in run.results.items()} == {0: 10, 1: 11, 2: 12, 3: 13}
    assert run.outstanding == {} and run.done_count == 4
    assert run.batch_size == 4, "doubles per answered batch while inputs are tiny"


def test_map_batches_stay_small_for_slow_functions() -> None:
    run = MapRun(_Client(), _Target(), "f", lambda: None)  # type: ignore[arg-type]
    run.outstanding = {0: 1}
    run.on_data(_batch(0, [1], duration_us=500_000))
    run.absorb()
    assert run.batch_size == 1


class _Nc:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []

    def new_inbox(self) -> str:
        return "_INBOX.unit"

    async def publish(self, subject: str, data: bytes, reply: str = "", headers: Any = None) -> None:
        self.sent.append((subject, data, reply))


class _Msg:
    def __init__(self, subject: str, data: bytes = b"x", headers: dict[str, str] | None = None) -> None:
        self.subject, self.data, self.headers, self.reply = subject, data, headers, "$JS.ACK.x"


async def test_pull_credit_matches_free_slots_exactly() -> None:
    nc = _Nc()
    got: list[Any] = []
    puller = Puller(nc, "S", "c", got.append)
    puller._sub = object()
    puller._inbox = "_INBOX.unit"
    await puller.top_up(3)
    await puller.top_up(3)
    assert len(nc.sent) == 1 and puller.credit == 3
    assert b'"batch": 3' in nc.sent[0][1]
    puller._on_reply(_Msg("duanflow.inv.e.a.f"))  # type: ignore[arg-type]
    assert puller.credit == 2 and len(got) == 1
    token = nc.sent[0][2]
    puller._on_reply(_Msg(token, b"", {"Status": "408", "Nats-Pending-Messages": "2"}))  # type: ignore[arg-type]
    assert puller.credit == 0
    await puller.ack_next(_Msg("x"), 1)  # type: ignore[arg-type]
    assert nc.sent[-1][1].startswith(b"+NXT ") and puller.credit == 1


def test_gate_goes_inline_after_fast_calls_and_back_after_a_slow_one() -> None:
    gate = Gate()
    for _ in range(FAST_STREAK):
        assert not gate.inline
        gate.record(INLINE_MAX_S / 10)
    assert gate.inline
    gate.record(INLINE_MAX_S * 10)
    assert not gate.inline


def test_watchdog_interrupts_an_inline_call_that_overruns() -> None:
    def spin() -> None:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            pass

    started = time.monotonic()
    with pytest.raises(InlineTimeout):
        Watchdog().call(spin, (), {}, 0.2)
    assert time.monotonic() - started < 2
    assert Watchdog().call(lambda: 7, (), {}, 1.0) == 7
