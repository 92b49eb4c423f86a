"""The in-replica worker runtime: ``python -m duanflow._runtime``, started by an agent.

It imports the user's module by name from the release's bundle (module scope runs once per replica), finds
the app and the function, binds the function's durable pull consumer, announces readiness to its agent and
then runs invocations with up to ``DUANFLOW_CONCURRENCY`` in flight, answering each caller's inbox before
acking. See ``docs/CONTRACTS.md`` (agent → replica).
"""

from duanflow._runtime.config import RuntimeConfig
from duanflow._runtime.worker import Worker, serve

__all__ = ["RuntimeConfig", "Worker", "serve"]
