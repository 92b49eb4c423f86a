"""Render an ``ImageSpec`` to a Dockerfile (pure): the docker backend's input.

Layers go from the least to the most often changed — base, apt packages, Python, pip packages, commands, env,
workdir — so editing the pip list reuses the apt layer from the cache. Each list keeps the spec's order (it is
part of the image id); nothing here reads the clock or the network, so one spec always renders the same text.
"""

from __future__ import annotations

import json
import shlex

from duanflow_proto.messages.build import ImageSpec

CUDA_PATCH = {
    "11.8": "11.8.0",
    "12.1": "12.1.1",
    "12.2": "12.2.2",
    "12.3": "12.3.2",
    "12.4": "12.4.1",
    "12.5": "12.5.1",
    "12.6": "12.6.3",
    "12.8": "12.8.1",
}
"""Patch release of each CUDA minor published as ``nvidia/cuda`` runtime images."""
DEFAULT_PYTHON = "3.11"
VENV = "/opt/duanflow/venv"
UV_IMAGE = "ghcr.io/astral-sh/uv:0.5"


def cuda_tag(version: str) -> str:
    """The ``nvidia/cuda`` runtime image of a CUDA version (``12.4`` → ``12.4.1``, ``12.4.0`` kept).

    >>> cuda_tag("12.4")
    'nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04'
    """
    full = version if version.count(".") == 2 else CUDA_PATCH.get(version, f"{version}.0")
    return f"nvidia/cuda:{full}-cudnn-runtime-ubuntu22.04"


def base_image(spec: ImageSpec) -> str:
    """The ``FROM`` of a spec: ``python:X-slim-bookworm`` for ``debian_slim``, the CUDA runtime for ``cuda``.

    >>> base_image(ImageSpec(python="3.12"))
    'python:3.12-slim-bookworm'
    """
    if spec.base == "cuda":
        return cuda_tag(spec.cuda or "12.4")
    return f"python:{spec.python or DEFAULT_PYTHON}-slim-bookworm"


def needs_venv(spec: ImageSpec) -> bool:
    """Whether the image gets a uv virtualenv: for pip packages, or for Python on a CUDA base (which has none).

    Without one the base image's own Python runs the replica, and no uv image has to be pulled.

    >>> needs_venv(ImageSpec(commands=["echo"])), needs_venv(ImageSpec(pip=["numpy"]))
    (False, True)
    """
    return bool(spec.pip) or spec.base == "cuda"


def render(spec: ImageSpec, *, base: str = "", uv_image: str = UV_IMAGE) -> str:
    """The Dockerfile of ``spec``; ``base`` replaces the ``FROM`` (a locally imported base on offline hosts).

    >>> "pip install" in render(ImageSpec(pip=["numpy"]))
    True
    """
    python = spec.python or DEFAULT_PYTHON
    venv = needs_venv(spec)
    lines = ["# syntax=docker/dockerfile:1"]
    if venv:
        lines.append(f"FROM {uv_image} AS uv")
    lines += [
        f"FROM {base or base_image(spec)}",
        "ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 UV_LINK_MODE=copy UV_PYTHON_INSTALL_DIR=/opt/python",
    ]
    if spec.apt:
        pkgs = " ".join(shlex.quote(p) for p in spec.apt)
        lines.append(
            f"RUN apt-get update && apt-get install -y --no-install-recommends {pkgs} && rm -rf /var/lib/apt/lists/*"
        )
    if venv:
        lines += [
            "COPY --from=uv /uv /usr/local/bin/uv",
            f"RUN uv venv --python {shlex.quote(python)} --system-site-packages {VENV}",
            f"ENV VIRTUAL_ENV={VENV} PATH={VENV}/bin:$PATH",
        ]
    if spec.pip:
        pkgs = " ".join(shlex.quote(p) for p in spec.pip)
        lines.append(f"RUN uv pip install --compile-bytecode --python {VENV}/bin/python {pkgs}")
    lines += [f"RUN {command}" for command in spec.commands]
    for key in sorted(spec.env):
        lines.append(f"ENV {key}={json.dumps(spec.env[key])}")
    if spec.workdir:
        lines.append(f"WORKDIR {json.dumps(spec.workdir)}")
    return "\n".join(lines) + "\n"
