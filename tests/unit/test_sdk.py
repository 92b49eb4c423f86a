"""The SDK's user surface without I/O: exports, decorator validation, specs, result decoding, the sync facade."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import cloudpickle
import duanflow as df
import pytest
from duanflow import _client
from duanflow._app import find_app
from duanflow._client import decode_result
from duanflow._runtime.config import ConfigError, RuntimeConfig
from duanflow._runtime.worker import load_target, remote_error
from duanflow_proto import codec
from duanflow_proto.errors import FunctionTimeoutError as WireFunctionTimeout
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import Result
from duanflow_proto.messages.release import AppSpec

pytestmark = pytest.mark.timeout(30)

EXPECTED_ALL = [
    "App",
    "Auth",
    "BuildFailedError",
    "CallCancelledError",
    "Cls",
    "ConflictError",
    "DeadlineExceededError",
    "DeserializationError",
    "DuanFlowError",
    "Function",
    "FunctionCall",
    "FunctionTimeoutError",
    "Image",
    "InternalError",
    "InvalidInputError",
    "InvalidOptionError",
    "Job",
    "NoCapacityError",
    "NoMatchingGpuError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Queue",
    "RemoteError",
    "Request",
    "Response",
    "Retries",
    "Secret",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
    "current_job_id",
    "enter",
    "exit",
    "method",
    "storage",
]


def test_public_names_are_pinned() -> None:
    assert sorted(df.__all__) == sorted(EXPECTED_ALL)
    for name in df.__all__:
        assert getattr(df, name) is not None


def test_public_callables_have_docstrings() -> None:
    for name in df.__all__:
        obj = getattr(df, name)
        if isinstance(obj, type):
            assert obj.__doc__, name
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert member.__doc__, f"{name}.{attr}"
    assert df.App.function.__doc__ and "Example" in df.App.function.__doc__


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        ({"gpux": "H100"}, ["unknown option 'gpux'", "valid options: gpu, memory, timeout"]),
        ({"timeout": -1}, ["timeout=", "> 0", "-1"]),
        ({"timeout": 0}, ["timeout="]),
        ({"concurrency": 0}, ["concurrency=", "from 1 to"]),
        ({"concurrency": 1.5}, ["concurrency="]),
        ({"gpu": "H1000"}, ["gpu='H1000'", "valid types", "H100", "L40S"]),
        ({"gpu": 3}, ["gpu="]),
        ({"gpu": "H100", "memory": "lots"}, ["memory='lots'", "48Gi+"]),
        ({"gpu": "L4", "memory": "80Gi"}, ["memory='80Gi'", "L4: 24Gi"]),
        ({"memory": "48Gi"}, ["set gpu= too"]),
        ({"optimize": "cheap"}, ["optimize='cheap'", "'latency'", "'price'"]),
        ({"keep_warm": 3, "scale_to": 2}, ["scale_to=2", "keep_warm=3"]),
        ({"max_price": -1.0}, ["max_price="]),
        ({"gpu": "A100", "gpu_count": 99}, ["gpu_count", "1 to 16"]),
        ({"gpu_count": 2}, ["gpu_count= needs gpu="]),
        ({"retries": "often"}, ["retries="]),
        ({"region": "Not A Region!"}, ["region="]),
        ({"secrets": [3]}, ["secrets="]),
        ({"env": {"1BAD": "x"}}, ["'1BAD'"]),
        ({"image": "ubuntu"}, ["image= takes a df.Image"]),
    ],
)
def test_bad_options_fail_at_decoration_naming_the_option(options: dict[str, Any], needles: list[str]) -> None:
    app = df.App("validation")
    with pytest.raises(df.InvalidOptionError) as info:
        app.function(**options)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert isinstance(info.value, df.InvalidInputError) and isinstance(info.value, TypeError)


def test_bad_app_options() -> None:
    with pytest.raises(df.InvalidOptionError, match="App name"):
        df.App("no spaces allowed")
    with pytest.raises(df.InvalidOptionError, match="unknown option 'gpu'"):
        df.App("ok", gpu="H100")
    with pytest.raises(df.InvalidOptionError, match="image="):
        df.App("ok", image="ubuntu")  # type: ignore[arg-type]


def test_product_page_router_example_builds_its_spec() -> None:
    app = df.App("customer-ai-api", secrets=[df.Secret.from_name("hf-prod")], env={"MODEL_ID": "Qwen"})

    @app.function(
        gpu=["H100", "A100-80G", "L40S"],
        memory="48Gi+",
        optimize="price",
        max_price=1.20,
        region=["cn-shanghai", "ap-singapore"],
    )
    def embed_documents(documents: list[str]) -> list[int]:
        return [len(d) for d in documents]

    @app.function(gpu="A100-80G", gpu_count=4, timeout=10800, retries=df.Retries(max_retries=2))
    def train_lora(dataset_uri: str) -> str:
        return dataset_uri

    spec = app.build_spec(module="customer_ai")
    assert isinstance(spec, AppSpec)
    assert (spec.name, spec.module, spec.secrets, spec.env) == (
        "customer-ai-api",
        "customer_ai",
        ["hf-prod"],
        {"MODEL_ID": "Qwen"},
    )
    embed, train = spec.functions
    assert embed.gpu == ["H100", "A100-80G", "L40S"] and embed.gpu_memory_mb == 48 * 1024 and not embed.memory_exact
    assert (embed.optimize, embed.max_price, embed.region) == ("price", 1.2, ["cn-shanghai", "ap-singapore"])
    assert (train.gpu_count, train.timeout_s, train.retries) == (4, 10800.0, 2)
    assert embed_documents.local(["ab", "c"]) == [2, 1]
    assert app._registry()["train_lora"].raw_f("s3://x") == "s3://x"
    assert app._registry()["train_lora"].spec == train
    assert codec.decode(codec.encode(spec), AppSpec) == spec


def test_module_defaults_to_the_file_stem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stem_app_x1.py").write_text(
        textwrap.dedent(
            """
            import duanflow as df
            app = df.App("stem-app")

            @app.function
            def f(x):
                return x
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import stem_app_x1  # type: ignore[import-not-found]

    assert stem_app_x1.app.build_spec().module == "stem_app_x1"
    assert find_app(stem_app_x1, "stem-app") is stem_app_x1.app
    # `duanflow deploy FILE --name other`: the file's only App runs under the deployed name
    assert find_app(stem_app_x1, "other") is stem_app_x1.app

    (tmp_path / "two_apps_x1.py").write_text('import duanflow as df\na = df.App("one")\nb = df.App("two")\n')
    import two_apps_x1  # type: ignore[import-not-found]

    assert find_app(two_apps_x1, "two") is two_apps_x1.b
    with pytest.raises(LookupError, match=r"no df\.App named 'other' \(it defines one, two\)"):
        find_app(two_apps_x1, "other")


def test_duplicate_function_names_and_conflicting_images_are_refused() -> None:
    app = df.App("dups")

    @app.function
    def f() -> None: ...

    with pytest.raises(df.InvalidOptionError, match="already has a function named 'f'"):
        app.function(f.raw_f)

    @app.function(image=df.Image.debian_slim().pip_install("numpy"))
    def g() -> None: ...

    @app.function(image=df.Image.debian_slim().pip_install("torch"))
    def h() -> None: ...

    with pytest.raises(df.InvalidOptionError, match="one image per app"):
        app.build_spec(module="dups")


def _result(**kwargs: Any) -> bytes:
    return codec.encode(Result(call_id="fc-1", **kwargs))


class LocalError(Exception):
    pass


def test_decode_result_returns_the_value() -> None:
    assert decode_result(_result(ok=True, value=cloudpickle.dumps({"label": "timeout"})), "f") == {"label": "timeout"}


def test_decode_result_reraises_the_users_exception_with_the_remote_traceback() -> None:
    try:
        raise LocalError("remote boom")
    except LocalError as exc:
        error = remote_error(exc)
    assert error.exc_type == f"{__name__}.LocalError"
    with pytest.raises(LocalError, match="remote boom") as info:
        decode_result(_result(ok=False, error=error, replica_id="rp-1"), "f")
    notes = "\n".join(info.value.__notes__)
    assert "Remote traceback (from f on rp-1)" in notes and 'raise LocalError("remote boom")' in notes


def test_decode_result_unimportable_exception_becomes_remote_error() -> None:
    error = ErrorReply(
        code="remote_error",
        message="Boom: no",
        exc_type="gone_module.Boom",
        exc_pickle=b"\x80\x04not a pickle",
        traceback="Traceback (most recent call last):\n  gone\n",
    )
    with pytest.raises(df.RemoteError, match=r"gone_module\.Boom: Boom: no") as info:
        decode_result(_result(ok=False, error=error), "f")
    assert info.value.remote_traceback and "gone" in info.value.remote_traceback


def test_decode_result_timeout_and_garbage() -> None:
    with pytest.raises(df.FunctionTimeoutError, match="timeout of 2s"):
        decode_result(_result(ok=False, error=WireFunctionTimeout("f ran past its timeout of 2s").to_reply()), "f")
    with pytest.raises(df.DeserializationError, match="could not be decoded"):
        decode_result(b"\x00garbage", "f")


def test_simulated_gpu_note_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    _client._simulated_noted.discard("classify_ticket")
    for _ in range(3):
        decode_result(_result(ok=True, value=cloudpickle.dumps(1), simulated_gpu=True), "classify_ticket", "H100")
    err = capsys.readouterr().err
    assert err.count("note: classify_ticket ran on a simulated H100 (no GPU on this machine)") == 1


async def test_blocking_calls_inside_an_event_loop_point_at_aio() -> None:
    app = df.App("loopy")

    @app.function
    def f(x: int) -> int:
        return x

    with pytest.raises(df.InvalidInputError, match=r"await f\.remote\.aio\(\.\.\.\)"):
        f.remote(1)
    with pytest.raises(df.InvalidInputError, match=r"await f\.spawn\.aio"):
        f.spawn(1)
    assert f.local(2) == 2


def test_function_handles() -> None:
    handle = df.Function.from_name("hello-gpu", "classify_ticket", env="prod")
    assert (handle.app_name, handle.name) == ("hello-gpu", "classify_ticket")
    with pytest.raises(df.InvalidInputError, match="no local code"):
        handle.local("x")
    with pytest.raises(df.InvalidInputError):
        df.Function.from_name("", "f")
    with pytest.raises(df.InvalidInputError, match="call id"):
        df.FunctionCall.from_id("nope")


def test_runtime_config_reads_the_contract_env() -> None:
    env = {
        "DUANFLOW_NATS_URL": "nats://127.0.0.1:4222",
        "DUANFLOW_REPLICA_ID": "rp-1",
        "DUANFLOW_ENV": "main",
        "DUANFLOW_APP": "hello-gpu",
        "DUANFLOW_FUNCTION": "classify_ticket",
        "DUANFLOW_MODULE": "hello",
        "DUANFLOW_STREAM": "DUANFLOW_INV",
        "DUANFLOW_CONSUMER": "fn_main_hello_gpu_classify_ticket",
        "DUANFLOW_CONCURRENCY": "3",
        "DUANFLOW_TIMEOUT_S": "1.5",
        "DUANFLOW_SIMULATED_GPU": "1",
    }
    cfg = RuntimeConfig.from_env(env)
    assert (cfg.concurrency, cfg.timeout_s, cfg.simulated_gpu) == (3, 1.5, True)
    with pytest.raises(ConfigError, match="DUANFLOW_MODULE"):
        RuntimeConfig.from_env({k: v for k, v in env.items() if k != "DUANFLOW_MODULE"})
    with pytest.raises(ConfigError, match="at least 1"):
        RuntimeConfig.from_env({**env, "DUANFLOW_CONCURRENCY": "0"})


def test_runtime_loads_the_example_by_module_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    monkeypatch.delitem(sys.modules, "hello", raising=False)
    env = {
        "DUANFLOW_NATS_URL": "nats://x",
        "DUANFLOW_REPLICA_ID": "rp-1",
        "DUANFLOW_ENV": "main",
        "DUANFLOW_APP": "hello-gpu",
        "DUANFLOW_FUNCTION": "classify_ticket",
        "DUANFLOW_MODULE": "hello",
        "DUANFLOW_STREAM": "DUANFLOW_INV",
        "DUANFLOW_CONSUMER": "c",
    }
    target = load_target(RuntimeConfig.from_env(env))
    assert target.spec.gpu == ["H100"]
    assert target.raw_f("我的模型接口超时了")["label"] == "timeout"
    with pytest.raises(LookupError, match="no function 'nope'"):
        load_target(RuntimeConfig.from_env({**env, "DUANFLOW_FUNCTION": "nope"}))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"gpu": "A100:80GB:2"}, (["A100-80G"], 2, 80 * 1024, 0)),
        ({"gpu": "H100", "memory": "24GB..80GB"}, (["H100"], 1, 24 * 1024, 80 * 1024)),
        ({"gpu": ["H100", "A100-40G", "L40S"], "memory": "48Gi+"}, (["H100", "L40S"], 1, 48 * 1024, 0)),
        ({"gpu": "H100", "memory": "80Gi"}, (["H100"], 1, 80 * 1024, 0)),
    ],
)
def test_decorator_takes_the_router_gpu_spec_forms(
    options: dict[str, Any], expected: tuple[list[str], int, int, int]
) -> None:
    app = df.App("gpuspec-forms")

    @app.function(**options)
    def f(x: int) -> int:
        return x

    spec = f.spec
    assert (spec.gpu, spec.gpu_count, spec.gpu_memory_mb, spec.gpu_memory_max_mb) == expected
