"""Queues, workers and storage without a server: decorator options, retry delays, names, wire formats."""

from __future__ import annotations

import duanflow as df
import pytest
from duanflow._queue import decode_dead_letter, decode_job, encode_dead_letter, encode_job, new_job_id
from duanflow._runtime.queue_worker import is_queue_worker, retry_delay
from duanflow._storage import parse_url
from duanflow_proto import subjects
from duanflow_proto.messages.queue import DeadLetter
from duanflow_router.adapters.nats import queue_consumer_config


def test_worker_takes_its_retry_count_from_the_queue() -> None:
    app = df.App("queue-unit")
    inbox = df.Queue("audio-inbox", max_retries=3)

    @app.worker(queue=inbox, gpu="A10G", scale_to=12)
    def transcribe_audio(job: dict[str, str]) -> str:
        return job["input_url"]

    spec = transcribe_audio.spec
    assert (spec.kind, spec.queue, spec.retries, spec.scale_to, spec.gpu) == ("worker", "audio-inbox", 3, 12, ["A10G"])
    assert is_queue_worker(spec)
    assert transcribe_audio.raw_f({"input_url": "s3://b/k"}) == "s3://b/k"

    @app.worker(queue="plain", retries=df.Retries(max_retries=9, initial_delay=0.5, max_delay=4.0))
    def by_name(job: object) -> None:
        return None

    assert (by_name.spec.queue, by_name.spec.retries, by_name.spec.retry_initial_delay_s) == ("plain", 3, 0.5)
    assert [retry_delay(by_name.spec, n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"queue": 3}, "queue= takes df.Queue"),
        ({"queue": "Bad Name!"}, "cannot be used as a name"),
        ({"queue": "ok", "retries": 2}, "retry count from the queue"),
        ({"queue": "ok", "method": "GET"}, "unknown option 'method'"),
        ({"queue": "ok", "timeout": -1}, "timeout="),
    ],
)
def test_worker_refuses_bad_options_where_they_are_written(options: dict[str, object], needle: str) -> None:
    app = df.App("queue-unit-bad")
    with pytest.raises(df.InvalidOptionError, match=needle):
        app.worker(**options)  # type: ignore[arg-type]


def test_functions_are_not_queue_workers() -> None:
    app = df.App("queue-unit-fn")

    @app.function
    def f(x: int) -> int:
        return x

    assert not is_queue_worker(f.spec)


def test_queue_names_subjects_and_consumer() -> None:
    assert subjects.queue("main", "audio-inbox") == "duanflow.queue.main.audio-inbox"
    assert subjects.dead_letter("main", "audio-inbox") == "duanflow.dlq.main.audio-inbox"
    assert subjects.queue_consumer("main", "audio-inbox") == "q_main_audio_inbox"
    with pytest.raises(df.InvalidOptionError):
        df.Queue("audio inbox")
    with pytest.raises(df.InvalidOptionError):
        df.Queue("q", max_retries=-1)


def test_the_router_consumer_of_a_worker_filters_its_queue() -> None:
    app = df.App("queue-unit-router")

    @app.worker(queue=df.Queue("inbox", max_retries=2), timeout=60)
    def w(job: object) -> None:
        return None

    cfg = queue_consumer_config("prod", w.spec)
    assert cfg.durable_name == "q_prod_inbox"
    assert cfg.filter_subject == subjects.queue("prod", "inbox")
    assert cfg.ack_wait == 90
    assert cfg.max_deliver is not None and cfg.max_deliver > 3, "the worker dead-letters before JetStream gives up"


def test_jobs_and_dead_letters_round_trip() -> None:
    job = {"input_url": "s3://b/in.wav", "n": [1, 2]}
    assert decode_job(encode_job(job)) == job
    letter = DeadLetter(
        job_id=new_job_id(), queue="q", attempts=4, error="ValueError: x", traceback="Traceback...", data=b"\x80"
    )
    assert decode_dead_letter(encode_dead_letter(letter)) == letter
    assert new_job_id() != new_job_id()


def test_storage_urls() -> None:
    assert parse_url("s3://duanflow/a/b.json") == ("duanflow", "a/b.json")
    assert parse_url("/a/b.json") == ("", "a/b.json")
    for bad in ("s3:///k", "https://x/y"):
        with pytest.raises(df.InvalidInputError):
            parse_url(bad)
    with pytest.raises(df.InvalidInputError, match="names no object key"):
        df.storage.read_bytes("s3://duanflow/dir/")


def test_current_job_id_is_empty_outside_a_worker() -> None:
    assert df.current_job_id() == ""
