"""Retry policies of functions."""

from __future__ import annotations

from dataclasses import dataclass

from duanflow._errors import InvalidOptionError


@dataclass(frozen=True, slots=True)
class Retries:
    """How often, and how far apart, a failed input is retried.

    The delay before retry ``n`` (from 1) is ``initial_delay * backoff_coefficient ** (n - 1)``, capped at
    ``max_delay`` seconds.

    Example::

        @app.function(retries=df.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=1.0))
        def flaky(x): ...
    """

    max_retries: int
    backoff_coefficient: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or not 0 <= self.max_retries <= 100
        ):
            raise InvalidOptionError(f"Retries(max_retries=) must be an int from 0 to 100, got {self.max_retries!r}")
        if not _number(self.backoff_coefficient) or not 1.0 <= self.backoff_coefficient <= 10.0:
            raise InvalidOptionError(
                f"Retries(backoff_coefficient=) must be a number from 1.0 to 10.0, got {self.backoff_coefficient!r}"
            )
        if not _number(self.initial_delay) or not 0 <= self.initial_delay <= 3600:
            raise InvalidOptionError(f"Retries(initial_delay=) must be 0 to 3600 seconds, got {self.initial_delay!r}")
        if not _number(self.max_delay) or not self.initial_delay <= self.max_delay <= 3600:
            raise InvalidOptionError(
                f"Retries(max_delay=) must be from initial_delay ({self.initial_delay}) to 3600 seconds, "
                f"got {self.max_delay!r}"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry).

        >>> Retries(3).delay(2)
        2.0
        """
        return float(min(self.max_delay, self.initial_delay * self.backoff_coefficient ** max(0, retry - 1)))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
