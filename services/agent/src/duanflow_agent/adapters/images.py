"""Venv images on local disk: download through a presigned URL, unpack, cache by id, evict least recently used."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from duanflow_proto.errors import InvalidInputError, UnavailableError

from duanflow_agent.image_rules import check_python, evictions, image_dir_name, venv_python

CHUNK = 1024 * 1024
USED_MARK = ".last_used"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _own_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class HttpImageCache:
    """Images under ``<work_dir>/images/<image id>/``, at most ``cap_bytes`` of them (in-use images stay)."""

    def __init__(self, work_dir: Path, cap_bytes: int, *, timeout_s: float = 300.0, python: str = "") -> None:
        self.root = work_dir / "images"
        self.cap_bytes = cap_bytes
        self.timeout_s = timeout_s
        self.python = python or _own_python()
        self._locks: dict[str, asyncio.Lock] = {}
        self.busy: Callable[[], Iterable[str]] = tuple
        """Ids of images replicas run in now (never evicted); the agent sets it."""

    def cached(self) -> list[str]:
        """Ids of the images on disk (for capacity reports: placement prefers hosts that have the image)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def fetch(self, url: str, image_id: str) -> list[str]:
        """The image's import paths (its site-packages), downloading ``url`` unless cached; marks it used."""
        name = image_dir_name(image_id)
        target = self.root / name
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if not target.is_dir():
                await asyncio.to_thread(self._download_unpack, url, target)
                keep = {name, *self.busy()}
                await asyncio.to_thread(self._evict, keep)
            return await asyncio.to_thread(self._prepare, name, target)

    def _prepare(self, image_id: str, target: Path) -> list[str]:
        cfg = target / "pyvenv.cfg"
        check_python(image_id, venv_python(cfg.read_text()) if cfg.is_file() else "", self.python)
        (target / USED_MARK).touch()
        return [str(p) for p in sorted(target.glob("lib/python*/site-packages")) if p.is_dir()]

    def _download_unpack(self, url: str, target: Path) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"image_url must be http(s), not {url.split(':', 1)[0]!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".tmp-") as tmp:
            archive = Path(tmp) / "image.tar.gz"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as resp, archive.open("wb") as out:  # noqa: S310
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                raise UnavailableError(f"image download failed: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                raise UnavailableError(f"image download failed: {exc}") from None
            staging = Path(tmp) / "out"
            staging.mkdir()
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(staging, filter="tar")  # the "tar" filter refuses absolute paths and escapes
            except (tarfile.TarError, OSError) as exc:
                raise InvalidInputError(f"image archive is not a valid venv image: {exc}") from None
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise

    def _evict(self, keep: set[str]) -> None:
        entries: dict[str, tuple[float, int]] = {}
        for image in self.cached():
            path = self.root / image
            mark = path / USED_MARK
            used = mark.stat().st_mtime if mark.exists() else path.stat().st_mtime
            entries[image] = (used, _size(path))
        for image in evictions(entries, self.cap_bytes, keep=keep):
            logging.getLogger("duanflow.agent.images").info("evicting image %s (cache over its cap)", image)
            # Renamed first so a concurrent start never sees a half-deleted image.
            doomed = self.root / f".gone-{image}-{time.monotonic_ns()}"
            with contextlib.suppress(OSError):
                (self.root / image).rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
