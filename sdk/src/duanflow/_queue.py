"""Work queues that ``@app.worker`` functions consume."""

from __future__ import annotations

from dataclasses import dataclass

from duanflow_proto import subjects

from duanflow._errors import InvalidOptionError


@dataclass(frozen=True, slots=True)
class Queue:
    """A durable work queue; ``@app.worker(queue=...)`` replicas consume it.

    A failed message is retried up to ``max_retries`` times with backoff, then dead-lettered.

    Example::

        audio_queue = df.Queue("audio-inbox", max_retries=3)

        @app.worker(queue=audio_queue, gpu="A10G", scale_to=12)
        def transcribe_audio(job): ...
    """

    name: str
    max_retries: int = 3

    def __post_init__(self) -> None:
        try:
            subjects.token(self.name if isinstance(self.name, str) else "")
        except ValueError as exc:
            raise InvalidOptionError(f"Queue name: {exc}") from None
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or not 0 <= self.max_retries <= 100
        ):
            raise InvalidOptionError(f"Queue(max_retries=) must be an int from 0 to 100, got {self.max_retries!r}")
