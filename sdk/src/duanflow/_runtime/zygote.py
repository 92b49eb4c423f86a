"""A pre-loaded parent that forks replicas: ``python -m duanflow._runtime.zygote``.

Starting a replica from scratch spends most of its time importing (the interpreter, nats-py, msgspec,
cloudpickle, the SDK): hundreds of milliseconds on a small machine. The zygote imports all of that once and
then forks one child per request, so a replica only imports the user's module, connects and binds its consumer.

Protocol (stdin/stdout, one JSON object per line): the parent writes ``{"env": {...}, "cwd": "...", "log":
"path"}`` (the replica's full environment as in docs/CONTRACTS.md, its working directory, the file its output
goes to); the zygote answers ``{"pid": N}``. Its first line, once everything is imported, is
``{"ready": true}``. The child runs in its own session, exactly like ``python -m duanflow._runtime``. The
zygote exits when its stdin closes; the children live on.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import duanflow._runtime.worker  # noqa: F401 - the point: import everything before forking
from duanflow._runtime.__main__ import main as replica_main


def _child(request: dict[str, object]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    env = request["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(str(request["cwd"]))
    for entry in reversed(str(env.get("PYTHONPATH", "")).split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    code = replica_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> int:
    """Fork one replica per request line until stdin closes."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel; the agent watches pids
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                _child(request)
            finally:
                os._exit(1)
        print(json.dumps({"pid": pid}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
