"""``@app.job``: options checked when the decorator runs (naming the option), the spec it deploys, the handle."""

from __future__ import annotations

from typing import Any

import duanflow as df
import pytest
from duanflow._job import Job, JobFunction
from duanflow_proto import codec
from duanflow_proto.messages.jobs import JobSpec
from duanflow_proto.messages.release import AppSpec


def test_the_product_page_job_declares_a_job_spec() -> None:
    app = df.App("customer-ai-api")

    @app.job(gpu="A100-80G", gpu_count=4, timeout=10800)
    def train_lora(dataset_uri: str) -> str:
        return f"fit {dataset_uri}"

    assert isinstance(train_lora, JobFunction)
    spec = train_lora.spec
    assert spec.kind == "job" and spec.job == JobSpec()
    assert spec.gpu == ["A100-80G"] and spec.gpu_count == 4 and spec.timeout_s == 10800
    assert spec.keep_warm == 0
    assert train_lora.local("s3://d") == "fit s3://d"
    built = app.build_spec(module="train")
    assert codec.decode(codec.encode(built), AppSpec).functions[0].job == JobSpec()


def test_other_functions_have_no_job() -> None:
    app = df.App("plain")

    @app.function(gpu="L40S")
    def f(x: int) -> int:
        return x

    assert f.spec.job is None


def test_a_job_without_a_timeout_gets_the_default() -> None:
    app = df.App("defaults")

    @app.job(gpu="H100")
    def run() -> None:
        return None

    assert run.spec.timeout_s == 3600.0 and run.spec.gpu_count == 1


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"gpu": "H1000"}, "gpu"),
        ({"gpu": "H100", "gpu_count": 0}, "gpu_count"),
        ({"gpu": "H100", "gpu_count": 99}, "gpu_count"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "long"}, "timeout"),
        ({"memory": "lots"}, "memory"),
        ({"optimize": "fast"}, "optimize"),
        ({"concurrency": 2}, "concurrency"),
        ({"keep_warm": 1}, "keep_warm"),
        ({"retries": 3}, "retries"),
        ({"gpus": "H100"}, "gpus"),
    ],
)
def test_bad_options_fail_at_decoration_naming_the_option(options: dict[str, Any], option: str) -> None:
    app = df.App("bad")
    with pytest.raises(df.InvalidOptionError) as caught:
        app.job(**options)
    assert caught.value.details.get("option") == option, caught.value


def test_generators_and_classes_are_refused() -> None:
    app = df.App("shapes")
    deco = app.job(gpu="H100")

    def gen() -> Any:
        yield 1

    with pytest.raises(df.InvalidOptionError, match="returns once"):
        deco(gen)
    with pytest.raises(df.InvalidOptionError, match="plain function"):
        deco(42)  # type: ignore[arg-type]


def test_job_names_are_unique_in_the_app() -> None:
    app = df.App("dupes")

    @app.function()
    def train() -> None:
        return None

    with pytest.raises(df.InvalidOptionError, match="unique"):

        @app.job(gpu="H100")
        def train() -> None:
            return None


def test_fan_out_is_refused_with_a_hint() -> None:
    app = df.App("fan")

    @app.job(gpu="H100")
    def train(x: int) -> int:
        return x

    with pytest.raises(df.InvalidInputError, match=r"\.spawn"):
        train.map([1, 2])


def test_job_handles_by_id() -> None:
    job = df.Job.from_id("jb-0123456789abcdef")
    assert isinstance(job, Job) and job.job_id == job.object_id == "jb-0123456789abcdef"
    with pytest.raises(df.InvalidInputError, match="jb-"):
        df.Job.from_id("fc-123")
