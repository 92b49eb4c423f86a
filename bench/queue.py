"""``python bench/queue.py``: jobs/s through a ``df.Queue`` beside Celery + Redis (``bench/queue_throughput.py``).

This file's name is the standard library's ``queue``, and every script in ``bench/`` has this folder first on
``sys.path``: imported under that name (by ``concurrent.futures``, ``logging``, ``kombu``...), it stands aside and
puts the real module in its place, so that it shadows nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from queue_throughput import main  # type: ignore[import-not-found,unused-ignore]

    sys.exit(main())
else:
    _spec = importlib.util.spec_from_file_location(__name__, Path(os.__file__).parent / "queue.py")
    assert _spec is not None and _spec.loader is not None
    _stdlib = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _stdlib
    _spec.loader.exec_module(_stdlib)
