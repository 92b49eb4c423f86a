"""Builds virtualenv images with ``uv`` and packs them as ``.tar.gz``.

The archive holds the venv's contents at its root (``bin/``, ``lib/``, ``pyvenv.cfg``); the venv is
created ``--relocatable`` so an agent can unpack it anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from duanflow_proto.messages.build import ImageSpec

from duanflow_builder.ports import BuildFailedError, Emit


def uv_binary() -> str:
    """The ``uv`` executable: on PATH, else the one shipped by the ``uv`` Python package."""
    found = shutil.which("uv")
    if found:
        return found
    import uv

    return str(uv.find_uv_bin())


def _own_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _pack(src: Path, out: Path) -> None:
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        for child in sorted(src.iterdir()):
            tar.add(child, arcname=child.name)


class UvVenvBuilder:
    """:class:`duanflow_builder.ports.VenvBuilder` running ``uv venv`` and ``uv pip install``."""

    def __init__(self, *, work_dir: str = "", timeout_s: float = 900.0, uv: str | None = None) -> None:
        self._work_dir = work_dir or None
        self._timeout_s = timeout_s
        self._uv = uv or uv_binary()

    async def build(self, spec: ImageSpec, emit: Emit) -> Path:
        """Create the venv with the spec's Python (or this process's), install the packages, pack it."""
        tmp = await asyncio.to_thread(self._make_tree)
        try:
            venv = tmp / "venv"
            python = sys.executable if spec.python in ("", _own_python()) else spec.python
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._run([self._uv, "venv", "--relocatable", "--python", python, str(venv)], emit)
                    await self._run(
                        [
                            self._uv,
                            "pip",
                            "install",
                            "--compile-bytecode",  # the replicas' imports read bytecode instead of compiling
                            "--python",
                            str(venv / "bin" / "python"),
                            *spec.pip,
                        ],
                        emit,
                    )
            except TimeoutError:
                raise BuildFailedError(f"the build ran past its {self._timeout_s:.0f}s limit") from None
            out = tmp / "image.tar.gz"
            await emit("packing the virtualenv")
            await asyncio.to_thread(_pack, venv, out)
            return out
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _make_tree(self) -> Path:
        if self._work_dir:
            Path(self._work_dir).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="duanflow-build-", dir=self._work_dir))

    def discard(self, path: Path) -> None:
        """Remove the build tree of ``path``."""
        shutil.rmtree(path.parent, ignore_errors=True)

    async def _run(self, cmd: list[str], emit: Emit) -> None:
        await emit("$ " + " ".join(["uv", *cmd[1:]]))
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                "--no-progress",
                "--color",
                "never",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise BuildFailedError(f"cannot run uv: {exc}") from None
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                text = raw.decode(errors="replace").rstrip()
                if text:
                    await emit(text)
            rc = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if rc != 0:
            raise BuildFailedError(f"uv {cmd[1]} exited with code {rc}")
