"""The agent's venv image cache on a real disk and a real HTTP server: download once, LRU past the cap, busy kept."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from duanflow_agent.adapters.images import HttpImageCache
from duanflow_proto.errors import InvalidInputError, UnavailableError

pytestmark = pytest.mark.timeout(30)

PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def venv_tarball(path: Path, *, python: str = PY, payload: int = 10_000) -> None:
    """A packed venv like the builder's: pyvenv.cfg and one module in site-packages, ``payload`` bytes big."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            ("pyvenv.cfg", f"home = /usr/bin\nversion_info = {python}.1\n".encode()),
            (f"lib/python{python}/site-packages/probe_mod.py", b"X = 1\n" + b"#" * payload),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def serving(root: Path) -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def image(n: int) -> str:
    return "im-" + f"{n:024x}"


async def test_download_once_lru_eviction_busy_kept_python_checked(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    for n in range(4):
        venv_tarball(served / f"{image(n)}.tar.gz", payload=40_000)
    venv_tarball(served / "other-python.tar.gz", python="3.99")
    cache = HttpImageCache(tmp_path / "agent", cap_bytes=100_000)
    busy: set[str] = set()
    cache.busy = lambda: busy
    with serving(served) as (base, hits):
        paths = await cache.fetch(f"{base}/{image(0)}.tar.gz", image(0))
        assert len(paths) == 1 and (Path(paths[0]) / "probe_mod.py").is_file()
        assert await cache.fetch(f"{base}/{image(0)}.tar.gz", image(0)) == paths
        assert hits.count(f"/{image(0)}.tar.gz") == 1  # cached by id: one download

        busy.add(image(0))  # a replica runs in image 0: never evicted, though least recently used
        await cache.fetch(f"{base}/{image(1)}.tar.gz", image(1))
        await cache.fetch(f"{base}/{image(2)}.tar.gz", image(2))
        assert cache.cached() == [image(0), image(2)]  # 3 x 40 kB > 100 kB: image 1 (oldest not busy) went
        busy.clear()
        await cache.fetch(f"{base}/{image(3)}.tar.gz", image(3))
        assert cache.cached() == [image(2), image(3)]

        with pytest.raises(InvalidInputError, match=r"built for Python 3\.99"):
            await cache.fetch(f"{base}/other-python.tar.gz", "im-" + "f" * 24)
        with pytest.raises(UnavailableError, match="HTTP 404"):
            await cache.fetch(f"{base}/missing.tar.gz", "im-" + "e" * 24)
        with pytest.raises(InvalidInputError, match="not an image id"):
            await cache.fetch(f"{base}/x.tar.gz", "../../etc")
